"""Store-and-forward for the Pi agent: every message goes to disk first, then out in order when acknowledged.

:class:`DiskQueue` is a FIFO of ``(topic, payload)`` in one file. SQLite in WAL mode because it gives
crash-safe appends and deletes-by-id in the standard library, with no log segments to compact by hand.
:class:`BufferedPublisher` writes each message to the queue and a thread sends the queue head in order,
deleting an entry only after the broker's acknowledgement (PUBACK at QoS 1). Entries left at exit are
sent after the next start. ``max_bytes`` caps the stored messages (a Pi has a finite SD card): past it the
OLDEST messages are dropped, with an error line counting them.

>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> q = DiskQueue(Path(tmp.name) / "queue.db", max_bytes=10**6)
>>> for n in range(3):
...     _ = q.put("factory/s/a/l/pi/telemetry", b'{"seq":%d}' % n)
>>> [m.payload for m in q.read_after(0, 2)]
[b'{"seq":0}', b'{"seq":1}']
>>> q.delete([1, 2]); len(q)
1
>>> q.close(); tmp.cleanup()
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol

from devices.sensors import RateLimitedLog

__all__ = ["AckingTransport", "BufferedPublisher", "DiskQueue", "DiskQueueError", "QueuedMessage"]

log = logging.getLogger(__name__)

# Bytes counted per row on top of topic and payload (rowid, size, record and index overhead).
ROW_OVERHEAD = 32
_DELETE_CHUNK = 500  # ids per DELETE statement (SQLite's default limit on bound parameters is 999+)


class DiskQueueError(Exception):
    """The queue file cannot be opened or written (permissions, a full or read-only disk)."""


class QueuedMessage(NamedTuple):
    id: int
    topic: str
    payload: bytes


class DiskQueue:
    """A thread-safe FIFO of MQTT messages in a SQLite file; ids only grow, also across restarts."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        self._limited = RateLimitedLog(log, every_s=60.0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise DiskQueueError(f"cannot open {self.path}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise DiskQueueError(f"cannot switch {self.path} to WAL mode (got {mode!r})")
            # FULL: a commit survives a power cut, not only a crash; at a few messages a second that is cheap.
            db.execute("PRAGMA synchronous=FULL")
            # AUTOINCREMENT: ids never come back after the newest rows were deleted, so "id > cursor" holds.
            db.execute(
                "CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
            )
            count, stored = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue").fetchone()
        except sqlite3.Error as exc:
            db.close()
            raise DiskQueueError(f"cannot use {self.path}: {exc}") from exc
        self._db = db
        self._count: int = count
        self._bytes: int = stored
        if self._count:
            log.info("disk buffer %s holds %d message(s) from before; sending them first", self.path, self._count)

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def stored_bytes(self) -> int:
        """Bytes counted against ``max_bytes`` (topic + payload + a fixed overhead per message)."""
        with self._lock:
            return self._bytes

    def put(self, topic: str, payload: bytes) -> int:
        """Append one message durably and return its id; drops the oldest when over ``max_bytes``."""
        size = len(topic.encode()) + len(payload) + ROW_OVERHEAD
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO queue (topic, payload, size) VALUES (?, ?, ?)", (topic, payload, size)
                )
            except sqlite3.Error as exc:
                raise DiskQueueError(f"cannot write to {self.path}: {exc}") from exc
            self._count += 1
            self._bytes += size
            if self._bytes > self.max_bytes:
                self._drop_oldest()
            return int(cur.lastrowid or 0)

    def _drop_oldest(self) -> None:
        excess = self._bytes - self.max_bytes
        freed = n = last_id = 0
        try:
            while freed < excess:
                rows = self._db.execute(
                    "SELECT id, size FROM queue WHERE id > ? ORDER BY id LIMIT 1000", (last_id,)
                ).fetchall()
                if not rows:
                    break
                for row_id, size in rows:
                    freed += size
                    n += 1
                    last_id = row_id
                    if freed >= excess:
                        break
            self._db.execute("DELETE FROM queue WHERE id <= ?", (last_id,))
        except sqlite3.Error as exc:
            raise DiskQueueError(f"cannot drop old messages from {self.path}: {exc}") from exc
        self._count -= n
        self._bytes -= freed
        self.dropped += n
        self._limited.error(
            "dropped",
            "DISK BUFFER FULL: %s is over buffer.max_mb (%.1f MB); dropped the %d oldest message(s), "
            "%d dropped since start; the broker has been unreachable too long",
            self.path,
            self.max_bytes / 1e6,
            n,
            self.dropped,
        )

    def read_after(self, after_id: int, limit: int) -> list[QueuedMessage]:
        """Up to ``limit`` messages with ids above ``after_id``, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload FROM queue WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                ).fetchall()
            except sqlite3.Error as exc:
                raise DiskQueueError(f"cannot read {self.path}: {exc}") from exc
        return [QueuedMessage(int(i), str(t), bytes(p)) for i, t, p in rows]

    def delete(self, ids: Iterable[int]) -> None:
        """Remove acknowledged messages (ids that are gone already are ignored)."""
        todo = list(ids)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(todo), _DELETE_CHUNK):
                    chunk = todo[start : start + _DELETE_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    n, size = self._db.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue WHERE id IN ({marks})", chunk
                    ).fetchone()
                    self._db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)
                    self._count -= n
                    self._bytes -= size
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue"
                ).fetchone()
                raise DiskQueueError(f"cannot delete from {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AckingTransport(Protocol):
    """What :class:`BufferedPublisher` needs from an MQTT client (see ``devices.agent.AgentMqttPublisher``)."""

    on_ack: Callable[[int], None]  # called with the message id of every acknowledged message
    on_connected: Callable[[], None]  # called after every successful (re)connect

    @property
    def connected(self) -> bool: ...

    @property
    def session(self) -> int:
        """Number of successful connects so far."""
        ...

    def send(self, topic: str, payload: bytes, channel: str) -> int | None:
        """Hand one message to the client; its message id, or ``None`` if the client refused it."""
        ...


class BufferedPublisher:
    """Durable, ordered publishing: :meth:`publish` stores, a sender thread forwards and deletes on ack.

    Up to ``window`` messages are in flight. After a reconnect the client re-sends what was in flight
    when the connection broke; nothing newer goes out until those are acknowledged, so order holds.
    Delivery is at least once: a message whose ack was lost is sent again (after a reconnect or restart).
    """

    def __init__(
        self,
        queue: DiskQueue,
        transport: AckingTransport,
        *,
        window: int = 100,
        drain_timeout: float = 5.0,
        stall_timeout: float = 60.0,
    ) -> None:
        self.queue = queue
        self.transport = transport
        self.window = window
        self.drain_timeout = drain_timeout
        self.stall_timeout = stall_timeout
        self.lost = 0  # messages that could not be written to the queue
        self._acks: deque[int] = deque()
        self._inflight: dict[int, int] = {}  # message id -> queue id
        self._cursor = 0  # highest queue id handed to the transport
        self._session = transport.session
        self._resync = False
        self._last_progress = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._limited = RateLimitedLog(log, every_s=60.0)
        self._thread = threading.Thread(target=self._run, name="agent-sender", daemon=True)
        transport.on_ack = self._acked
        transport.on_connected = self._wake.set

    def start(self) -> BufferedPublisher:
        self._thread.start()
        return self

    def publish(self, topic: str, payload: bytes) -> None:
        """Store one message (durably) and wake the sender; a storage error is logged, not raised."""
        try:
            self.queue.put(topic, payload)
        except DiskQueueError as exc:
            self.lost += 1
            self._limited.error("put", "message lost, the disk buffer cannot store it: %s (%d lost)", exc, self.lost)
            return
        self._wake.set()

    def _acked(self, mid: int) -> None:  # the client's network thread: only hand over, no locks
        self._acks.append(mid)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._settle_acks()
                self._send_more()
            except DiskQueueError as exc:
                self._limited.error("sender", "disk buffer error, retrying: %s", exc)
            except Exception:  # the sender must outlive surprises; the data is safe on disk meanwhile
                log.exception("sender: unexpected error, retrying")
                self._stop.wait(1.0)
        try:
            self._settle_acks()
        except DiskQueueError as exc:
            log.error("disk buffer error at exit: %s", exc)

    def _settle_acks(self) -> None:
        done: list[int] = []
        while self._acks:
            row = self._inflight.pop(self._acks.popleft(), None)
            if row is not None:
                done.append(row)
        if done:
            self._last_progress = time.monotonic()
            self.queue.delete(done)

    def _send_more(self) -> None:
        t = self.transport
        if t.session != self._session:
            self._session = t.session
            self._resync = bool(self._inflight)  # the client re-sends those first; newer ones wait
            self._last_progress = time.monotonic()
        if not t.connected:
            return
        if self._inflight and time.monotonic() - self._last_progress > self.stall_timeout:
            log.warning(
                "no acknowledgement for %.0f s while connected; re-sending %d message(s) from the disk buffer",
                self.stall_timeout,
                len(self._inflight),
            )
            self._cursor = min(self._inflight.values()) - 1
            self._inflight.clear()
        if self._resync:
            if self._inflight:
                return
            self._resync = False
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        if not self._inflight:
            self._last_progress = time.monotonic()
        for msg in self.queue.read_after(self._cursor, room):
            mid = t.send(msg.topic, msg.payload, msg.topic.rpartition("/")[2])
            if mid is None:
                break  # refused (client queue full): the same message is tried again next round
            self._inflight[mid] = msg.id
            self._cursor = msg.id

    def close(self) -> int:
        """Wait up to ``drain_timeout`` for the backlog to be acknowledged (if connected), stop the sender;
        return how many messages stay on disk for the next start."""
        if self._thread.is_alive():
            deadline = time.monotonic() + self.drain_timeout
            while len(self.queue) and self.transport.connected and time.monotonic() < deadline:
                self._wake.set()
                time.sleep(0.02)
            self._stop.set()
            self._wake.set()
            self._thread.join()
        left = len(self.queue)
        if left:
            log.warning("%d message(s) stay in the disk buffer %s until the next start", left, self.queue.path)
        return left

    def __enter__(self) -> BufferedPublisher:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
