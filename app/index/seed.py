"""Seed a new index directory from a bundle's ``seed_index``, so a first start can search at once.

Why here and this way: the Docker image creates ``/data/index`` (the volume's mount point), so "seed
when the path does not exist" never seeded a container, which then answered every search with no
hits. An index directory counts as new when it holds none of the index's files; anything else (a
real index, or the remains of one) is never overwritten. The copy is staged in the directory and
moved in with ``index.json`` last, under a marker file: the index treats a directory with
``index.json`` as complete, and a directory with the marker but no ``index.json`` (a seed interrupted
between its moves) as new, so the next start seeds it again instead of calling it corrupt. The
index's directory lock is held throughout, so two processes sharing a volume cannot seed at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from app.index.errors import IndexLockedError
from app.index.wal import LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE, WAL_FILE, DirectoryLock, fsync_dir

_STAGING_PREFIX = ".seeding-"
SEED_MARKER = ".seeding"
_INDEX_FILES = (MANIFEST_FILE, WAL_FILE, SNAPSHOT_FILE)


def is_new_index_dir(path: Path) -> bool:
    """True when ``path`` is missing, holds none of an index's files (a freshly made volume), or holds
    the remains of an interrupted seed (the marker, and no ``index.json``)."""
    if (path / SEED_MARKER).exists() and not (path / MANIFEST_FILE).exists():
        return True
    return not any((path / name).exists() for name in _INDEX_FILES)


def seed_index_dir(seed: Path, path: Path) -> bool:
    """Copy the index at ``seed`` into ``path`` if ``path`` is new; True if it was seeded."""
    if not seed.is_dir() or not (seed / MANIFEST_FILE).is_file() or not is_new_index_dir(path):
        return False
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock = DirectoryLock(path)
    except IndexLockedError:  # another process has the index open: it is not new, and opening will say so
        return False
    try:
        if not is_new_index_dir(path):  # seeded by another process while this one waited for nothing
            return False
        for leftover in path.glob(_STAGING_PREFIX + "*"):  # an earlier seed interrupted before its moves
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=path))
        try:
            names = [f.name for f in seed.iterdir() if f.is_file() and f.name != LOCK_FILE]
            for name in names:
                shutil.copyfile(seed / name, staging / name)
                with open(staging / name, "rb") as fh:
                    os.fsync(fh.fileno())
            (path / SEED_MARKER).touch()
            fsync_dir(path)
            for name in sorted(names, key=lambda n: n == MANIFEST_FILE):  # index.json last
                os.replace(staging / name, path / name)
            fsync_dir(path)
            (path / SEED_MARKER).unlink()
            fsync_dir(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return True
