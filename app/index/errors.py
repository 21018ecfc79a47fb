"""Errors raised by the embedded vector index.

They hang off :class:`app.core.errors.MMFusionError` so the API layer maps them to the single JSON
error schema like every other expected error: each has a stable machine-readable ``code``, an HTTP
``status_code`` and a human ``message``. :class:`IndexStoreError` is the common base, so callers that
only care about "the index refused this" catch one class.

Client mistakes (bad id, wrong dimension, bad filter) are 4xx; a damaged or foreign index on disk is
a 500 raised at start-up, with a message that says how to recover, because an operator has to act.
"""

from __future__ import annotations

import errno
from pathlib import Path

from app.core.errors import MMFusionError

REBUILD_HINT = ("move the index directory aside (it is left as it is, for inspection) and re-add the items, e.g. "
                "with `mmfusion index import`; `mmfusion index rebuild` cannot read a corrupt index")
INDEX_DIR_NAME = "the index directory (MMFUSION_INDEX_PATH)"


def _scrub(text: str, *paths: Path) -> str:
    """``text`` with every absolute path in ``paths`` replaced by a name that reveals nothing about the host.

    Index errors reach clients (``/v1/search`` answers 503 with the reason the index could not be
    opened), and an absolute path tells an attacker the deployment's layout. The full path stays in
    the exception's ``detail`` and in the server log, where an operator needs it.
    """
    for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
        if str(path) not in ("", "."):
            text = text.replace(str(path), path.name or INDEX_DIR_NAME)
    return text


class IndexStoreError(MMFusionError):
    """Base of every error the vector index raises on purpose.

    Two texts: ``message`` is what a client may see (HTTP responses, ``/v1/index``), so it never holds
    an absolute path; ``detail`` (what ``str()`` returns: server logs, the ``mmfusion index`` CLI) names
    the files on disk, because the operator who must act on it needs them.
    """

    status_code = 500
    code = "index_error"
    detail: str | None = None

    def __str__(self) -> str:
        return self.detail or self.message


class IndexWriteError(IndexStoreError):
    """The disk refused an index write (full, over quota, read-only, failing). Nothing was stored: the
    write-ahead log is rolled back. 507 when space is the cause (an operator must free some), else 503."""

    status_code = 503
    code = "index_write_failed"

    def __init__(self, exc: OSError, path: Path, *, stored: bool = False):
        """``stored``: the failed write could not be rolled back either, so the next start may replay it."""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = exc.strerror or type(exc).__name__
        outcome = ("part of the write may reach the index at the next start (the log could not be rolled back); "
                   "read the items before retrying" if stored else "nothing was stored")
        super().__init__(f"the vector index could not write to disk ({reason}); {outcome}"
                         + ("; free disk space, then retry" if full else ""))
        if full:
            self.status_code = 507
            self.code = "insufficient_storage"
        self.detail = f"{self.message} [{path}: {exc}]"


class InvalidItemIdError(IndexStoreError):
    """An item id that is empty, too long or has characters outside ``[A-Za-z0-9._:-]``."""

    status_code = 422
    code = "invalid_id"

    def __init__(self, message: str):
        super().__init__(message, field="id")


class InvalidItemError(IndexStoreError):
    """An item's ``text`` or ``metadata`` that cannot be stored (wrong type, not JSON, too large)."""

    status_code = 422
    code = "invalid_item"


class InvalidVectorError(IndexStoreError):
    """A vector that is not a finite, non-zero 1-D (or 2-D for batches) array of numbers."""

    status_code = 422
    code = "invalid_vector"

    def __init__(self, message: str, *, field: str | None = "vector"):
        super().__init__(message, field=field)


class DimensionMismatchError(IndexStoreError):
    """A vector or query whose length differs from the index dimension."""

    status_code = 422
    code = "dimension_mismatch"

    def __init__(self, message: str, *, expected: int, got: int, field: str | None = "vector"):
        super().__init__(message, field=field)
        self.expected = expected
        self.got = got


class InvalidQueryError(IndexStoreError):
    """A search request with a bad ``k`` or ``filter``."""

    status_code = 422
    code = "invalid_query"


class ItemNotFoundError(IndexStoreError):
    """``get`` of an id that is not in the index."""

    status_code = 404
    code = "not_found"

    def __init__(self, item_id: str):
        super().__init__(f"no item with id {item_id!r} in the index", field="id")
        self.item_id = item_id


class IndexClosedError(IndexStoreError):
    """Use of an index after :meth:`VectorIndex.close`."""

    status_code = 503
    code = "index_closed"


class IndexCorruptError(IndexStoreError):
    """A snapshot, WAL or ``index.json`` that cannot be read back; ``path`` names the file."""

    status_code = 500
    code = "index_corrupt"

    def __init__(self, path: Path, problem: str, *, index_dir: Path | None = None):
        where = index_dir if index_dir is not None else path.parent
        self.detail = (f"vector index file {path} is corrupt: {problem}. The index cannot be opened safely; "
                       f"{REBUILD_HINT} (the directory: {where}).")
        super().__init__(
            f"vector index file {path.name!r} in {INDEX_DIR_NAME} is corrupt: {_scrub(problem, path, where)}. "
            f"The index cannot be opened safely; {REBUILD_HINT}."
        )
        self.path = path
        self.problem = problem


class IndexBundleMismatchError(IndexStoreError):
    """The index on disk was built from a different model bundle (or dimension) than the one loaded.

    Embeddings of different bundles live in different spaces, so searching across them would return
    confident nonsense; refusing to open is the only safe behaviour.
    """

    status_code = 500
    code = "index_bundle_mismatch"

    def __init__(
        self,
        path: Path,
        *,
        index_bundle: tuple[str, str, int],
        loaded_bundle: tuple[str, str, int],
        index_fingerprint: str | None = None,
        loaded_fingerprint: str | None = None,
    ):
        built_name, built_version, built_dim = index_bundle
        name, version, dim = loaded_bundle
        if index_bundle == loaded_bundle:  # same name, version and dim: the weights differ
            problem = (
                f"was built by bundle {built_name!r} version {built_version!r} with embedding fingerprint "
                f"{index_fingerprint}, but the loaded bundle of that name and version has fingerprint "
                f"{loaded_fingerprint}: other weights (a retraining or another model exported under the same "
                "name). "
            )
        else:
            problem = (
                f"was built by bundle {built_name!r} version {built_version!r} "
                f"(dim {built_dim}), but the loaded bundle is {name!r} version {version!r} (dim {dim}). "
            )
        problem += (
            "Embeddings from different bundles are not comparable. Rebuild the index with "
            "`mmfusion index rebuild` (or point MMFUSION_INDEX_PATH elsewhere)."
        )
        self.detail = f"vector index at {path} {problem}"
        super().__init__(f"vector index in {INDEX_DIR_NAME} {problem}")
        self.path = path
        self.index_bundle = index_bundle
        self.loaded_bundle = loaded_bundle
        self.index_fingerprint = index_fingerprint
        self.loaded_fingerprint = loaded_fingerprint


class IndexLockedError(IndexStoreError):
    """Another process (or another open ``VectorIndex``) holds the index directory.

    Two writers appending to one WAL would interleave records and corrupt it, so the second open is
    refused instead. Serve one index directory from one process (one uvicorn worker).
    """

    status_code = 500
    code = "index_locked"

    def __init__(self, path: Path):
        advice = ("Run a single server worker per index directory, close the other user, or point "
                  "MMFUSION_INDEX_PATH elsewhere.")
        self.detail = (f"vector index at {path} is already open in another process or VectorIndex object "
                       f"(lock file {path / 'LOCK'}). {advice}")
        super().__init__(f"vector index in {INDEX_DIR_NAME} is already open in another process or VectorIndex "
                         f"object (its LOCK file is held). {advice}")
        self.path = path
