"""Disk queue (order, resume, size cap) and the buffered publisher against a fake MQTT transport."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devices.diskqueue import ROW_OVERHEAD, BufferedPublisher, DiskQueue, DiskQueueError

TOPIC = "factory/s/a/l/pi/telemetry"


def payloads(q: DiskQueue) -> list[bytes]:
    return [m.payload for m in q.read_after(0, 10**6)]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# -- DiskQueue ------------------------------------------------------------------------------------


def test_fifo_order_and_delete(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "q.db", max_bytes=10**6)
    ids = [q.put(TOPIC, b"%d" % n) for n in range(10)]
    assert ids == sorted(ids)
    assert len(q) == 10
    assert payloads(q) == [b"%d" % n for n in range(10)]
    assert [m.payload for m in q.read_after(ids[2], 3)] == [b"3", b"4", b"5"]
    q.delete([ids[4], ids[0], ids[9], 12345])  # out of order and unknown ids are fine
    assert payloads(q) == [b"1", b"2", b"3", b"5", b"6", b"7", b"8"]
    assert len(q) == 7
    assert q.stored_bytes == 7 * (len(TOPIC) + 1 + ROW_OVERHEAD)
    q.close()


def test_resumes_after_restart_and_ids_keep_growing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "q.db"  # parent directory is created
    with DiskQueue(path, max_bytes=10**6) as q:
        for n in range(5):
            q.put(TOPIC, b"%d" % n)
        q.delete([m.id for m in q.read_after(0, 2)])
    with DiskQueue(path, max_bytes=10**6) as q:
        assert len(q) == 3
        assert payloads(q) == [b"2", b"3", b"4"]
        q.delete([m.id for m in q.read_after(0, 10)])  # empty: SQLite would reuse ids without AUTOINCREMENT
    with DiskQueue(path, max_bytes=10**6) as q:
        assert len(q) == 0
        assert q.put(TOPIC, b"later") == 6
    assert (tmp_path / "state" / "q.db-wal").exists() or (tmp_path / "state" / "q.db").exists()


def test_uses_wal_mode(tmp_path: Path) -> None:
    import sqlite3

    with DiskQueue(tmp_path / "q.db", max_bytes=10**6):
        pass
    assert sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    ("cap_messages", "put", "kept_from"),
    [(10, 10, 0), (10, 11, 1), (10, 25, 15), (3, 100, 97)],
)
def test_size_cap_drops_the_oldest_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cap_messages: int, put: int, kept_from: int
) -> None:
    size = len(TOPIC) + 3 + ROW_OVERHEAD  # payloads are 3 bytes
    q = DiskQueue(tmp_path / "q.db", max_bytes=cap_messages * size)
    with caplog.at_level(logging.ERROR, logger="devices.diskqueue"):
        for n in range(put):
            q.put(TOPIC, b"%03d" % n)
    assert payloads(q) == [b"%03d" % n for n in range(kept_from, put)]
    assert q.dropped == kept_from
    assert q.stored_bytes <= q.max_bytes
    if kept_from:
        (rec,) = caplog.records  # loud, but one line per minute, not one per message
        assert rec.levelno == logging.ERROR
        assert "DISK BUFFER FULL" in rec.getMessage()
        assert "dropped the 1 oldest message(s), 1 dropped since start" in rec.getMessage()
    else:
        assert not caplog.records
    q.close()
    with DiskQueue(tmp_path / "q.db", max_bytes=cap_messages * size) as again:
        assert again.stored_bytes == q.stored_bytes  # the accounting survives a restart


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(DiskQueueError, match=r"cannot open .*dir\.db"):
        DiskQueue(tmp_path / "dir.db", max_bytes=1000)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiskQueueError, match="cannot open"):
        DiskQueue(tmp_path / "file" / "q.db", max_bytes=1000)


# -- BufferedPublisher ----------------------------------------------------------------------------


class FakeTransport:
    """Behaves like paho for the sender: message ids, acks in order, re-send of in-flight on reconnect."""

    def __init__(self, *, connected: bool = True) -> None:
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_connected: Callable[[], None] = lambda: None
        self.session = 1 if connected else 0
        self.up = connected
        self.refuse = False
        self.wire: list[bytes] = []  # what reached the broker, in order (re-sends included)
        self.unacked: dict[int, bytes] = {}
        self._mid = 0
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self.up

    def send(self, topic: str, payload: bytes, channel: str) -> int | None:
        assert channel == "telemetry"
        if self.refuse:
            return None
        with self._lock:
            self._mid += 1
            self.unacked[self._mid] = payload
            if self.up:
                self.wire.append(payload)
            return self._mid

    def ack(self, n: int | None = None) -> None:
        with self._lock:
            mids = sorted(self.unacked)[:n]
            for mid in mids:
                del self.unacked[mid]
        for mid in mids:
            self.on_ack(mid)

    def disconnect(self) -> None:
        self.up = False

    def reconnect(self) -> None:
        with self._lock:
            self.session += 1
            self.up = True
            self.wire.extend(self.unacked[mid] for mid in sorted(self.unacked))  # paho re-sends in order
        self.on_connected()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[DiskQueue]:
    q = DiskQueue(tmp_path / "q.db", max_bytes=10**7)
    yield q
    q.close()


def test_sends_in_order_and_deletes_on_ack(queue: DiskQueue) -> None:
    t = FakeTransport()
    with BufferedPublisher(queue, t, drain_timeout=0) as pub:
        for n in range(20):
            pub.publish(TOPIC, b"%d" % n)
        wait_until(lambda: len(t.wire) == 20)
        assert t.wire == [b"%d" % n for n in range(20)]
        assert len(queue) == 20  # nothing deleted before its ack
        t.ack(5)
        wait_until(lambda: len(queue) == 15)
        assert payloads(queue)[0] == b"5"
        t.ack()
        wait_until(lambda: len(queue) == 0)


def test_window_limits_messages_in_flight(queue: DiskQueue) -> None:
    t = FakeTransport()
    with BufferedPublisher(queue, t, window=3, drain_timeout=0) as pub:
        for n in range(10):
            pub.publish(TOPIC, b"%d" % n)
        wait_until(lambda: len(t.wire) == 3)
        time.sleep(0.05)
        assert len(t.wire) == 3
        sent = 3
        while sent < 10:  # each ack frees the window; the next batch is awaited, never slept for
            t.ack()
            want = min(sent + 3, 10)
            wait_until(lambda want=want: len(t.wire) == want)
            sent = len(t.wire)
            assert len(t.unacked) <= 3, "more than the window in flight"
        t.ack()
        wait_until(lambda: len(queue) == 0)
        assert t.wire == [b"%d" % n for n in range(10)]


def test_buffers_while_disconnected_then_sends_in_order(queue: DiskQueue) -> None:
    t = FakeTransport(connected=False)
    with BufferedPublisher(queue, t, drain_timeout=0) as pub:
        for n in range(50):
            pub.publish(TOPIC, b"%d" % n)
        time.sleep(0.05)
        assert t.wire == []
        assert len(queue) == 50
        t.reconnect()
        wait_until(lambda: len(t.wire) == 50)
        t.ack()
        wait_until(lambda: len(queue) == 0)
    assert t.wire == [b"%d" % n for n in range(50)]


def test_after_reconnect_new_messages_wait_for_the_resent_ones(queue: DiskQueue) -> None:
    t = FakeTransport()
    with BufferedPublisher(queue, t, drain_timeout=0) as pub:
        for n in range(3):
            pub.publish(TOPIC, b"%d" % n)
        wait_until(lambda: len(t.wire) == 3)
        t.disconnect()  # 0, 1, 2 in flight, unacknowledged
        for n in range(3, 6):
            pub.publish(TOPIC, b"%d" % n)
        time.sleep(0.05)
        t.reconnect()  # the client re-sends 0, 1, 2 first
        time.sleep(0.1)
        assert t.wire == [b"0", b"1", b"2", b"0", b"1", b"2"], "3..5 must wait behind the re-sent messages"
        t.ack()
        wait_until(lambda: len(t.wire) == 9)
        t.ack()
        wait_until(lambda: len(queue) == 0)
    assert t.wire[6:] == [b"3", b"4", b"5"]


def test_refused_message_is_tried_again(queue: DiskQueue) -> None:
    t = FakeTransport()
    t.refuse = True
    with BufferedPublisher(queue, t, drain_timeout=0) as pub:
        pub.publish(TOPIC, b"0")
        pub.publish(TOPIC, b"1")
        time.sleep(0.05)
        t.refuse = False
        pub.publish(TOPIC, b"2")
        wait_until(lambda: len(t.wire) == 3)
    assert t.wire == [b"0", b"1", b"2"]


def test_stalled_acks_are_resent_from_disk(queue: DiskQueue, caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTransport()
    with caplog.at_level(logging.WARNING), BufferedPublisher(queue, t, drain_timeout=0, stall_timeout=0.2) as pub:
        pub.publish(TOPIC, b"0")
        pub.publish(TOPIC, b"1")
        wait_until(lambda: len(t.wire) >= 4, timeout=3)
        t.ack()
        wait_until(lambda: len(queue) == 0)
    assert t.wire[:4] == [b"0", b"1", b"0", b"1"]
    assert "no acknowledgement" in caplog.text


def test_close_drains_when_connected_and_keeps_the_rest(queue: DiskQueue, tmp_path: Path) -> None:
    t = FakeTransport()
    pub = BufferedPublisher(queue, t, drain_timeout=2.0).start()
    for n in range(5):
        pub.publish(TOPIC, b"%d" % n)
    acker = threading.Timer(0.2, t.ack)
    acker.start()
    assert pub.close() == 0  # waited for the acks
    acker.join()

    t2 = FakeTransport(connected=False)
    pub2 = BufferedPublisher(queue, t2, drain_timeout=2.0).start()
    pub2.publish(TOPIC, b"kept")
    started = time.monotonic()
    assert pub2.close() == 1  # disconnected: no point waiting
    assert time.monotonic() - started < 1.0
    assert payloads(queue) == [b"kept"]


def test_storage_error_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = DiskQueue(tmp_path / "q.db", max_bytes=10**6)
    pub = BufferedPublisher(q, FakeTransport(connected=False), drain_timeout=0)
    q.close()  # any write now fails
    with caplog.at_level(logging.ERROR):
        pub.publish(TOPIC, b"x")
        pub.publish(TOPIC, b"y")
    assert pub.lost == 2
    assert "message lost" in caplog.text
