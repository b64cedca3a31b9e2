"""The plant view: rings per series, per-machine state / OEE / anomalies, fed by the pipeline after compute."""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import orjson
import pytest

from gateway.batch import DecodedBatch, MachineKey, SeriesRegistry
from gateway.config import GatewayConfig, load_config
from gateway.detect.fusion import EVENT_NAMES, AnomalyEvents
from gateway.errors import ConfigError
from gateway.pipeline import Pipeline
from gateway.view import MachineRings, PlantView, SeriesRings
from tests.fakes import RecordingSink

S = 10**9


def test_ring_keeps_latest_sample_per_slot_and_drops_old() -> None:
    rings = SeriesRings(ring_size=3, ring_interval_s=1)
    # out of arrival order within a slot: the later timestamp wins, whatever the order they came in
    rings.update(np.array([2, 2, 2]), np.array([10 * S + 900, 10 * S + 100, 8 * S]), np.array([9.0, 1.0, 7.0]))
    times, values = rings.read(2)
    assert times == [8.0, 9.0, 10.0]
    assert values[0] == 7.0
    assert math.isnan(values[1])
    assert values[2] == 9.0
    rings.update(np.array([2]), np.array([5 * S]), np.array([3.0]))  # older than the ring: dropped
    assert rings.read(2)[1][2] == 9.0
    rings.update(np.array([2]), np.array([100 * S]), np.array([4.0]))  # a jump past a whole turn clears all
    times, values = rings.read(2)
    assert times == [98.0, 99.0, 100.0]
    assert math.isnan(values[0])
    assert math.isnan(values[1])
    assert values[2] == 4.0
    assert rings.read(1) == ([], [])
    assert rings.read(10_000) == ([], [])


def test_ring_grows_and_memory_is_as_documented() -> None:
    rings = SeriesRings(ring_size=120, ring_interval_s=30, capacity=1)
    rings.update(np.arange(80_000), np.full(80_000, 1000 * S), np.ones(80_000))
    assert rings.values.dtype == np.float32
    assert rings.nbytes == 80_000 * (120 * 4 + 8)  # the module docstring's 39.7 MB counts 8 more bytes per series
    assert rings.read(79_999)[1][-1] == 1.0


@pytest.mark.parametrize("bound", [1, 3, 100])
def test_machine_rings_keep_the_last_rows_of_each_machine_as_a_deque_does(bound: int) -> None:
    rng = np.random.default_rng(bound)
    rings = MachineRings(bound, {"n": np.int64, "x": np.float64}, capacity=2)
    model: dict[int, deque[tuple[int, float]]] = {}
    n = 0
    for _ in range(60):  # batches of up to 3 bounds, machines appearing as the plant grows
        owners = rng.integers(0, 1 + n // 20, rng.integers(0, 3 * bound + 2))
        rows = [(n + i, float(rng.standard_normal())) for i in range(owners.shape[0])]
        n += len(rows)
        rings.push(owners, {"n": [r[0] for r in rows], "x": [r[1] for r in rows]})
        for o, r in zip(owners.tolist(), rows, strict=True):
            model.setdefault(o, deque(maxlen=bound)).append(r)
        for o in range(1 + n // 20 + 2):
            want = list(model.get(o, ()))
            assert rings.rows(o) == {"n": [r[0] for r in want], "x": [r[1] for r in want]}
        idx, newest = rings.newest(1 + n // 20)
        assert idx == sorted(model)
        assert newest["n"] == [model[o][-1][0] for o in idx]
    assert rings.columns["n"].shape[0] == min(bound, max(len(q) for q in model.values()))


def test_http_ring_keys_validated(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[http]\nring_size = 1\n")
    with pytest.raises(ConfigError, match="ring_size"):
        load_config(path, env={})
    path.write_text("[http]\nring_interval_s = 0\n")
    with pytest.raises(ConfigError, match="ring_interval_s"):
        load_config(path, env={})
    path.write_text("[http]\nring_size = 50\nstale_after_s = 5\n")
    http = load_config(path, env={}).http
    assert (http.ring_size, http.ring_interval_s, http.stale_after_s) == (50, 30.0, 5.0)


def test_anomalies_land_on_their_machine() -> None:
    reg = SeriesRegistry()
    m1, m2 = MachineKey("s", "a", "l", "m1"), MachineKey("s", "a", "l", "m2")
    sid_t, sid_v = reg.series_id(m1, "temp"), reg.series_id(m2, "vib")
    view = PlantView(reg, ring_size=4, ring_interval_s=10, events=2)
    code = EVENT_NAMES.index("spike")
    ev = AnomalyEvents(np.array([sid_v, sid_v, sid_v]), np.array([1 * S, 2 * S, 3 * S]), np.full(3, code),
                       np.ones(3), np.array([5.0, 6.0, 7.0]), np.zeros(3), np.zeros(3))
    view.observe(DecodedBatch(), [ev], [])
    mv = view.machines[m2]
    assert len(view.anomalies(mv)) == 2  # the ring is bounded by events=2
    last = view.last_anomalies()[mv.index]
    assert last is not None
    assert (last.ts, last.metric, last.detector, last.value) == (3.0, "vib", "spike", 7.0)
    assert view.anomalies_within(3.5, 1.0) == [1]  # the tile's "last hour", all machines at once
    assert m1 not in view.machines
    assert sid_t == 0


async def test_pipeline_feeds_view_with_states_oee_and_telemetry() -> None:
    cfg = GatewayConfig.model_validate({
        "detect": {"enabled": False}, "features": {"enabled": False},
        "oee": {"windows": ["1m"]}, "http": {"ring_size": 10, "ring_interval_s": 60},
    })
    sink = RecordingSink()
    p = Pipeline(cfg, sink, emit_stats=False)
    t0 = (int(time.time()) // 60 - 5) * 60  # five minutes ago, on a minute boundary
    topic = "factory/s1/a1/l1/m1/"
    p.submit(topic + "state", orjson.dumps({"ts": t0, "state": "RUNNING"}), None)
    p.submit(topic + "count", orjson.dumps({"ts": t0 + 30, "total": 20, "good": 18}), None)
    p.submit(topic + "state", orjson.dumps({"ts": t0 + 90, "state": "DOWN", "reason": "jam"}), None)
    p.submit(topic + "telemetry", orjson.dumps({"ts": t0 + 100, "values": {"temp": 41.5}}), None)
    await p.flush()
    assert p.view is not None
    mv = p.view.machines[MachineKey("s1", "a1", "l1", "m1")]
    assert (mv.state, mv.state_since) == ("DOWN", t0 + 90)
    assert [(c.state, c.reason) for c in mv.states] == [("RUNNING", None), ("DOWN", "jam")]
    assert mv.last_message == t0 + 100
    rec = mv.oee["1m"]
    lines = [ln for b in sink.bodies for ln in b.split(b"\n") if ln.startswith(b"oee,")]
    first = [ln for ln in lines if ln.endswith(str(t0 * S).encode())]
    assert len(first) == 1  # the record the view keeps is the one written as an oee point
    assert rec.start_ns == t0 * S
    assert f"good_count={rec.good_count}i".encode() in first[0]
    assert rec.oee is not None
    assert f"oee={rec.oee!r}".encode() in first[0] or f"oee={rec.oee}".encode() in first[0]
    series = p.view.series_of(mv.key)
    assert series["temp"][1][-1] == 41.5
    assert series["temp"][0][-1] == (t0 + 60)  # the slot [t0+60, t0+120) holds the sample at t0+100
