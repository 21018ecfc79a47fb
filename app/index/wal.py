"""On-disk persistence of the vector index: manifest, write-ahead log, snapshot, directory lock.

Layout of an index directory::

    index.json     bundle identity: {"format_version", "bundle_name", "bundle_version", "dim", "created_at",
                   "embedding_fingerprint" (optional), "has_snapshot" (optional: true once compacted)}
    snapshot.bin   full state at the last compaction (absent until the first one)
    wal.log        every acknowledged change since that snapshot, append-only
    LOCK           flock()ed while a VectorIndex has the directory open

State = snapshot + replay of the WAL. Every file that is rewritten (index.json, snapshot.bin and the
emptied wal.log) is written to ``<name>.tmp``, fsynced, ``os.replace``d over the old one and the
directory fsynced, so a crash leaves either the old or the new file, never a mix. Only wal.log is
appended to in place, and each record carries a CRC32, so a crash mid-append leaves at most one torn
record at the very end, which was never acknowledged and is dropped at open.

Replaying a WAL over a snapshot that already contains its records is harmless (every record is an
idempotent last-writer-wins put or delete of one id), which is what makes "write snapshot, then
empty the WAL" crash-safe without a sequence number: a crash between the two steps only replays
changes that the snapshot already has.

WAL file: a 16-byte header ``<8s magic "MMFXWAL\\0"><u32 format_version><u32 dim>``, then records::

    <u32 payload_len><u32 crc32(payload)><u32 crc32(first 8 header bytes)>  payload
    payload := <u8 op><3 bytes zero><u32 json_len> json  vector
    op 1 (put):    json = {"id": str, "text": str|null, "metadata": {...}}, vector = dim x float32 LE
    op 2 (delete): json = {"id": str}, no vector

The header CRC lets replay trust a record's length before reading it, so a flipped bit in a length
field is reported as corruption instead of being mistaken for a torn tail (which would silently
drop every later record).

Snapshot file (one file, so one atomic rename publishes ids, metadata and vectors together)::

    <8s magic "MMFXSNP\\0"><u32 format_version><u32 dim><u64 count><u64 items_len>
    <u32 crc32(items)><u32 crc32(vectors)><u32 crc32(all preceding header bytes)>
    items   : items_len bytes of UTF-8 JSON lines, one per row: {"id","text","metadata"}
    vectors : count x dim float32 little-endian, row i belongs to line i

No pickle anywhere: a snapshot is data, never code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.index.errors import IndexCorruptError, IndexLockedError, IndexStoreError, IndexWriteError

try:  # POSIX only; elsewhere the directory is simply not locked.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("mmfusion.index")  # under "mmfusion": the service's JSON log lines

FORMAT_VERSION = 1
MANIFEST_FILE = "index.json"
WAL_FILE = "wal.log"
SNAPSHOT_FILE = "snapshot.bin"
LOCK_FILE = "LOCK"
TMP_SUFFIX = ".tmp"

OP_PUT = 1
OP_DELETE = 2

_WAL_MAGIC = b"MMFXWAL\x00"
_WAL_FILE_HEADER = struct.Struct("<8sII")  # magic, format_version, dim
WAL_HEADER_SIZE = _WAL_FILE_HEADER.size
_RECORD_HEADER = struct.Struct("<III")  # payload_len, payload_crc32, header_crc32
_PAYLOAD_HEAD = struct.Struct("<B3xI")  # op, json_len
# A record is one item (<= 256-char id, bounded text and metadata, one vector), so anything larger
# than this in a header whose own CRC checks out is corruption, not data.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

_SNAP_MAGIC = b"MMFXSNP\x00"
_SNAP_HEADER = struct.Struct("<8sIIQQII")  # magic, version, dim, count, items_len, items_crc, vectors_crc
_SNAP_HEADER_CRC = struct.Struct("<I")
SNAPSHOT_HEADER_SIZE = _SNAP_HEADER.size + _SNAP_HEADER_CRC.size

_WRITE_CHUNK_BYTES = 8 * 1024 * 1024
_SNAPSHOT_ROWS_PER_CHUNK = 16_384
_LE_F32 = np.dtype("<f4")


def canonical_json(value: Any) -> str:
    """The one JSON spelling used in memory, in the WAL and in snapshots (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------------
# Small filesystem helpers
# --------------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation in ``path`` durable (the directory entry is data too)."""
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` may write less than asked (signals, pipes, huge buffers); loop until done."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it holds either its old or its new content, whole."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_stale_tmp_files(directory: Path) -> None:
    """Leftovers of a crash during an atomic write; the real files are intact, so just drop them."""
    for name in (MANIFEST_FILE, WAL_FILE, SNAPSHOT_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / (name + TMP_SUFFIX)).unlink()


class DirectoryLock:
    """An exclusive ``flock`` on ``<dir>/LOCK`` held for the life of an open index.

    flock locks belong to the open file description, so a second ``VectorIndex.open`` of the same
    directory is refused even inside one process, and the lock vanishes with the process (no stale
    lock files after ``kill -9``).
    """

    def __init__(self, directory: Path):
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover - Windows
            return
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(directory) from None
        except BaseException:
            os.close(fd)
            raise
        self._close = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        if self._close is not None:
            self._close()  # closing the descriptor drops the flock; a finalizer runs at most once


# --------------------------------------------------------------------------------------------------
# Manifest (index.json)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexManifest:
    """Which bundle produced the vectors in this directory; checked on every open."""

    bundle_name: str
    bundle_version: str
    dim: int
    created_at: datetime
    format_version: int = FORMAT_VERSION
    embedding_fingerprint: str | None = None
    """The bundle's ``BundleManifest.embedding_fingerprint()``; None in indexes written before it existed
    (the key is optional, so the format version did not change)."""
    has_snapshot: bool = False
    """A snapshot has been written (compaction resets the WAL, so from then on the snapshot holds items
    the WAL does not): a missing ``snapshot.bin`` is then corruption, not an empty index. Optional key,
    recorded at the first compaction or at the first open that finds a snapshot."""

    @property
    def identity(self) -> tuple[str, str, int]:
        return (self.bundle_name, self.bundle_version, self.dim)

    def accepts(self, identity: tuple[str, str, int], embedding_fingerprint: str | None) -> bool:
        """Whether vectors of the bundle ``identity`` (name, version, dim) with this fingerprint belong in
        this index: the same identity, and no differing fingerprint (one side without a fingerprint, an
        index written before they existed or a caller that has none, cannot differ)."""
        return self.identity == identity and not (
            embedding_fingerprint and self.embedding_fingerprint
            and self.embedding_fingerprint != embedding_fingerprint)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "bundle_name": self.bundle_name,
                "bundle_version": self.bundle_version,
                "dim": self.dim,
                "created_at": self.created_at.isoformat(),
            }
            | ({"embedding_fingerprint": self.embedding_fingerprint} if self.embedding_fingerprint else {})
            | ({"has_snapshot": True} if self.has_snapshot else {}),
            indent=2,
        )

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, (self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> IndexManifest:
        """Read ``index.json``; anything unexpected is corruption (it is only ever written whole)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexCorruptError(path, f"cannot be read as JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise IndexCorruptError(path, "is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexCorruptError(
                path,
                f"has format_version {version!r}, but this mmfusion reads only format_version "
                f"{FORMAT_VERSION} (was it written by another mmfusion version?)",
            )
        name, bundle_version, dim, created = (
            raw.get("bundle_name"),
            raw.get("bundle_version"),
            raw.get("dim"),
            raw.get("created_at"),
        )
        if not isinstance(name, str) or not isinstance(bundle_version, str):
            raise IndexCorruptError(path, "lacks string 'bundle_name' / 'bundle_version'")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise IndexCorruptError(path, f"has an invalid 'dim' {dim!r}")
        try:
            created_at = datetime.fromisoformat(created) if isinstance(created, str) else None
        except ValueError:
            created_at = None
        if created_at is None:
            raise IndexCorruptError(path, f"has an invalid 'created_at' {created!r}")
        fingerprint = raw.get("embedding_fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise IndexCorruptError(path, f"has an invalid 'embedding_fingerprint' {fingerprint!r}")
        has_snapshot = raw.get("has_snapshot", False)
        if not isinstance(has_snapshot, bool):
            raise IndexCorruptError(path, f"has an invalid 'has_snapshot' {has_snapshot!r}")
        return cls(bundle_name=name, bundle_version=bundle_version, dim=dim, created_at=created_at,
                   embedding_fingerprint=fingerprint, has_snapshot=has_snapshot)


# --------------------------------------------------------------------------------------------------
# WAL records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PutRecord:
    """Add or replace one item. ``vector`` is already L2-normalised float32."""

    item_id: str
    text: str | None
    metadata_json: str
    metadata: dict[str, Any]
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class DeleteRecord:
    item_id: str


Record = PutRecord | DeleteRecord


def _frame(payload: bytes) -> bytes:
    head = struct.pack("<II", len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def encode_put(item_id: str, text: str | None, metadata_json: str, vector: np.ndarray) -> bytes:
    """One framed put record. ``metadata_json`` must already be canonical JSON of a dict."""
    body = (
        '{"id":' + json.dumps(item_id) + ',"text":' + canonical_json(text) + ',"metadata":' + metadata_json + "}"
    ).encode("utf-8")
    vec = np.ascontiguousarray(vector, dtype=_LE_F32).tobytes()
    return _frame(_PAYLOAD_HEAD.pack(OP_PUT, len(body)) + body + vec)


def encode_delete(item_id: str) -> bytes:
    body = ('{"id":' + json.dumps(item_id) + "}").encode("utf-8")
    return _frame(_PAYLOAD_HEAD.pack(OP_DELETE, len(body)) + body)


def decode_payload(payload: bytes, dim: int) -> Record:
    """Inverse of the encoders; raises ``ValueError`` on anything malformed."""
    if len(payload) < _PAYLOAD_HEAD.size:
        raise ValueError("payload shorter than its fixed header")
    op, json_len = _PAYLOAD_HEAD.unpack_from(payload)
    start = _PAYLOAD_HEAD.size
    end = start + json_len
    if end > len(payload):
        raise ValueError("JSON part runs past the end of the payload")
    obj = json.loads(payload[start:end].decode("utf-8"))
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise ValueError("record JSON lacks a string 'id'")
    rest = len(payload) - end
    if op == OP_DELETE:
        if rest:
            raise ValueError("delete record carries trailing bytes")
        return DeleteRecord(obj["id"])
    if op != OP_PUT:
        raise ValueError(f"unknown record op {op}")
    if rest != dim * 4:
        raise ValueError(f"put record has {rest} vector bytes, expected {dim * 4}")
    text, metadata = obj.get("text"), obj.get("metadata")
    if text is not None and not isinstance(text, str):
        raise ValueError("record 'text' is neither a string nor null")
    if not isinstance(metadata, dict):
        raise ValueError("record 'metadata' is not an object")
    vector = np.frombuffer(payload, dtype=_LE_F32, count=dim, offset=end)
    return PutRecord(obj["id"], text, canonical_json(metadata), metadata, vector)


# --------------------------------------------------------------------------------------------------
# WAL file
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WalReplay:
    records: int
    valid_bytes: int
    dropped_bytes: int


def _rest_is_zero(f: Any, start: int, end: int) -> bool:
    f.seek(start)
    remaining = end - start
    while remaining > 0:
        chunk = f.read(min(remaining, 1 << 20))
        if not chunk or chunk.count(0) != len(chunk):
            return False
        remaining -= len(chunk)
    return True


def replay_wal(path: Path, dim: int, apply: Callable[[Record], None], *, index_dir: Path) -> WalReplay:
    """Feed every intact record of ``path`` to ``apply``, in order.

    Damage confined to the last record (short header, short payload, bad payload CRC on the final
    record, or a zero-filled tail) is a write that a crash interrupted before it was acknowledged:
    it is reported in the result (and logged) and must be truncated away by the caller. Damage
    anywhere else means acknowledged data is lost, so it raises :class:`IndexCorruptError`.
    """

    def corrupt(problem: str) -> IndexCorruptError:
        return IndexCorruptError(path, problem, index_dir=index_dir)

    size = path.stat().st_size
    records = 0
    with path.open("rb") as f:
        head = f.read(WAL_HEADER_SIZE)
        if len(head) < WAL_HEADER_SIZE:
            raise corrupt(f"file header is {len(head)} bytes, expected {WAL_HEADER_SIZE}")
        magic, version, wal_dim = _WAL_FILE_HEADER.unpack(head)
        if magic != _WAL_MAGIC:
            raise corrupt("file does not start with the mmfusion WAL magic")
        if version != FORMAT_VERSION:
            raise corrupt(f"WAL format_version {version} is not supported (expected {FORMAT_VERSION})")
        if wal_dim != dim:
            raise corrupt(f"WAL was written for dim {wal_dim}, index.json says {dim}")
        offset = WAL_HEADER_SIZE
        torn: str | None = None
        while offset < size:
            remaining = size - offset
            if remaining < _RECORD_HEADER.size:
                torn = f"{remaining}-byte fragment of a record header"
                break
            header = f.read(_RECORD_HEADER.size)
            payload_len, payload_crc, header_crc = _RECORD_HEADER.unpack(header)
            if zlib.crc32(header[:8]) != header_crc:
                if _rest_is_zero(f, offset, size):
                    torn = "zero-filled tail"
                    break
                raise corrupt(f"record header at byte {offset} fails its CRC32 check")
            if payload_len > MAX_PAYLOAD_BYTES:
                raise corrupt(f"record at byte {offset} claims an impossible length {payload_len}")
            end = offset + _RECORD_HEADER.size + payload_len
            if end > size:
                torn = f"record of {payload_len} bytes with only {remaining - _RECORD_HEADER.size} written"
                break
            payload = f.read(payload_len)
            if zlib.crc32(payload) != payload_crc:
                if end == size:
                    torn = "final record fails its CRC32 check"
                    break
                raise corrupt(
                    f"record at byte {offset} fails its CRC32 check and {size - end} bytes of later "
                    "records follow it (damage in the middle of the log, not a torn write)"
                )
            try:
                record = decode_payload(payload, dim)
            except (ValueError, UnicodeDecodeError) as exc:
                raise corrupt(f"record at byte {offset} has a valid CRC but cannot be decoded ({exc})") from exc
            apply(record)
            records += 1
            offset = end
    if torn is not None:
        logger.warning(
            "vector index WAL %s: dropping %d bytes at byte %d (%s); this is a write interrupted by a "
            "crash, which was never acknowledged, so no acknowledged data is lost",
            path,
            size - offset,
            offset,
            torn,
        )
    return WalReplay(records=records, valid_bytes=offset, dropped_bytes=size - offset)


class WriteAheadLog:
    """The append side of ``wal.log``: one ``os.write`` per batch of records, optionally fsynced.

    Not thread-safe on its own; the index serialises writers with its writer lock.
    """

    def __init__(self, path: Path, dim: int, *, durable: bool):
        self.path = path
        self.dim = dim
        self.durable = durable
        self._fd: int | None = None
        self._fd_close: weakref.finalize | None = None
        self._size = 0
        self._failed: str | None = None

    def _adopt_fd(self, fd: int) -> None:
        # Closed by close()/reset(), or by the garbage collector if the index is dropped unclosed.
        self._fd = fd
        self._fd_close = weakref.finalize(self, os.close, fd)

    def _release_fd(self) -> None:
        if self._fd_close is not None:
            self._fd_close()
        self._fd = None
        self._fd_close = None

    @staticmethod
    def create_empty(path: Path, dim: int) -> None:
        """Atomically make ``path`` an empty log (header only)."""
        atomic_write_bytes(path, _WAL_FILE_HEADER.pack(_WAL_MAGIC, FORMAT_VERSION, dim))

    @classmethod
    def open(
        cls,
        path: Path,
        dim: int,
        *,
        durable: bool,
        apply: Callable[[Record], None],
        index_dir: Path,
    ) -> tuple[WriteAheadLog, WalReplay]:
        """Replay ``path`` into ``apply``, cut off a torn tail, and open it for appending."""
        replay = replay_wal(path, dim, apply, index_dir=index_dir)
        wal = cls(path, dim, durable=durable)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if replay.dropped_bytes:
                # Later appends must not land behind the garbage: that would turn a harmless torn
                # tail into "corruption in the middle" at the next open.
                os.ftruncate(fd, replay.valid_bytes)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        wal._adopt_fd(fd)
        wal._size = replay.valid_bytes
        return wal, replay

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def has_records(self) -> bool:
        return self._size > WAL_HEADER_SIZE

    def append(self, records: Iterable[bytes]) -> None:
        """Append framed records; with ``durable`` they are fsynced before this returns.

        On an I/O error the file is truncated back to where this call started, so a failed
        (unacknowledged) write never reappears after a restart.
        """
        fd = self._require_fd()
        start = self._size
        written = 0
        try:
            buf: list[bytes] = []
            buffered = 0
            for rec in records:
                buf.append(rec)
                buffered += len(rec)
                if buffered >= _WRITE_CHUNK_BYTES:
                    _write_all(fd, b"".join(buf))
                    written += buffered
                    buf, buffered = [], 0
            if buf:
                _write_all(fd, b"".join(buf))
                written += buffered
            if self.durable:
                os.fsync(fd)
        except BaseException as exc:
            rolled_back = True
            try:
                os.ftruncate(fd, start)
            except OSError as rollback:  # pragma: no cover - disk gone
                self._failed = f"could not roll back a failed append ({rollback})"
                rolled_back = False
            if isinstance(exc, OSError):  # a typed answer (507 when the disk is full), not a bare 500
                raise IndexWriteError(exc, self.path, stored=not rolled_back) from exc
            raise
        self._size = start + written

    def sync(self) -> None:
        os.fsync(self._require_fd())

    def reset(self) -> None:
        """Atomically replace the log by an empty one (after its records went into a snapshot)."""
        self.create_empty(self.path, self.dim)
        self._release_fd()
        self._adopt_fd(os.open(self.path, os.O_WRONLY | os.O_APPEND))
        self._size = WAL_HEADER_SIZE
        self._failed = None

    def close(self) -> None:
        self._release_fd()

    def _require_fd(self) -> int:
        if self._failed is not None:
            raise IndexStoreError(f"vector index WAL {self.path} is unusable: {self._failed}")
        if self._fd is None:
            raise IndexStoreError(f"vector index WAL {self.path} is closed")
        return self._fd


# --------------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------------


def write_snapshot(
    path: Path,
    dim: int,
    ids: Sequence[str],
    texts: Sequence[str | None],
    metadata_json: Sequence[str],
    vectors: np.ndarray,
) -> None:
    """Write the full state to ``path`` atomically (tmp file, fsync, rename, fsync dir).

    Streams in chunks, so the only extra memory is one chunk of JSON lines and vector rows.
    """
    count = len(ids)
    if vectors.shape != (count, dim):
        raise ValueError(f"vectors shape {vectors.shape} does not match {count} items of dim {dim}")
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with tmp.open("wb") as f:
            f.write(b"\0" * SNAPSHOT_HEADER_SIZE)
            items_crc = 0
            items_len = 0
            for start in range(0, count, _SNAPSHOT_ROWS_PER_CHUNK):
                stop = min(start + _SNAPSHOT_ROWS_PER_CHUNK, count)
                block = "".join(
                    '{"id":'
                    + json.dumps(ids[i])
                    + ',"text":'
                    + canonical_json(texts[i])
                    + ',"metadata":'
                    + metadata_json[i]
                    + "}\n"
                    for i in range(start, stop)
                ).encode("utf-8")
                items_crc = zlib.crc32(block, items_crc)
                items_len += len(block)
                f.write(block)
            vectors_crc = 0
            for start in range(0, count, _SNAPSHOT_ROWS_PER_CHUNK):
                chunk = np.ascontiguousarray(vectors[start : start + _SNAPSHOT_ROWS_PER_CHUNK], dtype=_LE_F32)
                view = memoryview(chunk).cast("B")
                vectors_crc = zlib.crc32(view, vectors_crc)
                f.write(view)
            head = _SNAP_HEADER.pack(_SNAP_MAGIC, FORMAT_VERSION, dim, count, items_len, items_crc, vectors_crc)
            f.seek(0)
            f.write(head + _SNAP_HEADER_CRC.pack(zlib.crc32(head)))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A half-written snapshot (disk full, a size limit) would keep its space until the next open.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(slots=True)
class Snapshot:
    """A loaded snapshot. ``vectors`` has ``capacity >= count`` rows; rows past ``count`` are unset."""

    ids: list[str]
    texts: list[str | None]
    metadata: list[dict[str, Any]]
    vectors: np.ndarray
    count: int


def read_snapshot(path: Path, dim: int, *, capacity_for: Callable[[int], int], index_dir: Path) -> Snapshot:
    """Load and fully verify ``path``; any damage raises :class:`IndexCorruptError` naming it.

    Vectors are read straight into a buffer of ``capacity_for(count)`` rows, so the index can keep
    appending without first copying 1.5 GB (1M x 384 floats) into a bigger array.
    """

    def corrupt(problem: str) -> IndexCorruptError:
        return IndexCorruptError(path, problem, index_dir=index_dir)

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(SNAPSHOT_HEADER_SIZE)
            if len(head) < SNAPSHOT_HEADER_SIZE:
                raise corrupt(f"header is truncated ({len(head)} of {SNAPSHOT_HEADER_SIZE} bytes)")
            (header_crc,) = _SNAP_HEADER_CRC.unpack_from(head, _SNAP_HEADER.size)
            if zlib.crc32(head[: _SNAP_HEADER.size]) != header_crc:
                raise corrupt("header fails its CRC32 check")
            magic, version, snap_dim, count, items_len, items_crc, vectors_crc = _SNAP_HEADER.unpack_from(head)
            if magic != _SNAP_MAGIC:
                raise corrupt("file does not start with the mmfusion snapshot magic")
            if version != FORMAT_VERSION:
                raise corrupt(f"snapshot format_version {version} is not supported")
            if snap_dim != dim:
                raise corrupt(f"snapshot has dim {snap_dim}, index.json says {dim}")
            expected = SNAPSHOT_HEADER_SIZE + items_len + count * dim * 4
            if size != expected:
                raise corrupt(f"file is {size} bytes, its header implies {expected}")
            items = f.read(items_len)
            if zlib.crc32(items) != items_crc:
                raise corrupt("item section (ids, text, metadata) fails its CRC32 check")
            vectors = np.empty((capacity_for(count), dim), dtype=np.float32)
            if count:  # memoryview cannot cast an empty 2-D view
                view = memoryview(vectors[:count]).cast("B")
                got = f.readinto(view)
                if got != len(view):
                    raise corrupt(f"vector section is short ({got} of {len(view)} bytes)")
                if zlib.crc32(view) != vectors_crc:
                    raise corrupt("vector section fails its CRC32 check")
            elif vectors_crc != 0:
                raise corrupt("vector section of an empty snapshot has a non-empty CRC32")
    except OSError as exc:
        raise corrupt(f"cannot be read ({exc})") from exc
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        vectors[:count].byteswap(inplace=True)

    ids: list[str] = []
    texts: list[str | None] = []
    metadata: list[dict[str, Any]] = []
    lines = items.split(b"\n")
    if lines[-1] != b"" or len(lines) - 1 != count:
        raise corrupt(f"item section has {len(lines) - 1} lines, header says {count}")
    for row, line in enumerate(lines[:-1]):
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"item line {row} is not JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise corrupt(f"item line {row} is not a JSON object")
        item_id, text, meta = obj.get("id"), obj.get("text"), obj.get("metadata")
        if not isinstance(item_id, str) or not (text is None or isinstance(text, str)) or not isinstance(meta, dict):
            raise corrupt(f"item line {row} lacks a string 'id', string/null 'text' or object 'metadata'")
        ids.append(item_id)
        texts.append(text)
        metadata.append(meta)
    return Snapshot(ids=ids, texts=texts, metadata=metadata, vectors=vectors, count=count)


def file_mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
