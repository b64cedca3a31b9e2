"""A crash changes nothing: checkpoint + WAL replay + redelivery give an uninterrupted run's outputs.

In-process: a pipeline with a real WAL is abandoned mid-stream (its last batch durable but not acked);
a new one recovers from the checkpoint and the WAL, the "broker" redelivers the unacked batch, the
stream goes on. Every output line (anomaly, oee, features, ...) equals the uninterrupted run's.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from gateway.config import GatewayConfig
from gateway.journal import line_protocol
from gateway.pipeline import Pipeline
from gateway.wal import WriteAheadLog
from tests.fakes import NullSink, feed_with_cuts

T0 = 1_763_618_400.0  # 2025-11-20T06:00Z: a shift 06:00-14:00
NOW = 1_763_700_000 * 10**9  # the injected wall clock


def _cfg(**detect: object) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "influx": {"batch_size": 100_000},
        "detect": {"grace_samples": 20, **detect},
        "oee": {"windows": ["1h"], "shifts": [{"name": "early", "start": "06:00", "end": "14:00"}]},
        "features": {"window_samples": 100},
    })


def _messages(seed: int = 1, machines: int = 4, minutes: int = 500) -> list[tuple[str, bytes]]:
    """A shift of telemetry (with spikes and a shift), states, counts and vibration blocks per machine."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out: list[tuple[float, str, bytes]] = []
    for m in range(machines):
        base = f"factory/p/hall/l1/m{m}"
        total = good = rng.randrange(0, 1000)
        state = "RUNNING"
        for k in range(minutes):
            t = T0 + 60 * k + m
            temp = 60 + m + nrng.normal(0, 0.3) + (8.0 if k % 97 == 50 else 0.0) + (3.0 if k > 300 + 20 * m else 0.0)
            vib = 2.0 + 0.1 * nrng.standard_normal() + (6.0 if 200 <= k < 210 else 0.0)
            values = {"temp_c": temp, "vibration_mm_s": vib}
            out.append((t, f"{base}/telemetry", orjson.dumps({"ts": t, "values": values})))
            if rng.random() < 0.05:
                state = rng.choice(["RUNNING", "RUNNING", "IDLE", "DOWN", "SETUP"])
                out.append((t + 0.5, f"{base}/state", orjson.dumps({"ts": t + 0.5, "state": state})))
            if k % 5 == 0:
                made = rng.randrange(0, 60) if state == "RUNNING" else 0
                total += made
                good += made - rng.randrange(0, 2) if made else 0
                out.append((t + 0.7, f"{base}/count", orjson.dumps({"ts": t + 0.7, "total": total, "good": good})))
            if k % 3 == 0:  # a continuous 100 Hz stream in 40-sample blocks: windows of 100 span blocks
                wave = (1.0 + 0.2 * nrng.standard_normal(40)).tolist()
                t_wave = T0 + 0.4 * (k // 3)
                out.append((t + 0.9, f"{base}/telemetry", orjson.dumps({"t0": t_wave, "dt": 0.01,
                                                                        "values": {"accel_g": wave}})))
    out.sort(key=lambda r: r[0])
    return [(topic, body) for _, topic, body in out]


def _pipeline(cfg: GatewayConfig, wal: WriteAheadLog) -> Pipeline:
    return Pipeline(cfg, NullSink(), wal=wal, check_time_window=False, emit_stats=False, clock=lambda: NOW)


_feed = feed_with_cuts  # batch boundaries differ between the runs


def _outputs(wal_dir: Path, wal: WriteAheadLog) -> tuple[set[bytes], dict[bytes, int]]:
    """Every derived line (not telemetry / state / count input echoes) and how often each appears."""
    lines: dict[bytes, int] = {}
    for rec in wal.retained(0):
        for line in line_protocol(rec.payload).split(b"\n"):
            if line and line.split(b",", 1)[0] in (b"anomaly", b"oee", b"vibration_features"):
                lines[line] = lines.get(line, 0) + 1
    return set(lines), lines


async def _uninterrupted(tmp_path: Path, msgs: list[tuple[str, bytes]], cfg: GatewayConfig) -> set[bytes]:
    wal = WriteAheadLog(tmp_path / "whole", retain=True)
    p = _pipeline(cfg, wal)
    await _feed(p, msgs, list(range(500, len(msgs), 500)))
    got, counts = _outputs(tmp_path / "whole", wal)
    wal.close()
    assert max(counts.values()) == 1
    return got


async def _crashing(
    tmp_path: Path, msgs: list[tuple[str, bytes]], cfg: GatewayConfig, crashes: list[int]
) -> set[bytes]:
    """Run with a crash after each position in ``crashes``: the batch flushed last before it is redelivered."""
    d = tmp_path / "crashing"
    rng = random.Random(3)
    start = 0
    for crash in [*crashes, len(msgs)]:
        wal = WriteAheadLog(d, retain=True)
        p = _pipeline(cfg, wal)
        p.recover(d / "checkpoint.npz")
        cuts = sorted(rng.sample(range(start + 1, crash), 6))
        mid = cuts[len(cuts) // 2]
        await _feed(p, msgs[start:mid], [c - start for c in cuts if c < mid])
        assert await p.checkpoint()
        rest = [c for c in cuts if c >= mid]
        await _feed(p, msgs[mid:crash], [c - mid for c in rest[:-1]] + [rest[-1] - mid])
        redeliver_from = rest[-1] if crash < len(msgs) else crash  # the last batch: durable, never acked
        wal.close()  # SIGKILL: no shutdown checkpoint, nothing more flushed
        start = redeliver_from
    wal = WriteAheadLog(d, retain=True)
    got, _ = _outputs(d, wal)
    wal.close()
    return got


async def test_outputs_equal_an_uninterrupted_run_across_crashes(tmp_path: Path) -> None:
    msgs = _messages()
    cfg = _cfg()
    whole = await _uninterrupted(tmp_path, msgs, cfg)
    kinds = {line.split(b",", 1)[0] for line in whole}
    assert kinds == {b"anomaly", b"oee", b"vibration_features"}  # the data exercises every stateful part
    assert any(b"window=shift" in line for line in whole)
    got = await _crashing(tmp_path, msgs, cfg, crashes=[len(msgs) // 4, len(msgs) // 2, 3 * len(msgs) // 4])
    assert got == whole, (sorted(got - whole)[:3], sorted(whole - got)[:3])


async def test_corrupt_checkpoint_is_set_aside_and_state_rebuilt(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    msgs = _messages(machines=2, minutes=120)
    d = tmp_path / "wal"
    wal = WriteAheadLog(d, retain=True)
    p = _pipeline(_cfg(), wal)
    p.recover(d / "checkpoint.npz")
    await _feed(p, msgs[:300], [100, 200])
    assert await p.checkpoint()
    wal.close()
    data = bytearray((d / "checkpoint.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "checkpoint.npz").write_bytes(bytes(data))
    wal = WriteAheadLog(d, retain=True)
    p = _pipeline(_cfg(), wal)
    with caplog.at_level(logging.WARNING, "gateway.pipeline"):
        p.recover(d / "checkpoint.npz")
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage()]
    assert "corrupt" in line
    assert "checkpoint.npz.rejected" in line
    assert (d / "checkpoint.npz.rejected").exists()
    assert not (d / "checkpoint.npz").exists()
    assert p.replayed_records == 3  # nothing was deleted yet: every record re-computed from the start
    await _feed(p, msgs[300:], [])
    wal.close()


async def test_checkpoint_of_other_settings_or_a_newer_version_is_not_mixed_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = _messages(machines=2, minutes=60)
    d = tmp_path / "wal"
    wal = WriteAheadLog(d, retain=True)
    p = _pipeline(_cfg(), wal)
    p.recover(d / "checkpoint.npz")
    await _feed(p, msgs[:150], [])
    assert await p.checkpoint()
    await _feed(p, msgs[150:], [])
    wal.close()
    wal = WriteAheadLog(d, retain=True)
    other = _pipeline(_cfg(threshold=0.6), wal)
    with caplog.at_level(logging.WARNING, "gateway.pipeline"):
        other.recover(d / "checkpoint.npz")
    assert "other detector/OEE/features settings" in caplog.text
    assert len(other.registry) == 2 * 3  # the numbering is kept; the state is rebuilt from the records after it
    assert other.replayed_records == 1
    assert (d / "checkpoint.npz.rejected").exists()
    assert await other.checkpoint()
    wal.close()

    import gateway.checkpoint as ck

    caplog.clear()
    old = ck.VERSION
    try:
        ck.VERSION = old + 1
        wal = WriteAheadLog(d, retain=True)
        p = _pipeline(_cfg(threshold=0.6), wal)
        assert await p.checkpoint() is False  # no recover() yet: nowhere to write
        p.checkpoint_path = d / "checkpoint.npz"
        assert await p.checkpoint()
        wal.close()
    finally:
        ck.VERSION = old
    wal = WriteAheadLog(d, retain=True)
    p = _pipeline(_cfg(threshold=0.6), wal)
    with caplog.at_level(logging.WARNING, "gateway.pipeline"):
        p.recover(d / "checkpoint.npz")
    assert f"format version {old + 1} is newer than this gateway's {old}" in caplog.text
    wal.close()
