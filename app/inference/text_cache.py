"""LRU cache of text-encoder outputs, keyed by the token ids of one text.

Why: questions and label prompts repeat ("what color is the circle?"), and the text encoder
(MiniLM) costs about as much per item as the image encoder. The key is the bytes of the id row
up to its own length (padding excluded), so the same text hits whatever batch it was padded in;
the key is the *ids*, not the raw string, so texts that tokenise identically (whitespace,
stripped control characters) share one entry.

Values are the row's outputs exactly as the session produced them (token-axis outputs trimmed to
the row's length), stored read-only: a hit gives the same numbers as a miss. Memory: one entry of
MiniLM holds ``length x 384`` float32 token vectors (1.5 KB per token: 18 KB for a 12-token
question, 98 KB at the 64-token limit), so 1024 entries cost 20-100 MB.

Thread-safe (one lock); hits and misses are counted in ``mmfusion_text_cache_total{result}``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from app.core import metrics

CacheValue = Mapping[str, np.ndarray]


def freeze(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Own, read-only copies: a cached row can be neither changed by a caller nor pin a whole batch."""
    frozen: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        copy = np.array(value, copy=True)
        copy.setflags(write=False)
        frozen[name] = copy
    return frozen


class TextCache:
    """A bounded LRU map ``token-id bytes -> per-row outputs``; ``capacity`` 0 disables it."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._data: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def key(ids: np.ndarray, length: int) -> bytes:
        """The row's ids up to its mask length, as int64 bytes (the dtype is fixed so keys compare)."""
        return np.ascontiguousarray(ids[:length], dtype=np.int64).tobytes()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        if not self.enabled:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        metrics.TEXT_CACHE.labels("hit" if value is not None else "miss").inc()
        return value

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Store (a frozen copy of) ``outputs``; returns what is stored, for the caller to use."""
        value = freeze(outputs)
        if not self.enabled:
            return value
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
            size = len(self._data)
        metrics.TEXT_CACHE_ENTRIES.set(size)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
        metrics.TEXT_CACHE_ENTRIES.set(0)
