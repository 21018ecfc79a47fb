"""Freed C-heap pages go back to the OS once the server is idle (app/core/memory.py)."""

from __future__ import annotations

import platform

import psutil
import pytest

from app.core.memory import release_free_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_pages_that_free_alone_keeps() -> None:
    proc = psutil.Process()
    # 60 KB buffers come from the heap (below the mmap threshold); the last one pins the heap's top,
    # so free() alone cannot shrink it and the 150 MB below stay resident
    chunks = [bytearray(60_000) for _ in range(2_500)]
    pin = bytearray(60_000)
    for c in chunks:
        c[::4096] = b"x" * len(c[::4096])  # touch every page
    del chunks
    before = proc.memory_info().rss
    assert release_free_heap() is True
    after = proc.memory_info().rss
    del pin
    assert before - after > 100 * 2**20, (before, after)
