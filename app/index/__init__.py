"""Embedded exact vector index with crash-safe persistence (see :mod:`app.index.store`).

Never imports torch: this package is part of the serving stack.
"""

from app.index.errors import (
    DimensionMismatchError,
    IndexBundleMismatchError,
    IndexClosedError,
    IndexCorruptError,
    IndexLockedError,
    IndexStoreError,
    IndexWriteError,
    InvalidItemError,
    InvalidItemIdError,
    InvalidQueryError,
    InvalidVectorError,
    ItemNotFoundError,
)
from app.index.store import (
    BACKEND,
    MAX_K,
    Filter,
    Hit,
    IndexStats,
    Item,
    JSONScalar,
    JSONValue,
    Metadata,
    VectorIndex,
    exact_top_k,
    validate_item_id,
)
from app.index.wal import FORMAT_VERSION, MANIFEST_FILE, SNAPSHOT_FILE, WAL_FILE, IndexManifest

__all__ = [
    "BACKEND",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MAX_K",
    "SNAPSHOT_FILE",
    "WAL_FILE",
    "DimensionMismatchError",
    "Filter",
    "Hit",
    "IndexBundleMismatchError",
    "IndexClosedError",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexManifest",
    "IndexStats",
    "IndexStoreError",
    "IndexWriteError",
    "InvalidItemError",
    "InvalidItemIdError",
    "InvalidQueryError",
    "InvalidVectorError",
    "Item",
    "ItemNotFoundError",
    "JSONScalar",
    "JSONValue",
    "Metadata",
    "VectorIndex",
    "exact_top_k",
    "validate_item_id",
]
