"""Write-ahead log: points are durable on local disk before the MQTT message is acknowledged.

The sink appends each encoded batch (line-protocol bytes) and calls :meth:`WriteAheadLog.sync` once
per batch; only then is the message acked. A writer task drains :meth:`WriteAheadLog.pending` into
the database and calls :meth:`WriteAheadLog.confirm` with the last id the database accepted.

On disk, ``dir`` holds append-only segments ``wal-<16-digit first id>.seg`` and a ``confirmed``
watermark file. A record is a 20-byte header followed by the payload::

    magic b"FGW1" | length u32 | crc32 u32 | record id u64     (little-endian)

The crc covers the length, the record id and the payload, so a flipped bit anywhere in a record is
detected. A torn or corrupt tail (e.g. after SIGKILL or power loss) is logged and cut off at start-up.

Every call does bounded work, so the asyncio pipeline can run it with ``asyncio.to_thread``; the
methods are thread-safe (the acking path and the writer task may run in different threads).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Annotated, NamedTuple, Self

from pydantic import BaseModel, ByteSize, ConfigDict, Field

from gateway.errors import GatewayError
from gateway.stats import WalSnapshot

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "HEADER_BYTES",
    "BufferConfig",
    "WalError",
    "WalFullError",
    "WalRecord",
    "WriteAheadLog",
]

_log = logging.getLogger("gateway.wal")

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_SEGMENT_BYTES = 16 << 20

_MAGIC = b"FGW1"
_HEADER = struct.Struct("<4sIIQ")  # magic, payload length, crc32, record id
_CRC_PREFIX = struct.Struct("<IQ")  # what the crc covers before the payload: length, record id
HEADER_BYTES = _HEADER.size
_MAX_PAYLOAD = 0xFFFF_FFFF

_WATERMARK = struct.Struct("<4sQI")  # magic, confirmed id, crc32 of the first 12 bytes
_WATERMARK_MAGIC = b"FGWC"
_WATERMARK_NAME = "confirmed"
_LOCK_NAME = "LOCK"
_SEGMENT_RE = re.compile(r"^wal-(\d{16})\.seg$")

# Appended bytes are handed to the kernel once this much is buffered, so memory stays bounded.
_WRITE_CHUNK = 1 << 20
# How much one read_from() step pulls from disk at most (one record may be larger).
_ITER_RECORDS = 256
_ITER_BYTES = 1 << 20


class WalError(GatewayError):
    """The write-ahead log failed (I/O error, locked by another process, or closed)."""


class WalFullError(WalError):
    """Appending would exceed ``max_bytes`` of unconfirmed data; apply back-pressure and retry later."""


class WalRecord(NamedTuple):
    """One record read back from the log: its id and the payload bytes as appended."""

    id: int
    payload: bytes


class BufferConfig(BaseModel):
    """The ``[buffer]`` section: the local write-ahead log between acking and the database.

    Sizes accept integers (bytes) or strings such as ``"512MiB"`` or ``"1GB"`` (SI and IEC units).
    With ``enabled = false`` there is no WAL: a message is acked only after the database accepted
    the write instead, so a database outage stops acking (the broker holds the backlog).

    ``checkpoint_interval_s``: how often the derived state (detectors, features, OEE) is checkpointed
    into ``dir``; WAL records after the last checkpoint are kept, even once written, so a restart can
    re-compute them. 0 = only at shutdown.

    >>> BufferConfig(max_bytes="512MiB").max_bytes
    536870912
    """

    model_config = ConfigDict(extra="forbid")

    dir: Path = Path("/var/lib/factory-gateway/buffer")
    max_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(DEFAULT_MAX_BYTES)
    segment_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(DEFAULT_SEGMENT_BYTES)
    enabled: bool = True
    checkpoint_interval_s: float = Field(default=60.0, ge=0, allow_inf_nan=False)


@dataclass(slots=True, eq=False)
class _Segment:
    path: Path
    base: int  # the id in the file name: the next record id when the segment was created
    ids: array[int] = field(default_factory=lambda: array("Q"))
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    # Wall-clock append time per record (recovered records: the file's mtime, a lower bound of their age).
    times: array[float] = field(default_factory=lambda: array("d"))
    size: int = 0  # bytes of good records; the file is never longer once it is active
    synced: int = 0  # how many of the records are known durable; readers stop there

    def end_of(self, index: int) -> int:
        """Byte offset just past record ``index``."""
        return self.offsets[index + 1] if index + 1 < len(self.offsets) else self.size


def _segment_name(base: int) -> str:
    return f"wal-{base:016d}.seg"


def _record_crc(length: int, record_id: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(length, record_id)))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class WriteAheadLog:
    """A bounded, crash-safe, segmented append-only log of byte payloads.

    Opening scans the existing segments and recovers from a torn tail; only records above the
    persisted ``confirmed`` watermark are pending (at-least-once: a record confirmed just before a
    crash may be replayed, one that was synced is never lost).

    Parameters
    ----------
    dir : path
        Directory of the log; created if missing. Only one process may open it at a time.
    max_bytes : int
        Upper bound on unconfirmed bytes (headers included); :meth:`append` raises
        :class:`WalFullError` beyond it.
    segment_bytes : int
        Size at which the active segment is closed and a new one started.
    retain : bool
        Keep confirmed segments until :meth:`cover` says a checkpoint of the derived state covers them
        (a restart re-computes the records after the last checkpoint). Off: confirmed segments go at once.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with WriteAheadLog(tmp, max_bytes=1 << 20) as wal:
    ...         first = wal.append(b"cnc,machine=m1 temp_c=61.2 1")
    ...         second = wal.append(b"cnc,machine=m1 temp_c=61.3 2")
    ...         wal.sync()  # one fsync for both
    ...         wal.confirm(first)  # the database has the first batch
    ...     with WriteAheadLog(tmp) as wal:  # after a restart only the unconfirmed one is replayed
    ...         list(wal.pending()), wal.records_pending
    ([WalRecord(id=2, payload=b'cnc,machine=m1 temp_c=61.3 2')], 1)
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retain: bool = False,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self._dir = Path(dir)
        self._max_bytes = int(max_bytes)
        self._segment_bytes = int(segment_bytes)
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._buf = bytearray()  # appended to the active segment, not yet written to the kernel
        self._fd = -1  # active segment, opened for append
        self._lock_fd = -1
        self._next_id = 1
        self._confirmed = 0
        # With ``retain``, a confirmed segment is deleted only once a checkpoint covers it too (see cover()).
        self._retain = retain
        self._covered = 0
        self._bytes_pending = 0
        self._records_pending = 0
        self._closed = False
        self._failed: BaseException | None = None
        try:
            self._open()
        except OSError as exc:
            self._release()
            raise WalError(f"cannot open write-ahead log in {self._dir}: {exc}") from exc
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_config(cls, config: BufferConfig) -> WriteAheadLog:
        """Open the log described by a ``[buffer]`` config section (records kept until checkpointed)."""
        return cls(config.dir, max_bytes=config.max_bytes, segment_bytes=config.segment_bytes, retain=True)

    # ----------------------------------------------------------------------------------- stats

    @property
    def dir(self) -> Path:
        """The log directory."""
        return self._dir

    @property
    def max_bytes(self) -> int:
        """Upper bound on :attr:`bytes_pending`."""
        return self._max_bytes

    @property
    def bytes_pending(self) -> int:
        """Bytes on disk (headers included) of records not yet confirmed."""
        return self._bytes_pending

    @property
    def records_pending(self) -> int:
        """Number of records appended (or recovered) and not yet confirmed."""
        return self._records_pending

    @property
    def segments(self) -> int:
        """Number of segment files on disk."""
        return len(self._segments)

    @property
    def last_id(self) -> int:
        """Id of the last record appended (0 if none yet)."""
        return self._next_id - 1

    @property
    def confirmed_id(self) -> int:
        """The confirmed watermark: every record up to this id is in the database."""
        return self._confirmed

    @property
    def covered_id(self) -> int:
        """The last record id a checkpoint of the derived state covers (see :meth:`cover`)."""
        return self._covered

    @property
    def retained_bytes(self) -> int:
        """Bytes on disk of confirmed records kept for a rebuild (not yet covered by a checkpoint)."""
        total = sum(seg.size for seg in self._segments)
        return max(0, total - self._bytes_pending)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def snapshot(self) -> WalSnapshot:
        """The backlog for :mod:`gateway.stats`."""
        oldest = self.oldest_pending_time()
        return WalSnapshot(
            bytes_pending=self.bytes_pending, records_pending=self.records_pending, max_bytes=self.max_bytes,
            oldest_pending_age_s=None if oldest is None else max(0.0, time.time() - oldest),
        )

    def oldest_pending_time(self) -> float | None:
        """When (seconds since the epoch) the oldest unconfirmed record was appended; None if none is pending.

        Records recovered at start-up carry their segment file's modification time, so their age is a
        lower bound.
        """
        # No lock: the event loop calls this (metrics scrape) while a worker thread may hold the lock
        # through an fsync. Reading a snapshot of append-only lists is safe under the GIL; a record
        # whose time is not stored yet is being appended right now.
        confirmed = self._confirmed
        for seg in list(self._segments):
            ids, times = seg.ids, seg.times
            lo = bisect_right(ids, confirmed)
            if lo < len(times):
                return times[lo]
            if lo < len(ids):
                return time.time()
        return None

    def has_room(self, nbytes: int) -> bool:
        """Whether a payload of ``nbytes`` would fit under ``max_bytes`` right now."""
        return self._bytes_pending + HEADER_BYTES + nbytes <= self._max_bytes

    # ----------------------------------------------------------------------------- write side

    def append(self, payload: bytes) -> int:
        """Append one payload (buffered) and return its record id; call :meth:`sync` to make it durable.

        Raises
        ------
        WalFullError
            If the payload would push :attr:`bytes_pending` over ``max_bytes``.
        WalError
            On an I/O error; the log then refuses further writes until it is reopened.
        """
        size = HEADER_BYTES + len(payload)
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the 4 GiB record limit")
        with self._lock:
            self._check_writable()
            if self._bytes_pending + size > self._max_bytes:
                raise WalFullError(
                    f"write-ahead log full: {self._bytes_pending} bytes pending + {size} > max_bytes {self._max_bytes}"
                )
            try:
                active = self._segments[-1]
                if active.size > 0 and active.size + size > self._segment_bytes:
                    active = self._roll()
                record_id = self._next_id
                crc = _record_crc(len(payload), record_id, payload)
                self._buf += _HEADER.pack(_MAGIC, len(payload), crc, record_id)
                self._buf += payload
                self._next_id += 1
                active.ids.append(record_id)
                active.times.append(time.time())
                active.offsets.append(active.size)
                active.size += size
                self._bytes_pending += size
                self._records_pending += 1
                if len(self._buf) >= _WRITE_CHUNK:
                    self._write_buffer()
            except OSError as exc:
                raise self._fail(exc) from exc
            return record_id

    def sync(self) -> None:
        """Make every record appended so far durable with one ``fsync`` (no-op if nothing is new)."""
        with self._lock:
            self._check_writable()
            active = self._segments[-1]
            if active.synced == len(active.ids) and not self._buf:
                return
            try:
                self._write_buffer()
                os.fsync(self._fd)
            except OSError as exc:
                # After a failed fsync the page cache state is unknown: only a reopen (rescan) is safe.
                raise self._fail(exc) from exc
            active.synced = len(active.ids)

    # ------------------------------------------------------------------------------ read side

    def read(self, after: int, *, max_records: int = 1000, max_bytes: int = 4 << 20) -> list[WalRecord]:
        """Return durable, unconfirmed records with id > ``after``, in order, within the limits.

        At least one record is returned when one is available, even if it is larger than
        ``max_bytes``. Records appended but not yet synced are not visible.
        """
        with self._lock:
            return self._read_locked(after, max_records, max_bytes)[0]

    def read_from(self, after: int) -> Iterator[WalRecord]:
        """Iterate over durable, unconfirmed records with id > ``after``, in order.

        The iterator reads in small locked steps and also yields records synced after it started;
        it ends when it has caught up (call again later with the last id seen).
        """
        while True:
            with self._lock:
                records, last = self._read_locked(after, _ITER_RECORDS, _ITER_BYTES)
            yield from records
            if not records:
                return
            after = last

    def pending(self) -> Iterator[WalRecord]:
        """Iterate over every durable record not yet confirmed (see :meth:`read_from`)."""
        return self.read_from(self._confirmed)

    def retained(self, after: int) -> Iterator[WalRecord]:
        """Iterate over every durable record on disk with id > ``after``, confirmed or not (a rebuild's input)."""
        while True:
            with self._lock:
                records, last = self._read_locked(after, _ITER_RECORDS, _ITER_BYTES, confirmed=False)
            yield from records
            if not records:
                return
            after = last

    def cover(self, record_id: int) -> None:
        """Record that a durable checkpoint covers every record up to ``record_id``.

        With ``retain``, segments are deleted only when both confirmed and covered; without, a no-op.
        """
        with self._lock:
            if record_id <= self._covered:
                return
            self._covered = record_id
            if not self._closed and self._retain:
                self._delete_confirmed()

    def confirm(self, record_id: int) -> None:
        """Record that everything up to and including ``record_id`` is in the database.

        The watermark is persisted atomically before fully confirmed segments are deleted; the
        active segment is kept until it fills up and rolls.
        """
        with self._lock:
            if self._closed:
                raise WalError("write-ahead log is closed")
            if record_id <= self._confirmed:
                return
            if record_id >= self._next_id:
                raise ValueError(f"cannot confirm record {record_id}: last appended id is {self.last_id}")
            try:
                self._persist_watermark(record_id)
            except OSError as exc:
                raise WalError(f"cannot persist the confirmed watermark in {self._dir}: {exc}") from exc
            for seg in self._segments:
                lo = bisect_right(seg.ids, self._confirmed)
                hi = bisect_right(seg.ids, record_id)
                if hi > lo:
                    self._records_pending -= hi - lo
                    self._bytes_pending -= seg.end_of(hi - 1) - seg.offsets[lo]
            self._confirmed = record_id
            self._delete_confirmed()

    # ------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Sync what was appended and release the files; idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._failed is None and self._fd >= 0:
                    self.sync()
            finally:
                self._closed = True
                self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"WriteAheadLog({str(self._dir)!r}, records_pending={self._records_pending}, "
            f"bytes_pending={self._bytes_pending}, segments={len(self._segments)})"
        )

    # ------------------------------------------------------------------------------ internals

    def _check_writable(self) -> None:
        if self._closed:
            raise WalError("write-ahead log is closed")
        if self._failed is not None:
            raise WalError(f"write-ahead log failed earlier ({self._failed}); reopen it to recover")

    def _fail(self, exc: OSError) -> WalError:
        self._failed = exc
        return WalError(f"write-ahead log I/O error in {self._dir}: {exc}")

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    def _open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise WalError(f"write-ahead log {self._dir} is in use by another process") from exc
        with contextlib.suppress(FileNotFoundError):
            (self._dir / (_WATERMARK_NAME + ".tmp")).unlink()
        self._confirmed = self._load_watermark()

        paths = sorted(
            (int(m.group(1)), self._dir / name) for name in os.listdir(self._dir) if (m := _SEGMENT_RE.match(name))
        )
        last_id = 0
        for index, (base, path) in enumerate(paths):
            seg = self._scan(path, base, last_id, is_last=index == len(paths) - 1)
            if seg.ids:
                last_id = seg.ids[-1]
            self._segments.append(seg)
        last_base = paths[-1][0] if paths else 0
        self._next_id = max(last_id + 1, self._confirmed + 1, last_base, 1)

        for seg in self._segments:
            lo = bisect_right(seg.ids, self._confirmed)
            if lo < len(seg.ids):
                self._records_pending += len(seg.ids) - lo
                self._bytes_pending += seg.size - seg.offsets[lo]
        if self._segments:
            self._delete_confirmed()
            active = self._segments[-1]
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._create_segment()
        if self._records_pending:
            _log.info(
                "write-ahead log %s: %d records (%d bytes) pending after id %d",
                self._dir,
                self._records_pending,
                self._bytes_pending,
                self._confirmed,
            )

    def _scan(self, path: Path, base: int, last_id: int, *, is_last: bool) -> _Segment:
        seg = _Segment(path, base)
        st = path.stat()
        file_size = st.st_size
        problem = ""
        offset = 0
        with path.open("rb") as f:
            while offset < file_size:
                header = f.read(HEADER_BYTES)
                if len(header) < HEADER_BYTES:
                    problem = f"partial header ({len(header)} of {HEADER_BYTES} bytes)"
                    break
                magic, length, crc, record_id = _HEADER.unpack(header)
                if magic != _MAGIC:
                    problem = f"bad magic {magic!r}"
                    break
                if offset + HEADER_BYTES + length > file_size:
                    problem = f"short payload ({length} bytes claimed, {file_size - offset - HEADER_BYTES} left)"
                    break
                payload = f.read(length)
                if _record_crc(length, record_id, payload) != crc:
                    problem = "crc mismatch"
                    break
                if record_id <= last_id:
                    problem = f"record id {record_id} not above the previous id {last_id}"
                    break
                seg.ids.append(record_id)
                seg.offsets.append(offset)
                seg.times.append(st.st_mtime)
                offset += HEADER_BYTES + length
                last_id = record_id
        seg.size = offset
        seg.synced = len(seg.ids)
        if problem:
            lost = file_size - offset
            if is_last:
                _log.warning(
                    "%s: %s at offset %d; truncating %d bytes of torn or corrupt tail",
                    path,
                    problem,
                    offset,
                    lost,
                )
                os.truncate(path, offset)
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                _log.warning(
                    "%s: %s at offset %d; skipping the remaining %d bytes of this segment",
                    path,
                    problem,
                    offset,
                    lost,
                )
        return seg

    def _load_watermark(self) -> int:
        path = self._dir / _WATERMARK_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) == _WATERMARK.size:
            magic, value, crc = _WATERMARK.unpack(data)
            if magic == _WATERMARK_MAGIC and zlib.crc32(data[:12]) == crc:
                return int(value)
        _log.warning("%s: corrupt confirmed watermark; replaying every record still on disk", path)
        return 0

    def _persist_watermark(self, record_id: int) -> None:
        body = _WATERMARK_MAGIC + record_id.to_bytes(8, "little")
        data = body + zlib.crc32(body).to_bytes(4, "little")
        tmp = self._dir / (_WATERMARK_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._dir / _WATERMARK_NAME)
        fsync_dir(self._dir)

    def _write_buffer(self) -> None:
        if self._buf:
            _write_all(self._fd, self._buf)
            self._buf.clear()

    def _create_segment(self) -> _Segment:
        seg = _Segment(self._dir / _segment_name(self._next_id), self._next_id)
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        fsync_dir(self._dir)
        self._segments.append(seg)
        return seg

    def _roll(self) -> _Segment:
        old = self._segments[-1]
        self._write_buffer()
        # Sealed segments are always fully durable, so only the active segment can have a torn tail.
        os.fsync(self._fd)
        old.synced = len(old.ids)
        os.close(self._fd)
        self._fd = -1
        seg = self._create_segment()
        self._delete_confirmed()
        return seg

    def _delete_confirmed(self) -> None:
        keep: list[_Segment] = []
        doomed: list[_Segment] = []
        upto = min(self._confirmed, self._covered) if self._retain else self._confirmed
        for seg in self._segments[:-1]:
            (doomed if not seg.ids or seg.ids[-1] <= upto else keep).append(seg)
        if not doomed:
            return
        self._segments = [*keep, self._segments[-1]]
        try:
            for seg in doomed:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
            fsync_dir(self._dir)
        except OSError as exc:
            # Harmless: the watermark is durable, so leftover segments are filtered on the next start.
            _log.warning("cannot delete confirmed segments in %s: %s", self._dir, exc)

    def _read_locked(
        self, after: int, max_records: int, max_bytes: int, *, confirmed: bool = True
    ) -> tuple[list[WalRecord], int]:
        """Read good records above ``after`` (and above the watermark unless ``confirmed`` is False);
        also return the last id examined."""
        if confirmed:
            after = max(after, self._confirmed)
        while True:
            records, last = self._read_pass(after, max_records, max_bytes)
            # A stretch of corrupt records yields nothing but progress: keep going past it.
            if records or last == after:
                return records, last
            after = last

    def _read_pass(self, after: int, max_records: int, max_bytes: int) -> tuple[list[WalRecord], int]:
        out: list[WalRecord] = []
        budget = max_bytes
        for seg in self._segments:
            if seg.synced == 0 or seg.ids[seg.synced - 1] <= after:
                continue
            lo = bisect_right(seg.ids, after, 0, seg.synced)
            hi = lo
            while hi < seg.synced and len(out) + (hi - lo) < max_records:
                size = seg.end_of(hi) - seg.offsets[hi]
                if size > budget and (out or hi > lo):
                    break
                budget -= size
                hi += 1
            if hi == lo:
                break
            start = seg.offsets[lo]
            with seg.path.open("rb") as f:
                f.seek(start)
                data = memoryview(f.read(seg.end_of(hi - 1) - start))
            for index in range(lo, hi):
                record_id = seg.ids[index]
                chunk = data[seg.offsets[index] - start : seg.end_of(index) - start]
                record = self._decode(chunk, record_id)
                if record is None:
                    _log.error(
                        "%s: record %d at offset %d is corrupt on disk; skipped",
                        seg.path,
                        record_id,
                        seg.offsets[index],
                    )
                else:
                    out.append(record)
                after = record_id
            if len(out) >= max_records or budget <= 0 or hi < seg.synced:
                break
        return out, after

    @staticmethod
    def _decode(chunk: memoryview, record_id: int) -> WalRecord | None:
        if len(chunk) < HEADER_BYTES:
            return None
        magic, length, crc, stored_id = _HEADER.unpack(chunk[:HEADER_BYTES])
        payload = chunk[HEADER_BYTES:]
        if (
            magic != _MAGIC
            or stored_id != record_id
            or length != len(payload)
            or _record_crc(length, record_id, payload) != crc
        ):
            return None
        return WalRecord(record_id, payload.tobytes())
