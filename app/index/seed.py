"""Seed a new index directory from a bundle's ``seed_index``, so a first start can search at once.

Why here and this way: the Docker image creates ``/data/index`` (the volume's mount point), so "seed
when the path does not exist" never seeded a container, which then answered every search with no
hits. An index directory counts as new when it holds none of the index's files; anything else (a
real index, or the remains of one) is never overwritten. The copy is staged in the directory and
moved in with ``index.json`` last: the index treats a directory with ``index.json`` as complete, so
an interrupted seed never looks like a finished, emptier index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from app.index.wal import LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE, WAL_FILE, fsync_dir

_STAGING_PREFIX = ".seeding-"
_INDEX_FILES = (MANIFEST_FILE, WAL_FILE, SNAPSHOT_FILE)


def is_new_index_dir(path: Path) -> bool:
    """True when ``path`` is missing or holds none of an index's files (a freshly made volume)."""
    return not any((path / name).exists() for name in _INDEX_FILES)


def seed_index_dir(seed: Path, path: Path) -> bool:
    """Copy the index at ``seed`` into ``path`` if ``path`` is new; True if it was seeded."""
    if not seed.is_dir() or not (seed / MANIFEST_FILE).is_file() or not is_new_index_dir(path):
        return False
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob(_STAGING_PREFIX + "*"):  # an earlier seed interrupted before its moves
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=path))
    try:
        names = [f.name for f in seed.iterdir() if f.is_file() and f.name != LOCK_FILE]
        for name in names:
            shutil.copyfile(seed / name, staging / name)
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        for name in sorted(names, key=lambda n: n == MANIFEST_FILE):  # index.json last
            os.replace(staging / name, path / name)
        fsync_dir(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
