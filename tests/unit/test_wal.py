"""Write-ahead log: round trip, restart, torn tails, corruption, bounds, rolling and SIGKILL."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.errors import GatewayError
from gateway.wal import HEADER_BYTES, BufferConfig, WalError, WalFullError, WalRecord, WriteAheadLog

ROOT = Path(__file__).resolve().parents[2]


def fill(path: Path, payloads: list[bytes], **kwargs: int) -> list[int]:
    with WriteAheadLog(path, **kwargs) as wal:
        ids = [wal.append(p) for p in payloads]
        wal.sync()
    return ids


def pending(path: Path, **kwargs: int) -> list[WalRecord]:
    with WriteAheadLog(path, **kwargs) as wal:
        return list(wal.pending())


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("wal-*.seg"))


def boundaries(payloads: list[bytes]) -> list[int]:
    """Byte offsets at which each record ends, in a single segment."""
    ends, pos = [], 0
    for p in payloads:
        pos += HEADER_BYTES + len(p)
        ends.append(pos)
    return ends


# --------------------------------------------------------------------------- round trip


def test_append_sync_read_confirm_round_trip(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path / "wal") as wal:
        ids = [wal.append(f"m v={i}i {i}".encode()) for i in range(3)]
        assert ids == [1, 2, 3]
        assert wal.records_pending == 3
        assert wal.bytes_pending == sum(HEADER_BYTES + len(f"m v={i}i {i}") for i in range(3))
        assert list(wal.pending()) == []  # not durable yet, so not visible to the writer
        wal.sync()
        assert [r.payload for r in wal.pending()] == [b"m v=0i 0", b"m v=1i 1", b"m v=2i 2"]
        assert wal.read(1) == [WalRecord(2, b"m v=1i 1"), WalRecord(3, b"m v=2i 2")]
        wal.confirm(2)
        assert wal.confirmed_id == 2
        assert list(wal.pending()) == [(3, b"m v=2i 2")]
        assert wal.read(0) == [WalRecord(3, b"m v=2i 2")]  # confirmed records are never re-read
        assert wal.records_pending == 1
        assert wal.bytes_pending == HEADER_BYTES + 8
        wal.confirm(1)  # going backwards is a no-op
        assert wal.confirmed_id == 2
        with pytest.raises(ValueError, match="last appended id is 3"):
            wal.confirm(4)
        wal.confirm(3)
        assert (wal.records_pending, wal.bytes_pending) == (0, 0)
    assert wal.closed
    with pytest.raises(WalError, match="closed"):
        wal.append(b"x")


def test_read_limits_and_empty_payload(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        ids = [wal.append(b"x" * 100) for _ in range(10)]
        wal.append(b"")
        wal.sync()
        assert [r.id for r in wal.read(0, max_records=4)] == ids[:4]
        assert [r.id for r in wal.read(4, max_bytes=2 * (HEADER_BYTES + 100))] == ids[4:6]
        assert [r.id for r in wal.read(0, max_bytes=1)] == ids[:1]  # always at least one record
        assert wal.read(10) == [WalRecord(11, b"")]
        assert wal.read(11) == []


def test_reader_sees_records_synced_after_it_started(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        wal.append(b"a")
        wal.sync()
        it = wal.pending()
        assert next(it) == (1, b"a")
        wal.append(b"b")
        wal.sync()
        assert list(it) == [(2, b"b")]
        assert [r.payload for r in wal.read_from(1)] == [b"b"]


def test_restart_replays_only_unconfirmed(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        for i in range(5):
            wal.append(b"p%d" % i)
        wal.sync()
        wal.confirm(3)
    with WriteAheadLog(tmp_path) as wal:
        assert list(wal.pending()) == [(4, b"p3"), (5, b"p4")]
        assert (wal.records_pending, wal.confirmed_id, wal.last_id) == (2, 3, 5)
        assert wal.append(b"p5") == 6  # ids keep increasing across restarts
        wal.sync()
        wal.confirm(6)
    with WriteAheadLog(tmp_path) as wal:
        assert list(wal.pending()) == []
        assert wal.append(b"p6") == 7


def test_close_syncs_what_was_appended(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        wal.append(b"late")
    assert pending(tmp_path) == [(1, b"late")]


def test_ids_stay_above_watermark_when_tail_was_lost(tmp_path: Path) -> None:
    # The writer may confirm a record whose bytes were then lost in a crash; new ids must not reuse it.
    payloads = [b"r%d" % i for i in range(5)]
    fill(tmp_path, payloads)
    with WriteAheadLog(tmp_path) as wal:
        wal.confirm(5)
    (seg,) = segment_files(tmp_path)
    os.truncate(seg, boundaries(payloads)[1])
    with WriteAheadLog(tmp_path) as wal:
        assert list(wal.pending()) == []
        assert wal.append(b"new") == 6
        wal.sync()
        assert list(wal.pending()) == [(6, b"new")]


def test_second_open_is_refused(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path), pytest.raises(WalError, match="in use"):
        WriteAheadLog(tmp_path)


def test_concurrent_appender_and_writer_threads(tmp_path: Path) -> None:
    total = 400
    received: list[WalRecord] = []
    with WriteAheadLog(tmp_path, segment_bytes=2048) as wal:
        done = threading.Event()

        def produce() -> None:
            for i in range(total):
                wal.append(b"%d" % i)
                if i % 7 == 0:
                    wal.sync()
            wal.sync()
            done.set()

        thread = threading.Thread(target=produce)
        thread.start()
        last = 0
        while not (done.is_set() and last == total):
            batch = wal.read(last, max_records=50)
            if batch:
                received.extend(batch)
                last = batch[-1].id
                wal.confirm(last)
        thread.join()
        assert wal.records_pending == 0
        assert wal.segments == 1
    assert [r.payload for r in received] == [b"%d" % i for i in range(total)]
    assert [r.id for r in received] == list(range(1, total + 1))


# ----------------------------------------------------------------------- torn / corrupt


def test_torn_tail_at_every_offset_keeps_the_good_prefix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    payloads = [b"", b"a", b"m,machine=m1 temp_c=61.2 1", b"b" * 40, b"c" * 7]
    src = tmp_path / "src"
    fill(src, payloads)
    (seg,) = segment_files(src)
    ends = boundaries(payloads)
    assert seg.stat().st_size == ends[-1]
    for cut in range(ends[-1] + 1):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        target = d / seg.name
        os.truncate(target, cut)
        keep = sum(1 for e in ends if e <= cut)
        good = ([0, *ends])[keep]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.wal"), WriteAheadLog(d) as wal:
            assert [r.payload for r in wal.pending()] == payloads[:keep], cut
            assert target.stat().st_size == good  # cut back to the last good record
            wal.append(b"after")
        if cut == good:
            assert not caplog.records
        else:
            (rec,) = caplog.records
            assert rec.levelno == logging.WARNING
            assert seg.name in rec.getMessage()
            assert f"offset {good}" in rec.getMessage()
        assert [r.payload for r in pending(d)] == [*payloads[:keep], b"after"]


def test_torn_tail_random_offsets_multi_segment(tmp_path: Path) -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(0, 300)) for _ in range(60)]
    src = tmp_path / "src"
    fill(src, payloads, segment_bytes=2000)
    segs = segment_files(src)
    assert len(segs) > 3
    last = segs[-1]
    first_in_last = int(re.findall(r"\d{16}", last.name)[0])
    last_payloads = payloads[first_in_last - 1 :]
    ends = boundaries(last_payloads)
    for trial in range(60):
        cut = rng.randrange(0, ends[-1] + 1)
        d = tmp_path / f"t{trial}"
        shutil.copytree(src, d)
        os.truncate(d / last.name, cut)
        if trial % 2:  # a torn write can also leave garbage rather than just missing bytes
            with (d / last.name).open("ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 50)))
        keep = sum(1 for e in ends if e <= cut)
        got = pending(d)
        assert [r.payload for r in got] == payloads[: first_in_last - 1 + keep]
        assert [r.id for r in got] == list(range(1, first_in_last + keep))


def test_flipped_byte_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    payloads = [b"first", b"second", b"third record", b"fourth"]
    src = tmp_path / "src"
    fill(src, payloads)
    (seg,) = segment_files(src)
    ends = boundaries(payloads)
    start, end = ends[1], ends[2]  # every byte of the third record, header included
    for pos in range(start, end):
        d = tmp_path / f"flip{pos}"
        shutil.copytree(src, d)
        data = bytearray((d / seg.name).read_bytes())
        data[pos] ^= 0x01
        (d / seg.name).write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.wal"):
            got = pending(d)
        assert [r.payload for r in got] == payloads[:2], pos
        (rec,) = caplog.records
        assert f"offset {start}" in rec.getMessage()
        assert seg.name in rec.getMessage()


def test_corruption_mid_segment_skips_rest_of_that_segment_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = [bytes([65 + i]) * 20 for i in range(6)]  # 40-byte records, two per 100-byte segment
    fill(tmp_path, payloads, segment_bytes=100)
    segs = segment_files(tmp_path)
    assert len(segs) == 3
    data = bytearray(segs[0].read_bytes())
    data[HEADER_BYTES + 3] ^= 0xFF  # payload of record 1
    segs[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gateway.wal"):
        got = pending(tmp_path, segment_bytes=100)
    assert [r.id for r in got] == [3, 4, 5, 6]
    assert any(segs[0].name in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


def test_corrupt_watermark_replays_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fill(tmp_path, [b"a", b"b"])
    with WriteAheadLog(tmp_path) as wal:
        wal.confirm(1)
    (tmp_path / "confirmed").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="gateway.wal"):
        assert [r.id for r in pending(tmp_path)] == [1, 2]  # at-least-once: re-sending is fine
    assert "watermark" in caplog.text


# ------------------------------------------------------------------------ bounds / roll


def test_max_bytes_raises_then_recovers_after_confirm(tmp_path: Path) -> None:
    record = HEADER_BYTES + 100
    with WriteAheadLog(tmp_path, max_bytes=3 * record) as wal:
        for _ in range(3):
            assert wal.has_room(100)
            wal.append(b"x" * 100)
        wal.sync()
        assert wal.bytes_pending == 3 * record
        assert not wal.has_room(100)
        assert wal.has_room(-HEADER_BYTES)
        with pytest.raises(WalFullError, match="max_bytes") as info:
            wal.append(b"x" * 100)
        assert isinstance(info.value, GatewayError)
        assert wal.last_id == 3  # the refused append left no trace
        wal.confirm(1)
        assert wal.has_room(100)
        assert wal.append(b"y" * 100) == 4
        with pytest.raises(WalFullError):
            wal.append(b"z" * 4 * record)  # never fits
        wal.sync()
        assert [r.id for r in wal.pending()] == [2, 3, 4]


def test_pending_bytes_survive_restart(tmp_path: Path) -> None:
    record = HEADER_BYTES + 50
    with WriteAheadLog(tmp_path, max_bytes=4 * record, segment_bytes=2 * record) as wal:
        for _ in range(4):
            wal.append(b"q" * 50)
        wal.confirm(1)
    with WriteAheadLog(tmp_path, max_bytes=4 * record, segment_bytes=2 * record) as wal:
        assert (wal.records_pending, wal.bytes_pending) == (3, 3 * record)
        assert wal.has_room(50)
        wal.append(b"q" * 50)
        with pytest.raises(WalFullError):
            wal.append(b"q" * 50)


def test_segments_roll_and_are_deleted_when_confirmed(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=256) as wal:  # 70-byte records: 3 per segment
        for i in range(10):
            wal.append(bytes([i]) * 50)
        wal.sync()
        names = [p.name for p in segment_files(tmp_path)]
        assert names == [f"wal-{n:016d}.seg" for n in (1, 4, 7, 10)]
        assert wal.segments == 4
        assert all(p.stat().st_size <= 256 for p in segment_files(tmp_path))
        wal.confirm(5)  # segment 1 (ids 1-3) fully confirmed, segment 4 (4-6) not yet
        assert [p.name for p in segment_files(tmp_path)] == names[1:]
        wal.confirm(10)  # everything: only the active segment stays
        assert [p.name for p in segment_files(tmp_path)] == names[3:]
        assert (wal.segments, wal.records_pending, wal.bytes_pending) == (1, 0, 0)
        # Larger than a segment: gets one of its own; rolling drops the fully confirmed segment 10.
        big = wal.append(b"B" * 1000)
        after = wal.append(b"after")
        wal.sync()
        assert (big, after) == (11, 12)
        assert [p.name for p in segment_files(tmp_path)] == [f"wal-{n:016d}.seg" for n in (11, 12)]
        wal.confirm(big)
        assert wal.segments == 1
    with WriteAheadLog(tmp_path, segment_bytes=256) as wal:
        assert list(wal.pending()) == [(12, b"after")]


# --------------------------------------------------------------------------- SIGKILL

_CHILD = textwrap.dedent(
    """
    import sys
    from gateway.wal import WriteAheadLog

    def payload(i):
        return b"cnc,machine=m%d temp_c=%d.5 %d\\n" % (i % 5, i, i) * (1 + i % 9)

    with WriteAheadLog(sys.argv[1], segment_bytes=4096) as wal:
        while True:
            for _ in range(3):
                expected = wal.last_id + 1
                assert wal.append(payload(expected)) == expected
            wal.sync()
            if wal.last_id % 30 == 0:
                wal.confirm(wal.last_id - 20)
            sys.stdout.write(f"{wal.last_id}\\n")
            sys.stdout.flush()
    """
)


def _payload(i: int) -> bytes:
    return b"cnc,machine=m%d temp_c=%d.5 %d\n" % (i % 5, i, i) * (1 + i % 9)


def test_sigkill_keeps_every_synced_record(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    synced = 0
    for _round in range(3):
        with subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env) as child:
            assert child.stdout is not None
            target = synced + 150
            for line in child.stdout:
                synced = int(line)
                if synced >= target:
                    break
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            assert child.returncode == -signal.SIGKILL
        with WriteAheadLog(tmp_path, segment_bytes=4096) as wal:
            got = list(wal.pending())
            confirmed = wal.confirmed_id
        ids = [r.id for r in got]
        # A prefix of what was appended: contiguous from the watermark, covering every synced id. (The child
        # may have synced and confirmed past the last line read here before the kill landed, so the
        # watermark itself can be beyond ``synced``: then every synced record is confirmed.)
        assert ids == list(range(confirmed + 1, confirmed + 1 + len(ids)))
        assert (ids[-1] if ids else confirmed) >= synced
        assert all(r.payload == _payload(r.id) for r in got)


# ---------------------------------------------------------------------------- config


def test_buffer_config_defaults_and_sizes() -> None:
    cfg = BufferConfig()
    assert cfg.dir == Path("/var/lib/factory-gateway/buffer")
    assert (cfg.max_bytes, cfg.segment_bytes, cfg.enabled) == (1 << 30, 16 << 20, True)
    assert BufferConfig(max_bytes="512MiB").max_bytes == 512 << 20
    assert BufferConfig(max_bytes="1GB").max_bytes == 10**9
    assert BufferConfig(max_bytes=4096, segment_bytes="1 KiB").segment_bytes == 1024
    with pytest.raises(ValidationError, match="max_bytes"):
        BufferConfig(max_bytes=0)
    with pytest.raises(ValidationError, match="max_bytes"):
        BufferConfig(max_bytes="lots")
    with pytest.raises(ValidationError, match="extra"):
        BufferConfig.model_validate({"max_byte": 1})


def test_from_config(tmp_path: Path) -> None:
    cfg = BufferConfig(dir=tmp_path / "b", max_bytes="1KiB", segment_bytes=512)
    with WriteAheadLog.from_config(cfg) as wal:
        assert wal.dir == tmp_path / "b"
        assert wal.max_bytes == 1024
        wal.append(b"x")
    assert (tmp_path / "b").is_dir()


def test_record_corrupted_while_open_is_skipped_on_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with WriteAheadLog(tmp_path) as wal:
        for p in (b"one", b"two", b"three"):
            wal.append(p)
        wal.sync()
        (seg,) = segment_files(tmp_path)
        data = bytearray(seg.read_bytes())
        data[boundaries([b"one"])[0] + HEADER_BYTES] ^= 0x20  # payload of record 2
        seg.write_bytes(bytes(data))
        with caplog.at_level(logging.ERROR, logger="gateway.wal"):
            assert [r.payload for r in wal.pending()] == [b"one", b"three"]
            assert wal.read(1, max_records=1) == [WalRecord(3, b"three")]  # skips past, never stalls
        assert "record 2" in caplog.text


def test_retained_records_stay_until_a_checkpoint_covers_them(tmp_path: Path) -> None:
    """With ``retain``, a segment goes only when both confirmed and covered; a reopen deletes nothing early."""
    with WriteAheadLog(tmp_path, segment_bytes=256, retain=True) as wal:
        ids = [wal.append(b"x" * 100) for _ in range(10)]
        wal.sync()
        wal.confirm(ids[-1])
        assert wal.records_pending == 0
        assert wal.segments > 3  # confirmed, but no checkpoint covers them
        assert wal.retained_bytes > 0
        assert [r.id for r in wal.retained(ids[4])] == ids[5:]
        assert list(wal.pending()) == []
    with WriteAheadLog(tmp_path, segment_bytes=256, retain=True) as wal:
        assert [r.id for r in wal.retained(0)] == ids  # the reopen kept them
        wal.cover(ids[5])
        kept = [r.id for r in wal.retained(0)]
        assert kept[0] > 1
        assert kept[-1] == ids[-1]
        assert set(ids[6:]) <= set(kept)  # everything after the checkpoint stays
        wal.cover(ids[-1])
        assert wal.segments == 1  # only the active one
    with WriteAheadLog(tmp_path, segment_bytes=256) as wal:  # without retain: confirmed is enough
        wal.append(b"y" * 200)
        wal.append(b"y" * 200)
        wal.sync()
        wal.confirm(wal.last_id)
        wal.append(b"z")
        assert wal.segments == 1
