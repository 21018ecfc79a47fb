"""Embedded exact vector index: add/replace/delete by id, exact inner-product top-k, crash-safe.

Design, and why:

* **Exact search over a matrix we own.** Vectors live in one C-contiguous ``float32`` matrix with
  spare capacity (doubling), plus parallel Python lists for ids, texts and metadata. A faiss index
  object is not used because it cannot replace or delete in O(1); here add is an amortised O(1)
  append, replace overwrites a row, and delete moves the last row into the hole (O(dim)). Search is
  brute force, hence exact: ``faiss.knn`` (BLAS) for batches of queries, numpy ``gemv`` +
  ``argpartition`` for a single query, which measured ~1.5x faster than faiss's single-query path
  on the reference 2-core machine (see ``benchmarks/index_search.py``). Scores are cosine
  similarities: stored vectors and queries are both L2-normalised.

* **Filters** are metadata equality on top-level scalar keys, answered from an inverted index
  ``key -> value -> {ids}``; the matching rows are gathered and searched exactly, so a filtered
  top-k is the true top-k of the matching subset, however selective the filter.

* **Concurrency.** Writers are serialised by one mutex, which they hold while appending to the WAL
  and fsyncing; readers (search, get, stats) take the shared side of a readers-writer lock, and a
  writer takes its exclusive side only for the in-memory mutation (microseconds per item). So
  searches run in parallel with each other and with fsyncs, every search sees a consistent state,
  and an item becomes visible only once it is durable. A search holds the shared lock while the
  BLAS runs (no copy-on-write: copying 1.5 GB per write at 1M items is not an option), which delays
  writers by at most one search. Both faiss and numpy release the GIL while computing.

* **Persistence** (see :mod:`app.index.wal`): every acknowledged change is one CRC-checked record
  appended to ``wal.log`` (fsynced when ``durable``); ``compact()`` / ``close()`` / the WAL growing
  past ``max(auto_compact_bytes, snapshot size)`` write a snapshot atomically and empty the WAL.
  Scaling the trigger with the snapshot bounds write amplification (a bulk load of N items writes
  O(N) bytes of snapshots, not O(N^2)) and keeps replay at open no longer than reading a snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeAlias

import faiss
import numpy as np
import numpy.typing as npt

from app.core.json_types import json_type_name
from app.index.errors import (
    DimensionMismatchError,
    IndexBundleMismatchError,
    IndexClosedError,
    IndexCorruptError,
    IndexStoreError,
    InvalidItemError,
    InvalidItemIdError,
    InvalidQueryError,
    InvalidVectorError,
    ItemNotFoundError,
)
from app.index.wal import (
    MANIFEST_FILE,
    SNAPSHOT_FILE,
    WAL_FILE,
    DeleteRecord,
    DirectoryLock,
    IndexManifest,
    Record,
    WriteAheadLog,
    canonical_json,
    encode_delete,
    encode_put,
    file_mtime,
    read_snapshot,
    remove_stale_tmp_files,
    utcnow,
    write_snapshot,
)

logger = logging.getLogger("mmfusion.index")  # under "mmfusion": the service's JSON log lines

JSONScalar: TypeAlias = str | int | float | bool | None
JSONValue: TypeAlias = JSONScalar | list["JSONValue"] | dict[str, "JSONValue"]
Metadata: TypeAlias = dict[str, JSONValue]
Filter: TypeAlias = Mapping[str, JSONScalar]

BACKEND = "faiss-flat-ip"
MAX_ID_LENGTH = 256
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,256}")
MAX_TEXT_CHARS = 65_536
MAX_METADATA_BYTES = 65_536
MAX_METADATA_DEPTH = 32
# Automatic compaction after a failure: first retry after this many seconds, doubling up to the max.
COMPACT_RETRY_MIN_S = 5.0
COMPACT_RETRY_MAX_S = 300.0
MAX_K = 10_000
DEFAULT_AUTO_COMPACT_BYTES = 256 * 1024 * 1024

_EMPTY_METADATA_JSON = "{}"
_MIN_CAPACITY = 1024
_APPLY_CHUNK = 16_384  # items applied per exclusive-lock hold, so a big batch never stalls searches long
_NORMALISE_CHUNK = 16_384
# Up to this many queries go through numpy (gemv + argpartition); larger batches through faiss.knn.
_NUMPY_MAX_QUERIES = 1

_FilterKey: TypeAlias = str | tuple[str, int | float | bool | None]


# --------------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``score`` is the cosine similarity (inner product of unit vectors)."""

    id: str
    score: float
    text: str | None
    metadata: Metadata


@dataclass(slots=True)
class Item:
    """An item to add, or one returned by :meth:`VectorIndex.get` (then ``vector`` is unit-length).

    ``vector`` may be any 1-D array-like of numbers when adding; it is normalised by the index.
    """

    id: str
    vector: np.ndarray
    text: str | None = None
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IndexStats:
    """What ``/stats``-style endpoints and logs need to know about an index."""

    count: int
    dim: int
    capacity: int
    backend: str
    path: Path | None
    durable: bool
    closed: bool
    last_persisted: datetime | None
    last_compacted: datetime | None
    wal_bytes: int
    bundle_name: str | None
    bundle_version: str | None
    created_at: datetime | None
    embedding_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths and datetimes as strings)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def validate_item_id(item_id: object, *, for_write: bool = False) -> str:
    """Ids end up in URLs, logs and (elsewhere) file names, so only a safe alphabet is accepted.

    ``for_write`` also refuses ids that a new item may not take but an index written by an earlier
    version may already hold (opening, reading and deleting those must keep working)."""
    if not isinstance(item_id, str):
        raise InvalidItemIdError(f"item id must be a string, got {json_type_name(item_id)}")
    if not item_id:
        raise InvalidItemIdError("item id must not be empty")
    if len(item_id) > MAX_ID_LENGTH:
        raise InvalidItemIdError(f"item id is {len(item_id)} characters long; the maximum is {MAX_ID_LENGTH}")
    if ID_PATTERN.fullmatch(item_id) is None:
        raise InvalidItemIdError(
            f"item id {item_id[:64]!r} has characters outside [A-Za-z0-9._:-] (no '/', spaces or unicode)"
        )
    if for_write and item_id in (".", ".."):
        # URL path segments that clients normalise away (RFC 3986 dot segments): such an item could be
        # written but never read or deleted by ``/v1/index/items/{id}`` from curl or a browser.
        raise InvalidItemIdError(f"item id {item_id!r} is a relative path segment in a URL; choose another id")
    return item_id


def _validate_text(text: object, item_id: str) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidItemError(f"text of item {item_id!r} must be a string or null", field="text")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidItemError(
            f"text of item {item_id!r} has {len(text)} characters; the maximum is {MAX_TEXT_CHARS}", field="text"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidItemError(f"text of item {item_id!r} is not valid unicode ({exc.reason})", field="text") from exc
    return text


def _check_json_value(value: object, depth: int, where: str) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidItemError(f"metadata {where} is {value!r}; JSON has no NaN/Infinity", field="metadata")
        return
    if depth >= MAX_METADATA_DEPTH:
        raise InvalidItemError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels", field="metadata")
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json_value(v, depth + 1, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidItemError(f"metadata {where} has a non-string key {k!r}", field="metadata")
            _check_json_value(v, depth + 1, f"{where}.{k}")
        return
    raise InvalidItemError(
        f"metadata {where} has a value of type {json_type_name(value)}, which is not JSON", field="metadata"
    )


def validate_metadata(metadata: object, item_id: str) -> tuple[str, dict[str, Any] | None]:
    """Return (canonical JSON, decoded dict or None when empty)."""
    if metadata is None:
        return _EMPTY_METADATA_JSON, None
    if not isinstance(metadata, Mapping):
        raise InvalidItemError(f"metadata of item {item_id!r} must be an object", field="metadata")
    if not metadata:
        return _EMPTY_METADATA_JSON, None
    _check_json_value(metadata, 0, "")
    try:
        encoded = canonical_json(dict(metadata))
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidItemError(f"metadata of item {item_id!r} is not valid JSON ({exc})", field="metadata") from exc
    if size > MAX_METADATA_BYTES:
        raise InvalidItemError(
            f"metadata of item {item_id!r} is {size} bytes as JSON; the maximum is {MAX_METADATA_BYTES}",
            field="metadata",
        )
    return encoded, json.loads(encoded)


def _filter_key(value: object) -> _FilterKey | None:
    """Hashable key for equality filtering; None for values that cannot be filtered on.

    JSON semantics: ``true`` is not ``1``, but ``1`` equals ``1.0``. A string is its own key (the most
    common value, and a tagged tuple per posting cost 56 bytes more); the other types are tagged tuples,
    which never equal a string.
    """
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", value)
    if isinstance(value, str):
        return value
    return None


def _load_metadata(metadata_json: str) -> Metadata:
    """A fresh dict per call, so callers can mutate what they get without touching the index."""
    return {} if metadata_json == _EMPTY_METADATA_JSON else json.loads(metadata_json)


# --------------------------------------------------------------------------------------------------
# Search kernel
# --------------------------------------------------------------------------------------------------

_faiss_configured = False


def _configure_faiss() -> None:
    """Make ``faiss.knn`` use its BLAS path for every batch of >= 2 queries.

    faiss 1.15 ships ``distance_compute_blas_threshold = 128000`` (queries), so batches below that use
    its per-query SIMD loop, which measured 4x slower than BLAS at 32 queries x 1M x 384 on the
    reference 2-core machine. The knob is process-global; nothing else in the server uses faiss.
    """
    global _faiss_configured
    if not _faiss_configured:
        faiss.cvar.distance_compute_blas_threshold = 2
        _faiss_configured = True


# Filter conditions whose rows are kept between writes (a few distinct filters is the common case).
_FILTER_ROWS_CACHED = 16
# A filter matching more than this fraction of the items is searched by masking scores, not by gathering rows.
BROAD_FILTER_FRACTION = 0.25


def _top_k_of_scores(scores_all: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest of one query's scores over every row, best first."""
    n = scores_all.shape[0]
    top = np.argpartition(scores_all, n - k)[n - k :] if k < n else np.arange(n)
    return top[np.argsort(-scores_all[top], kind="stable")]


def _masked_top_k(query: np.ndarray, base: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of one query among ``base``'s ``rows`` only (``1 <= k <= len(rows)``), as
    :func:`exact_top_k` returns it: every row is scored, the rest are set to -inf."""
    scores_all = base @ query
    keep = np.zeros(base.shape[0], dtype=bool)
    keep[rows] = True
    scores_all[~keep] = -np.inf
    order = _top_k_of_scores(scores_all, k)
    order = order[np.isfinite(scores_all[order])]  # k <= len(rows), so this only guards k == n
    return scores_all[order][None, :], order[None, :]


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each row of ``queries`` against ``base``.

    Both must be C-contiguous float32; ``1 <= k <= len(base)``. Returns ``(scores, rows)`` of shape
    ``(len(queries), k)``, best first.
    """
    if queries.shape[0] <= _NUMPY_MAX_QUERIES:
        scores_all = base @ queries[0]
        order = _top_k_of_scores(scores_all, k)
        return scores_all[order][None, :], order[None, :]
    _configure_faiss()
    scores, rows = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, rows


# --------------------------------------------------------------------------------------------------
# Readers-writer lock
# --------------------------------------------------------------------------------------------------


class _ReadWriteLock:
    """Many readers or one writer; waiting writers block new readers, so writers cannot starve.

    Not reentrant: a thread holding the read side must not acquire it again (the index never does).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------


class VectorIndex:
    """Exact top-k cosine search over items ``(id, vector, text, metadata)``, optionally persistent.

    Create with :meth:`open` (persistent, crash-safe) or :meth:`in_memory`. Thread-safe.
    """

    def __init__(
        self,
        dim: int,
        *,
        directory: Path | None = None,
        manifest: IndexManifest | None = None,
        durable: bool = False,
        auto_compact_bytes: int | None = None,
        lock: DirectoryLock | None = None,
        _token: object = None,
    ):
        if _token is not _PRIVATE:
            raise TypeError("use VectorIndex.open(...) or VectorIndex.in_memory(dim)")
        self._dim = dim
        self._dir = directory
        self._manifest = manifest
        self._durable = durable
        self._auto_compact_bytes = auto_compact_bytes
        self._snapshot_bytes = 0
        # After a failed automatic compaction (disk full), wait before the next try: retrying on every
        # write rewrote the whole snapshot per write (113 writes, 113 full attempts).
        self._compact_backoff_s = 0.0
        self._compact_retry_at = 0.0
        self._dir_lock = lock
        self._wal: WriteAheadLog | None = None

        self._vectors = np.empty((0, dim), dtype=np.float32)
        self._ids: list[str] = []
        self._texts: list[str | None] = []
        self._metadata: list[str] = []  # canonical JSON per row: immutable, compact, snapshot-ready
        self._row_of: dict[str, int] = {}
        # key -> value -> the ids holding it: one id as a plain str, two or more as a set. Most keys of a
        # catalogue are unique per item (sku, url): a one-element set per value cost ~216 bytes more.
        self._postings: dict[str, dict[_FilterKey, str | set[str]]] = {}
        # Sorted row numbers per filter condition, built on first use and dropped by every write: a
        # broad filter's ids -> rows walk costs ~90 ms at 180k matching items, the cached array nothing.
        self._filter_rows: dict[tuple[str, _FilterKey], np.ndarray] = {}

        self._writer = threading.Lock()
        self._rw = _ReadWriteLock()
        self._closed = False
        self._last_persisted: datetime | None = None
        self._last_compacted: datetime | None = None

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def in_memory(cls, dim: int) -> VectorIndex:
        """An index without persistence, for tests, benchmarks and throw-away use."""
        return cls(_validate_dim(dim), _token=_PRIVATE)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        bundle_name: str,
        bundle_version: str,
        dim: int,
        embedding_fingerprint: str | None = None,
        durable: bool = True,
        auto_compact_bytes: int | None = DEFAULT_AUTO_COMPACT_BYTES,
    ) -> VectorIndex:
        """Open (creating if missing) the index directory ``path`` for the given bundle.

        ``embedding_fingerprint`` (``BundleManifest.embedding_fingerprint()``) tells two bundles with the
        same name, version and dimension apart: an index that recorded another one is refused. An index
        written before fingerprints existed cannot be checked; it opens with a warning and records this
        one from then on. None (tools that open an index by its own identity) checks nothing.

        ``durable=True`` fsyncs every acknowledged write, so it survives power loss; with ``False``
        writes still reach the OS before returning (they survive ``kill -9``, not a kernel crash).
        ``auto_compact_bytes``: compact when the WAL grows past this or past the snapshot size,
        whichever is larger (None: only on :meth:`compact` / :meth:`close`).

        Raises :class:`IndexBundleMismatchError` if the directory belongs to another bundle/dim,
        :class:`IndexCorruptError` if its files cannot be read back, :class:`IndexLockedError` if
        another process has it open.
        """
        dim = _validate_dim(dim)
        for label, value in (("bundle_name", bundle_name), ("bundle_version", bundle_version)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(directory)
        try:
            remove_stale_tmp_files(directory)
            manifest_path = directory / MANIFEST_FILE
            wal_path = directory / WAL_FILE
            snapshot_path = directory / SNAPSHOT_FILE
            if manifest_path.exists():
                manifest = IndexManifest.load(manifest_path)
                recorded = manifest.embedding_fingerprint
                if not manifest.accepts((bundle_name, bundle_version, dim), embedding_fingerprint):
                    raise IndexBundleMismatchError(
                        directory, index_bundle=manifest.identity, loaded_bundle=(bundle_name, bundle_version, dim),
                        index_fingerprint=recorded, loaded_fingerprint=embedding_fingerprint,
                    )
                if not wal_path.exists():
                    raise IndexCorruptError(wal_path, "is missing although index.json exists", index_dir=directory)
                if manifest.has_snapshot and not snapshot_path.exists():
                    raise IndexCorruptError(
                        snapshot_path, "is missing although the index has been compacted (index.json says so): "
                        "the items compacted into it are not in the WAL any more", index_dir=directory)
                # Keys an index written by an earlier version lacks: recorded from now on, in one write.
                upgrades: dict[str, object] = {}
                if embedding_fingerprint and not recorded:
                    logger.warning(
                        "vector index at %s predates embedding fingerprints: it cannot be checked against the "
                        "weights of %s@%s, only their name and dimension; recording fingerprint %s from now on "
                        "(if it was built by other weights with the same name, run `mmfusion index rebuild`)",
                        directory, bundle_name, bundle_version, embedding_fingerprint)
                    upgrades["embedding_fingerprint"] = embedding_fingerprint
                if snapshot_path.exists() and not manifest.has_snapshot:
                    upgrades["has_snapshot"] = True
                if upgrades:
                    manifest = dataclasses.replace(manifest, **upgrades)  # type: ignore[arg-type]
                    manifest.write(manifest_path)
            else:
                for existing in (wal_path, snapshot_path):
                    if existing.exists():
                        raise IndexCorruptError(
                            manifest_path, f"is missing although {existing.name} exists", index_dir=directory
                        )
                # WAL first, manifest last: a directory with index.json is always complete.
                WriteAheadLog.create_empty(wal_path, dim)
                manifest = IndexManifest(
                    bundle_name=bundle_name, bundle_version=bundle_version, dim=dim, created_at=utcnow(),
                    embedding_fingerprint=embedding_fingerprint,
                )
                manifest.write(manifest_path)
                logger.info("created vector index at %s for bundle %s@%s", directory, bundle_name, bundle_version)

            index = cls(
                dim,
                directory=directory,
                manifest=manifest,
                durable=durable,
                auto_compact_bytes=auto_compact_bytes,
                lock=lock,
                _token=_PRIVATE,
            )
            if snapshot_path.exists():
                index._load_snapshot(snapshot_path)
                index._last_compacted = file_mtime(snapshot_path)
                index._snapshot_bytes = snapshot_path.stat().st_size
            index._wal, replay = WriteAheadLog.open(
                wal_path, dim, durable=durable, apply=index._replay_record, index_dir=directory
            )
            stamps = [t for t in (file_mtime(snapshot_path), file_mtime(wal_path)) if t is not None]
            index._last_persisted = max(stamps) if stamps else None
            logger.info(
                "opened vector index at %s: %d items (%d WAL records replayed)", directory, index.count, replay.records
            )
            return index
        except BaseException:
            lock.release()
            raise

    def _load_snapshot(self, path: Path) -> None:
        assert self._dir is not None
        snap = read_snapshot(path, self._dim, capacity_for=_grown_capacity, index_dir=self._dir)
        self._vectors = snap.vectors
        for row, (item_id, text, meta) in enumerate(zip(snap.ids, snap.texts, snap.metadata, strict=True)):
            try:
                validate_item_id(item_id)
            except InvalidItemIdError as exc:
                raise IndexCorruptError(path, f"row {row}: {exc.message}", index_dir=self._dir) from exc
            if item_id in self._row_of:
                raise IndexCorruptError(path, f"row {row}: duplicate id {item_id!r}", index_dir=self._dir)
            self._row_of[item_id] = row
            self._ids.append(item_id)
            self._texts.append(text)
            if meta:
                self._metadata.append(canonical_json(meta))
                self._index_metadata(item_id, meta)
            else:
                self._metadata.append(_EMPTY_METADATA_JSON)

    def _replay_record(self, record: Record) -> None:
        """Apply one WAL record at open (single-threaded, before the index is shared)."""
        assert self._dir is not None
        try:
            validate_item_id(record.item_id)
        except InvalidItemIdError as exc:
            raise IndexCorruptError(self._dir / WAL_FILE, exc.message, index_dir=self._dir) from exc
        if isinstance(record, DeleteRecord):
            if record.item_id in self._row_of:
                self._delete_row(record.item_id)
            return
        self._ensure_capacity(len(self._ids) + 1)
        meta = record.metadata or None
        meta_json = record.metadata_json if meta else _EMPTY_METADATA_JSON
        self._upsert([record.item_id], [record.text], [meta_json], [meta], record.vector[None, :], range(1))

    # ---- properties ----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count(self) -> int:
        return len(self._ids)

    @property
    def path(self) -> Path | None:
        return self._dir

    @property
    def manifest(self) -> IndexManifest | None:
        return self._manifest

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self._row_of

    def __repr__(self) -> str:
        where = str(self._dir) if self._dir is not None else "in-memory"
        return f"VectorIndex({where}, dim={self._dim}, count={self.count})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes --------------------------------------------------------------------------------

    def add(
        self,
        item_id: str,
        vector: npt.ArrayLike,
        *,
        text: str | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
    ) -> bool:
        """Add or replace one item. Returns True if it was new, False if it replaced one.

        When this returns (``durable=True``), the change is fsynced to the WAL.
        """
        arr = _as_float32(vector, field="vector")
        if arr.ndim != 1:
            raise InvalidVectorError(f"vector must be 1-D, got shape {arr.shape}")
        return self.add_batch([item_id], arr[None, :], texts=[text], metadata=[metadata]) == 1

    def add_many(self, items: Iterable[Item]) -> int:
        """Add or replace many items with one WAL write and one fsync. Returns how many were new.

        All items are validated before anything is written, so a bad item rejects the whole call.
        Later duplicates of an id win. A crash during the call may persist a prefix of the batch.
        """
        items = list(items)
        if not items:
            return 0
        matrix = np.empty((len(items), self._dim), dtype=np.float32)
        for j, item in enumerate(items):
            item_id = validate_item_id(item.id, for_write=True)
            vec = _as_float32(item.vector, field="vector")
            if vec.ndim != 1:
                raise InvalidVectorError(f"vector of item {item_id!r} must be 1-D, got shape {vec.shape}")
            if vec.shape[0] != self._dim:
                raise DimensionMismatchError(
                    f"vector of item {item_id!r} has {vec.shape[0]} dimensions; this index holds {self._dim}",
                    expected=self._dim,
                    got=vec.shape[0],
                )
            matrix[j] = vec
        return self.add_batch(
            [it.id for it in items],
            matrix,
            texts=[it.text for it in items],
            metadata=[it.metadata for it in items],
        )

    def add_batch(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        *,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, JSONValue] | None] | None = None,
    ) -> int:
        """Columnar :meth:`add_many`: ``vectors`` is an ``(len(ids), dim)`` matrix.

        The fast path for bulk loads (an encoder's output batch, ``mmfusion index rebuild``):
        validation and normalisation are vectorised. Returns how many ids were new.
        """
        return len(self.upsert_batch(ids, vectors, texts=texts, metadata=metadata))

    def upsert_batch(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        *,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, JSONValue] | None] | None = None,
    ) -> frozenset[str]:
        """:meth:`add_batch`, returning *which* ids were new, decided under the write lock: a caller that
        looked before writing could call an id new that a concurrent write had just created."""
        if isinstance(ids, str):
            raise InvalidItemIdError("ids must be a sequence of strings, not one string")
        n = len(ids)
        if n == 0:
            return frozenset()
        if texts is not None and len(texts) != n:
            raise InvalidItemError(f"got {len(texts)} texts for {n} ids", field="text")
        if metadata is not None and len(metadata) != n:
            raise InvalidItemError(f"got {len(metadata)} metadata entries for {n} ids", field="metadata")
        for item_id in ids:
            validate_item_id(item_id, for_write=True)
        normed = self._normalise(vectors, ids)
        text_list: list[str | None] = (
            [None] * n if texts is None else [_validate_text(t, i) for t, i in zip(texts, ids, strict=True)]
        )
        meta_json: list[str] = []
        meta_obj: list[dict[str, Any] | None] = []
        if metadata is None:
            meta_json = [_EMPTY_METADATA_JSON] * n
            meta_obj = [None] * n
        else:
            for m, i in zip(metadata, ids, strict=True):
                encoded, decoded = validate_metadata(m, i)
                meta_json.append(encoded)
                meta_obj.append(decoded)
        last: dict[str, int] = {}
        for j, item_id in enumerate(ids):
            last[item_id] = j
        keep: Sequence[int] = range(n) if len(last) == n else sorted(last.values())

        with self._writer:
            self._check_open()
            new_ids = frozenset(ids[j] for j in keep if ids[j] not in self._row_of)
            # Grow first: a failure here must happen before anything is acknowledged in the WAL.
            self._ensure_capacity(len(self._ids) + len(new_ids))
            if self._wal is not None:
                self._wal.append(encode_put(ids[j], text_list[j], meta_json[j], normed[j]) for j in keep)
            for start in range(0, len(keep), _APPLY_CHUNK):
                with self._rw.write():
                    self._upsert(ids, text_list, meta_json, meta_obj, normed, keep[start : start + _APPLY_CHUNK])
            self._after_write()
        return new_ids

    def delete(self, item_id: str) -> bool:
        """Delete an item; returns whether it existed (deleting a missing id writes nothing)."""
        validate_item_id(item_id)
        with self._writer:
            self._check_open()
            if item_id not in self._row_of:
                return False
            if self._wal is not None:
                self._wal.append([encode_delete(item_id)])
            with self._rw.write():
                self._delete_row(item_id)
            self._after_write()
        return True

    def flush(self) -> None:
        """fsync the WAL now (useful with ``durable=False``); a no-op in memory."""
        with self._writer:
            self._check_open()
            if self._wal is not None:
                self._wal.sync()
                self._last_persisted = utcnow()

    def compact(self) -> None:
        """Write a snapshot of the current state and empty the WAL (in memory: release spare rows).

        Writers wait while the snapshot is written; searches continue.
        """
        with self._writer:
            self._check_open()
            self._compact_locked()

    def close(self) -> None:
        """Compact (so the next open needs no replay), release the files and the memory. Idempotent."""
        with self._writer:
            if self._closed:
                return
            try:
                if self._wal is not None:
                    self._compact_locked()
            except (OSError, IndexStoreError):
                # Nothing is lost: the WAL holds every acknowledged write and the next open replays it. Raising
                # here turned a full disk into a failed shutdown (and a traceback from `mmfusion index import`).
                logger.exception("final compaction of the vector index at %s failed; the WAL keeps every write and "
                                 "the next open replays it", self._dir)
            finally:
                with self._rw.write():
                    self._closed = True
                    self._vectors = np.empty((0, self._dim), dtype=np.float32)
                if self._wal is not None:
                    self._wal.close()
                if self._dir_lock is not None:
                    self._dir_lock.release()

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, item_id: str) -> Item:
        """The stored item (vector normalised); raises :class:`ItemNotFoundError` if absent."""
        validate_item_id(item_id)
        with self._rw.read():
            self._check_open()
            row = self._row_of.get(item_id)
            if row is None:
                raise ItemNotFoundError(item_id)
            return Item(
                id=item_id,
                vector=self._vectors[row].copy(),
                text=self._texts[row],
                metadata=_load_metadata(self._metadata[row]),
            )

    def search(
        self,
        query: npt.ArrayLike,
        k: int = 10,
        filter: Filter | None = None,
    ) -> list[list[Hit]]:
        """Exact top-``k`` items by cosine similarity, for one query ``(dim,)`` or a batch ``(n, dim)``.

        Returns one list per query row, best first, with fewer than ``k`` hits when fewer items
        match. ``filter``: every given metadata key must be present with an equal scalar value
        (``1 == 1.0``, ``true != 1``); the top-k is exact within the matching items.
        """
        queries = self._as_queries(query)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
            raise InvalidQueryError(f"k must be an integer between 1 and {MAX_K}, got {k!r}", field="k")
        conditions = _validate_filter(filter)
        nq = queries.shape[0]
        with self._rw.read():
            self._check_open()
            n = len(self._ids)
            rows: np.ndarray | None = None
            if conditions:
                rows = self._matching_rows(conditions)
            if rows is not None and nq <= _NUMPY_MAX_QUERIES and len(rows) > BROAD_FILTER_FRACTION * n:
                # A broad filter: score every item in place and drop the others, instead of copying most
                # of the matrix into a gathered one first (200k x 128, 90% matching: the copy was 200 ms).
                kk = min(int(k), len(rows))
                scores, found = _masked_top_k(queries[0], self._vectors[:n], rows, kk)
            else:
                base = self._vectors[rows] if rows is not None else self._vectors[:n]
                kk = min(int(k), base.shape[0])
                if kk == 0:
                    return [[] for _ in range(nq)]
                scores, found = exact_top_k(queries, base, kk)
                if rows is not None:
                    found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
            results: list[list[Hit]] = []
            for qi in range(nq):
                hits: list[Hit] = []
                for score, row in zip(scores[qi].tolist(), found[qi].tolist(), strict=True):
                    if row < 0:
                        continue
                    hits.append(
                        Hit(
                            id=self._ids[row],
                            score=score,
                            text=self._texts[row],
                            metadata=_load_metadata(self._metadata[row]),
                        )
                    )
                results.append(hits)
            return results

    def ids(self) -> list[str]:
        """All ids, in no particular order (a copy)."""
        with self._rw.read():
            return list(self._ids)

    def stats(self) -> IndexStats:
        with self._rw.read():
            m = self._manifest
            return IndexStats(
                count=len(self._ids),
                dim=self._dim,
                capacity=self._vectors.shape[0],
                backend=BACKEND,
                path=self._dir,
                durable=self._durable if self._dir is not None else False,
                closed=self._closed,
                last_persisted=self._last_persisted,
                last_compacted=self._last_compacted,
                wal_bytes=self._wal.size_bytes if self._wal is not None else 0,
                bundle_name=m.bundle_name if m else None,
                bundle_version=m.bundle_version if m else None,
                embedding_fingerprint=m.embedding_fingerprint if m else None,
                created_at=m.created_at if m else None,
            )

    # ---- internals (callers hold the writer lock, plus the exclusive rw lock to mutate) ---------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexClosedError("the vector index is closed")

    def _normalise(self, vectors: npt.ArrayLike, ids: Sequence[str]) -> np.ndarray:
        """Validate ``(len(ids), dim)`` vectors (finite, non-zero) and return unit-length float32 rows."""
        arr = _as_float32(vectors, field="vector")
        n = len(ids)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InvalidVectorError(f"expected a ({n}, {self._dim}) matrix of vectors, got shape {arr.shape}")
        if arr.shape[1] != self._dim:
            raise DimensionMismatchError(
                f"vectors have {arr.shape[1]} dimensions; this index holds {self._dim}",
                expected=self._dim,
                got=arr.shape[1],
            )
        out = np.empty((n, self._dim), dtype=np.float32)
        for start in range(0, n, _NORMALISE_CHUNK):
            chunk = arr[start : start + _NORMALISE_CHUNK].astype(np.float64)
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                bad = ids[start + int(np.argmin(finite))]
                raise InvalidVectorError(f"vector of item {bad!r} has NaN or infinite values (as float32)")
            # Scale by the largest component first so huge values cannot overflow the norm.
            scale = np.abs(chunk).max(axis=1)
            if not scale.all():
                bad = ids[start + int(np.argmin(scale))]
                raise InvalidVectorError(f"vector of item {bad!r} is all zeros and has no direction")
            chunk /= scale[:, None]
            chunk /= np.sqrt(np.einsum("ij,ij->i", chunk, chunk))[:, None]
            out[start : start + chunk.shape[0]] = chunk
        return out

    def _as_queries(self, query: npt.ArrayLike) -> np.ndarray:
        q = _as_float32(query, field="query")
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] == 0:
            raise InvalidVectorError(f"query must be (dim,) or (n, dim) with n >= 1, got {q.shape}", field="query")
        if q.shape[1] != self._dim:
            raise DimensionMismatchError(
                f"query has {q.shape[1]} dimensions; this index holds {self._dim}",
                expected=self._dim,
                got=q.shape[1],
                field="query",
            )
        q64 = q.astype(np.float64)
        if not np.isfinite(q64).all():
            raise InvalidVectorError("query has NaN or infinite values", field="query")
        scale = np.abs(q64).max(axis=1)
        if not scale.all():
            raise InvalidVectorError("query vector is all zeros and has no direction", field="query")
        q64 /= scale[:, None]
        q64 /= np.linalg.norm(q64, axis=1)[:, None]
        return np.ascontiguousarray(q64, dtype=np.float32)

    def _ensure_capacity(self, needed: int) -> None:
        """Grow by doubling. The copy runs outside the exclusive lock (only writers mutate, and we
        are the writer), so searches keep using the old array until the swap."""
        if needed <= self._vectors.shape[0]:
            return
        new = np.empty((_grown_capacity(needed, self._vectors.shape[0]), self._dim), dtype=np.float32)
        n = len(self._ids)
        new[:n] = self._vectors[:n]
        with self._rw.write():
            self._vectors = new

    def _upsert(
        self,
        ids: Sequence[str],
        texts: Sequence[str | None],
        meta_json: Sequence[str],
        meta_obj: Sequence[dict[str, Any] | None],
        vectors: np.ndarray,
        which: Sequence[int],
    ) -> None:
        """Write items ``which`` (distinct ids) into rows; capacity must already suffice."""
        self._filter_rows.clear()
        rows = np.empty(len(which), dtype=np.int64)
        for pos, j in enumerate(which):
            item_id = ids[j]
            row = self._row_of.get(item_id)
            if row is None:
                row = len(self._ids)
                self._row_of[item_id] = row
                self._ids.append(item_id)
                self._texts.append(texts[j])
                self._metadata.append(meta_json[j])
            else:
                self._unindex_metadata(item_id, self._metadata[row])
                self._texts[row] = texts[j]
                self._metadata[row] = meta_json[j]
            meta = meta_obj[j]
            if meta:
                self._index_metadata(item_id, meta)
            rows[pos] = row
        if isinstance(which, range) and which.step == 1:
            self._vectors[rows] = vectors[which.start : which.stop]
        else:
            self._vectors[rows] = vectors[np.asarray(which, dtype=np.int64)]

    def _delete_row(self, item_id: str) -> None:
        self._filter_rows.clear()
        row = self._row_of.pop(item_id)
        self._unindex_metadata(item_id, self._metadata[row])
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._vectors[row] = self._vectors[last]
            self._ids[row] = moved
            self._texts[row] = self._texts[last]
            self._metadata[row] = self._metadata[last]
            self._row_of[moved] = row
        self._ids.pop()
        self._texts.pop()
        self._metadata.pop()

    def _index_metadata(self, item_id: str, meta: Mapping[str, Any]) -> None:
        for key, value in meta.items():
            fk = _filter_key(value)
            if fk is not None:
                by_value = self._postings.setdefault(key, {})
                members = by_value.get(fk)
                if members is None:
                    by_value[fk] = item_id
                elif isinstance(members, str):
                    if members != item_id:
                        by_value[fk] = {members, item_id}
                else:
                    members.add(item_id)

    def _unindex_metadata(self, item_id: str, meta_json: str) -> None:
        if meta_json == _EMPTY_METADATA_JSON:
            return
        for key, value in json.loads(meta_json).items():
            fk = _filter_key(value)
            if fk is None:
                continue
            by_value = self._postings.get(key)
            if by_value is None:
                continue
            members = by_value.get(fk)
            if members is None:
                continue
            if isinstance(members, str):
                if members != item_id:
                    continue
                del by_value[fk]
            else:
                members.discard(item_id)
                if len(members) == 1:
                    by_value[fk] = next(iter(members))
            if not by_value:
                del self._postings[key]

    def _matching_rows(self, conditions: list[tuple[str, _FilterKey]]) -> np.ndarray:
        """Sorted rows matching every condition (callers hold the read lock; the arrays are shared, read-only)."""
        arrays: list[np.ndarray] = []
        for condition in conditions:
            rows = self._filter_rows.get(condition)
            if rows is None:
                key, fk = condition
                members = self._postings.get(key, {}).get(fk)
                if not members:
                    return np.empty(0, dtype=np.int64)
                if isinstance(members, str):
                    members = (members,)
                # map over the dict's own __getitem__ stays in C, unlike a generator expression.
                rows = np.fromiter(map(self._row_of.__getitem__, members), dtype=np.int64, count=len(members))
                rows.sort()  # sequential gathers are kinder to the cache, and intersect1d wants them sorted
                if len(self._filter_rows) >= _FILTER_ROWS_CACHED:
                    self._filter_rows.clear()
                self._filter_rows[condition] = rows
            arrays.append(rows)
        arrays.sort(key=len)
        matching = arrays[0]
        for other in arrays[1:]:
            matching = np.intersect1d(matching, other, assume_unique=True)
        return matching

    def _after_write(self) -> None:
        if self._wal is None:
            return
        if self._durable:
            self._last_persisted = utcnow()
        threshold = self._auto_compact_bytes
        if (threshold is not None and self._wal.size_bytes >= max(threshold, self._snapshot_bytes)
                and time.monotonic() >= self._compact_retry_at):
            try:
                self._compact_locked()
                self._compact_backoff_s = 0.0
            except (OSError, IndexStoreError):
                # The write itself is already safe in the WAL; failing it now would lie to the caller.
                backoff = max(COMPACT_RETRY_MIN_S, 2 * self._compact_backoff_s)
                self._compact_backoff_s = min(COMPACT_RETRY_MAX_S, backoff)
                self._compact_retry_at = time.monotonic() + self._compact_backoff_s
                logger.exception("automatic compaction of the vector index at %s failed; next try in %.0f s",
                                 self._dir, self._compact_backoff_s)

    def _compact_locked(self) -> None:
        n = len(self._ids)
        if self._vectors.shape[0] > max(_MIN_CAPACITY, 4 * n):
            shrunk = np.empty((_grown_capacity(n, 0), self._dim), dtype=np.float32)
            shrunk[:n] = self._vectors[:n]
            with self._rw.write():
                self._vectors = shrunk
        if self._wal is None or self._dir is None:
            return
        if not self._wal.has_records:
            return
        # No rw lock needed to read: only writers mutate and we hold the writer lock.
        snapshot_path = self._dir / SNAPSHOT_FILE
        write_snapshot(snapshot_path, self._dim, self._ids, self._texts, self._metadata, self._vectors[:n])
        self._snapshot_bytes = snapshot_path.stat().st_size
        if self._manifest is not None and not self._manifest.has_snapshot:  # before the WAL forgets anything
            self._manifest = dataclasses.replace(self._manifest, has_snapshot=True)
            self._manifest.write(self._dir / MANIFEST_FILE)
        self._wal.reset()
        now = utcnow()
        self._last_persisted = self._last_compacted = now
        logger.info("compacted vector index at %s (%d items)", self._dir, n)


_PRIVATE = object()


def _validate_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return dim


def _grown_capacity(needed: int, current: int = 0) -> int:
    return max(needed, 2 * current, _MIN_CAPACITY, needed + needed // 4)


def _as_float32(value: npt.ArrayLike, *, field: str) -> np.ndarray:
    """Any array-like of real numbers as float32 (values beyond float32 range become inf and are
    rejected later as non-finite)."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"{field} must be an array of numbers ({exc})", field=field) from exc
    if arr.dtype.kind not in "fiu":
        raise InvalidVectorError(f"{field} must contain real numbers, got dtype {arr.dtype}", field=field)
    with np.errstate(over="ignore"):
        return arr.astype(np.float32, copy=False)


def _validate_filter(filter: Filter | None) -> list[tuple[str, _FilterKey]]:
    if filter is None:
        return []
    if not isinstance(filter, Mapping):
        raise InvalidQueryError("filter must be an object of metadata key -> value", field="filter")
    conditions: list[tuple[str, _FilterKey]] = []
    for key, value in filter.items():
        if not isinstance(key, str):
            raise InvalidQueryError(f"filter key {key!r} must be a string", field="filter")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidQueryError(f"filter value for {key!r} must be finite", field="filter")
        fk = _filter_key(value)
        if fk is None:
            raise InvalidQueryError(
                f"filter value for {key!r} must be a string, number, boolean or null; got {json_type_name(value)}",
                field="filter",
            )
        conditions.append((key, fk))
    return conditions
