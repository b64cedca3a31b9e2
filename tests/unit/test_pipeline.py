"""Pipeline wiring with fakes: ack order, dead-lettering, WAL durability before acks, back-pressure."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from gateway.batch import AckToken
from gateway.config import GatewayConfig
from gateway.deadletter import DeadLetterFile
from gateway.pipeline import Pipeline
from gateway.wal import WriteAheadLog

TOPIC = "factory/s/a/l/m1/telemetry"


class FakeSink:
    name = "fake"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        await self.gate.wait()
        self.bodies.append(body)

    async def close(self) -> None:
        return None


def _cfg(**influx: object) -> GatewayConfig:
    return GatewayConfig.model_validate({"influx": {"batch_size": 1000, **influx}, "detect": {"enabled": False}})


def _msg(i: int) -> bytes:
    return orjson.dumps({"ts": time.time() - 10 + i * 0.001, "values": {"t": float(i)}})


async def test_acks_in_arrival_order_after_write(tmp_path: Path) -> None:
    sink = FakeSink()
    dead = DeadLetterFile(tmp_path / "dl.jsonl")
    p = Pipeline(_cfg(), sink, deadletter=dead, emit_stats=False)
    acked: list[int] = []
    written_before_ack: list[int] = []

    def ack(tokens: Sequence[AckToken]) -> int:
        written_before_ack.append(len(sink.bodies))
        acked.extend(t.mid for t in tokens)
        return len(tokens)

    p.ack = ack
    for i in range(5):
        p.submit(TOPIC, _msg(i) if i != 2 else b"{broken", AckToken(i + 1, 1, 1))
    await p.flush()
    assert acked == [1, 2, 3, 4, 5]  # the bad message is acked too, once it is dead-lettered
    assert written_before_ack == [1]
    assert sink.bodies[0].count(b"\n") == 3  # four good points
    [rec] = [orjson.loads(line) for line in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    assert "not valid JSON" in rec["reason"]
    dead.close()


async def test_internal_error_is_dead_lettered_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = FakeSink()
    dead = DeadLetterFile(tmp_path / "dl.jsonl")
    p = Pipeline(_cfg(), sink, deadletter=dead, emit_stats=False)

    def boom(*_: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(p.decoder, "decode", boom)
    p.submit(TOPIC, _msg(0), AckToken(7, 1, 1))
    await p.flush()
    assert p.stats.decode_errors == 1
    [rec] = [orjson.loads(line) for line in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    assert rec["reason"].startswith("internal error while decoding: RuntimeError('bug')")
    dead.close()


async def test_wal_makes_batch_durable_before_ack_then_writer_drains(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate.clear()  # the database is "down"
    wal = WriteAheadLog(tmp_path / "wal")
    p = Pipeline(_cfg(), sink, wal=wal, emit_stats=False)
    acked: list[int] = []
    p.ack = lambda tokens: acked.extend(t.mid for t in tokens) or len(tokens)
    for i in range(10):
        p.submit(TOPIC, _msg(i), AckToken(i + 1, 1, 1))
    await p.flush()
    assert acked == list(range(1, 11))  # acked although the database has nothing yet: it is in the WAL
    assert wal.records_pending == 1
    assert not sink.bodies
    stop = asyncio.Event()
    writer = asyncio.create_task(p.run_writer(stop))
    sink.gate.set()
    for _ in range(100):
        if wal.records_pending == 0:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(writer, 5)
    assert wal.records_pending == 0
    assert sum(b.count(b"\n") + 1 for b in sink.bodies) == 10
    wal.close()


async def test_full_wal_holds_acks_until_the_writer_confirms(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate.clear()
    wal = WriteAheadLog(tmp_path / "wal", max_bytes=3000)
    p = Pipeline(_cfg(), sink, wal=wal, emit_stats=False)
    acked: list[int] = []
    p.ack = lambda tokens: acked.extend(t.mid for t in tokens) or len(tokens)
    mid = 0
    for _ in range(3):  # three batches of ~1.9 KB: the second no longer fits
        for _i in range(20):
            mid += 1
            p.submit(TOPIC, _msg(mid), AckToken(mid, 1, 1))
        flush = asyncio.create_task(p.flush())
        await asyncio.sleep(0.05)
        if not flush.done():
            break
    assert not flush.done(), "the flush should wait for room in the WAL"
    assert acked == list(range(1, mid - 20 + 1))  # every batch but the waiting one is acked
    stop = asyncio.Event()
    writer = asyncio.create_task(p.run_writer(stop))
    sink.gate.set()
    await asyncio.wait_for(flush, 5)
    assert acked == list(range(1, mid + 1))
    stop.set()
    await asyncio.wait_for(writer, 5)
    wal.close()


async def test_waveform_samples_are_written_but_not_run_through_the_detectors() -> None:
    sink = FakeSink()
    cfg = GatewayConfig.model_validate({"influx": {"batch_size": 100_000}})
    p = Pipeline(cfg, sink, emit_stats=False)
    seen: list[int] = []
    assert p.anomaly is not None
    real = p.anomaly.process

    def spy(series, ts_ns, values, metrics, *context):  # type: ignore[no-untyped-def]
        seen.append(len(series))
        return real(series, ts_ns, values, metrics, *context)

    p.anomaly.process = spy  # type: ignore[method-assign]
    now = time.time() - 5
    p.submit("factory/s/a/l/m1/telemetry", orjson.dumps({"t0": now, "dt": 0.001, "values": {"a": [0.1] * 1000}}), None)
    p.submit(TOPIC, _msg(1), None)
    p.submit(TOPIC, orjson.dumps({"ts": [now, now + 1], "values": {"c": [1.0, 2.0]}}), None)
    await p.flush()
    assert seen == [3]  # one sample + two columnar rows; the 1000 waveform samples go to features only
    assert sum(b.count(b"\n") + 1 for b in sink.bodies) >= 1003


async def test_state_and_count_messages_cannot_grow_machines_past_the_cap() -> None:
    sink = FakeSink()
    p = Pipeline(GatewayConfig.model_validate({"gateway": {"max_series": 3}, "detect": {"enabled": False}}),
                 sink, emit_stats=False)
    now = time.time()
    for i in range(10):
        count = {"ts": now, "total": i, "good": i}
        channel, body = ("state", {"ts": now, "state": "RUNNING"}) if i % 2 else ("count", count)
        p.submit(f"factory/s/a/l/m{i}/{channel}", orjson.dumps(body), None)
    await p.flush()
    assert p.rejected["cardinality"] == 7
    assert p.oee is not None
    assert p.oee.machine_count == 3


_WARM = """
import sys
from gateway.config import GatewayConfig
from gateway.detect import kernels
from gateway.pipeline import Pipeline
from tests.unit.test_pipeline import FakeSink
pipe = Pipeline(GatewayConfig.model_validate({"buffer": {"enabled": False}}), FakeSink())
before = len(kernels.step_batch.signatures)
if sys.argv[1] == "warm":
    pipe.warm_up()
assert pipe.anomaly is not None and pipe.anomaly.model.n_series == 0  # no detector state was made
print(before, len(kernels.step_batch.signatures))
"""


@pytest.mark.parametrize(("mode", "loaded"), [("warm", "0 1"), ("cold", "0 0")])
def test_warm_up_loads_the_model_step_before_the_first_batch(mode: str, loaded: str) -> None:
    # A fresh process: in this one an earlier test may have loaded the kernel already. JIT mode: an AOT
    # build (gateway/detect/jit.py) has nothing left to load.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _WARM, mode], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root), "FACTORY_GATEWAY_JIT": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == loaded.split()


def test_warm_up_says_how_the_detector_kernels_run(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.detect import jit

    pipe = Pipeline(GatewayConfig.model_validate({"buffer": {"enabled": False}, "detect": {"threads": 2}}), FakeSink())
    with caplog.at_level(logging.INFO, logger="gateway.pipeline"):
        pipe.warm_up()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("detector kernels:")]
    assert ("compiled ahead of time" in line) == (jit.MODE == "aot")
    assert "on 2 thread(s)" in line


async def test_compute_runs_off_the_event_loop_and_reload_waits_for_it(tmp_path: Path) -> None:
    """A batch is computed in a worker thread: the event loop keeps decoding meanwhile, and a reload (or a
    reader of compute state) waits for the batch to finish, so it is never applied halfway."""
    import threading

    sink = FakeSink()
    p = Pipeline(_cfg(), sink, emit_stats=False)
    release, inside = threading.Event(), threading.Event()
    real = p.compute_and_encode
    order: list[str] = []

    def slow(batch: object, now_ns: int | None = None) -> bytes:
        inside.set()
        assert release.wait(10)
        order.append("computed")
        return real(batch, now_ns)  # type: ignore[arg-type]

    p.compute_and_encode = slow  # type: ignore[method-assign]
    p.submit(TOPIC, _msg(0), AckToken(1, 1, 1))
    flush = asyncio.create_task(p.flush())
    assert await asyncio.to_thread(inside.wait, 10)  # the batch is being computed, in its thread
    p.submit(TOPIC, _msg(1), AckToken(2, 1, 1))  # the loop is free: the next message is decoded now
    assert p.pending() == 1
    new = p.cfg.model_copy(update={"influx": p.cfg.influx.model_copy(update={"batch_size": 7})})
    reload = threading.Thread(target=lambda: (p.reconfigure(new), order.append("reloaded")))
    reload.start()
    await asyncio.sleep(0.05)
    assert order == []  # the reload waits for the batch being computed
    release.set()
    await flush
    reload.join(5)
    assert order == ["computed", "reloaded"]
    assert p.cfg.influx.batch_size == 7
    assert len(sink.bodies) == 1
