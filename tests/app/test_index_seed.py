"""A bundle's seed index fills a new index directory, including one that exists but is empty (the
Docker image's /data/index), and never overwrites anything that is, or was, an index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.index import VectorIndex
from app.index.seed import seed_index_dir

IDENTITY = {"bundle_name": "b", "bundle_version": "1", "dim": 4}


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    path = tmp_path / "seed"
    index = VectorIndex.open(path, **IDENTITY)
    index.add("one", np.array([1, 0, 0, 0], np.float32), text="one")
    index.add("two", np.array([0, 1, 0, 0], np.float32), text="two")
    index.compact()
    index.add("three", np.array([0, 0, 1, 0], np.float32), text="three")  # in the WAL, after the snapshot
    index.close()
    return path


def count(path: Path) -> int:
    index = VectorIndex.open(path, **IDENTITY)
    try:
        return index.count
    finally:
        index.close()


def test_a_missing_directory_is_seeded(seed: Path, tmp_path: Path) -> None:
    target = tmp_path / "data" / "index"
    assert seed_index_dir(seed, target) is True
    assert count(target) == 3


def test_an_existing_empty_directory_is_seeded_like_a_fresh_volume(seed: Path, tmp_path: Path) -> None:
    target = tmp_path / "index"
    target.mkdir()
    assert seed_index_dir(seed, target) is True
    assert count(target) == 3
    assert not list(target.glob(".seeding-*"))


def test_an_existing_index_is_never_overwritten(seed: Path, tmp_path: Path) -> None:
    target = tmp_path / "index"
    index = VectorIndex.open(target, **IDENTITY)
    index.add("mine", np.array([0, 0, 0, 1], np.float32))
    index.close()
    assert seed_index_dir(seed, target) is False
    assert count(target) == 1


def test_the_remains_of_an_index_are_left_for_the_corruption_check(seed: Path, tmp_path: Path) -> None:
    target = tmp_path / "index"
    target.mkdir()
    (target / "wal.log").write_bytes(b"user data")
    assert seed_index_dir(seed, target) is False
    assert (target / "wal.log").read_bytes() == b"user data"


def test_an_interrupted_earlier_seed_is_cleaned_up_and_redone(seed: Path, tmp_path: Path) -> None:
    target = tmp_path / "index"
    (target / ".seeding-abc").mkdir(parents=True)
    (target / ".seeding-abc" / "snapshot.bin").write_bytes(b"partial")
    assert seed_index_dir(seed, target) is True
    assert not (target / ".seeding-abc").exists()
    assert count(target) == 3


def test_a_seed_interrupted_between_its_moves_is_redone_at_the_next_start(seed: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import os as os_module

    import app.index.seed as seed_module

    target = tmp_path / "index"
    real_replace = os_module.replace

    def crash_before_index_json(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).name == "index.json":
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(seed_module.os, "replace", crash_before_index_json)
    with pytest.raises(KeyboardInterrupt):
        seed_index_dir(seed, target)
    monkeypatch.undo()
    assert (target / "wal.log").exists() and not (target / "index.json").exists()  # looks corrupt, but marked
    assert seed_index_dir(seed, target) is True
    assert count(target) == 3 and not (target / ".seeding").exists()


def test_a_directory_another_process_has_open_is_not_seeded(seed: Path, tmp_path: Path) -> None:
    from app.index.wal import DirectoryLock

    target = tmp_path / "index"
    target.mkdir()
    held = DirectoryLock(target)
    try:
        assert seed_index_dir(seed, target) is False
    finally:
        held.release()
