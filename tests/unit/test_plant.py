"""The plant generator (devices/plant.py): calendar, physics, fault sizing and the replay records."""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from devices.cli import main as devices_main
from devices.plant import (
    BREAK_AT_S,
    DAY_S,
    FAULT_KINDS,
    JITTER_MAX_S,
    MEAL_AT_S,
    POWER_SD_KW,
    SHIFT_PATTERNS,
    WARMUP_S,
    Plant,
    PlantConfig,
    fault_plan,
    generate_plant,
    lowpass,
    replay_records,
)
from gateway.batch import SeriesRegistry
from gateway.config import GatewayConfig
from gateway.decode import BatchBuilder, Decoder
from gateway.schema import MachineState

SMALL = PlantConfig(machines=6, days=2.0, interval_s=30.0, seed=4)
MONDAY = SMALL.start_s


@pytest.fixture(scope="module")
def plant() -> Plant:
    return generate_plant(PlantConfig(machines=18, days=3.0, interval_s=10.0, seed=2))


@pytest.fixture(scope="module")
def reference() -> Plant:
    return generate_plant(PlantConfig(machines=18, days=3.0, interval_s=10.0, seed=2, inject_faults=False))


def state_at(plant: Plant, m: int) -> np.ndarray:
    """The state of every sample of machine m, expanded from its state changes."""
    changes = plant.states[m]
    idx = np.searchsorted(np.asarray([c[0] for c in changes]), plant.ts_s, side="right") - 1
    return np.asarray([c[1].value for c in changes])[idx]


def test_same_seed_same_plant_other_seed_other_plant() -> None:
    a, b = generate_plant(SMALL), generate_plant(SMALL)
    assert np.array_equal(a.values, b.values)
    assert a.states == b.states
    assert a.faults_jsonl() == b.faults_jsonl()
    c = generate_plant(PlantConfig(machines=6, days=2.0, interval_s=30.0, seed=5))
    assert not np.array_equal(a.values, c.values)
    assert a.faults_jsonl() != c.faults_jsonl()


def test_layout_and_grid() -> None:
    p = generate_plant(PlantConfig(machines=10, days=1.5, interval_s=60.0))
    assert p.values.shape == (10, 3, 2160)
    assert np.array_equal(np.diff(p.ts_s), np.full(2159, 60.0))
    assert [(s.area, s.line) for s in p.specs[7:9]] == [("hall1", "line1"), ("hall2", "line2")]
    assert p.shift_kinds[:4] == ["3-shift", "2-shift", "1-shift", "3-shift"]
    assert np.array_equal(p.values, np.round(p.values, 3))


def test_no_running_outside_shifts(plant: Plant) -> None:
    for m in range(len(plant.specs)):
        running = plant.ts_s[state_at(plant, m) == "RUNNING"]
        inside = np.zeros(len(running), bool)
        for sh in plant.shifts[m]:
            inside |= (running >= sh.start) & (running < sh.end)
            for a, b, _ in sh.stops:  # and never during a break, the meal or cleaning
                assert not np.any((running >= a + 10) & (running < b - 10))
        assert inside.all()


def test_planned_stops_recur_daily_at_the_planned_time(plant: Plant) -> None:
    tol = JITTER_MAX_S + plant.config.interval_s
    for m in range(len(plant.specs)):
        pattern = SHIFT_PATTERNS[plant.shift_kinds[m]]
        starts = collections.defaultdict(list)
        for ts, state, reason in plant.states[m]:
            if state is MachineState.PLANNED_STOP and reason in ("break", "meal"):
                starts[reason].append(ts)
        for reason, after in (("break", BREAK_AT_S), ("meal", MEAL_AT_S)):
            planned = np.asarray([MONDAY + day * DAY_S + s + after for day in range(3) for s, _ in pattern])
            found = np.asarray(starts[reason])
            offset = np.abs(found[:, None] - planned[None, :])
            assert np.all(offset.min(axis=1) <= tol), (m, reason)  # every stop at a planned time
            hits = (offset <= tol).sum(axis=0)
            assert np.all(hits[planned < plant.ts_s[-1] - tol] == 1), (m, reason)  # once every day and shift
            assert offset.min(axis=1).max() > 0  # jittered, not exact


def test_weekend_off() -> None:
    friday = MONDAY + 4 * DAY_S
    p = generate_plant(PlantConfig(machines=3, days=3.0, interval_s=60.0, start_s=friday))
    saturday_morning = friday + DAY_S + 6 * 3600 + JITTER_MAX_S
    for m in range(3):
        running = p.ts_s[state_at(p, m) == "RUNNING"]
        assert len(running)
        assert running.max() < saturday_morning


def test_fault_plan_covers_every_kind_on_every_metric() -> None:
    pairs = {fault_plan(i) for i in range(18)}
    assert pairs == {(k, m) for k in FAULT_KINDS for m in range(3)}


def test_faults_start_running_after_warmup(plant: Plant) -> None:
    kinds = collections.Counter(f.kind for f in plant.faults)
    assert kinds == dict.fromkeys(FAULT_KINDS, 3)
    for m, f in enumerate(plant.faults):
        assert f.machine == plant.specs[m].name
        assert f.start_ts >= plant.ts_s[0] + WARMUP_S
        i0 = int(np.searchsorted(plant.ts_s, f.start_ts))
        assert state_at(plant, m)[i0] == "RUNNING"
        assert orjson.loads(f.to_json())["kind"] == f.kind


def fault_slice(plant: Plant, m: int) -> tuple[slice, int]:
    f = plant.faults[m]
    i0 = int(np.searchsorted(plant.ts_s, f.start_ts))
    i1 = int(np.searchsorted(plant.ts_s, f.end_ts)) if f.end_ts > f.start_ts else i0 + 1
    return slice(i0, i1), plant.metrics.index(f.metric)


def test_fault_sizes_in_sigma(plant: Plant, reference: Plant) -> None:
    other = np.ones(plant.values.shape, bool)
    for m, f in enumerate(plant.faults):
        seg, k = fault_slice(plant, m)
        other[m, k, seg] = False
        diff = plant.values[m, k, seg] - reference.values[m, k, seg]
        if f.metric == "power_kw":
            assert f.sigma == POWER_SD_KW[0]  # RUNNING's noise
        if f.metric == "spindle_temp_c":
            assert 0.1 <= f.sigma <= 0.3
        if f.kind == "step":
            assert 2.0 <= abs(f.magnitude) / f.sigma <= 3.0
            assert np.abs(diff - f.magnitude).max() <= 1.01e-3
            assert seg.stop - seg.start == 360  # 60 min of 10 s samples
        elif f.kind == "drift":
            assert f.magnitude == pytest.approx(4 * f.sigma)
            assert diff[0] == pytest.approx(0, abs=1.01e-3)
            assert diff[-1] == pytest.approx(f.magnitude * (1 - 10 / 21600), abs=1.01e-3)
        elif f.kind == "spike":
            assert abs(f.magnitude) == pytest.approx(8 * f.sigma)
            assert len(diff) == 1
            assert diff[0] == pytest.approx(f.magnitude, abs=1.01e-3)
            assert f.end_ts == f.start_ts
        elif f.kind == "stuck":
            assert np.all(plant.values[m, k, seg] == f.magnitude)
            assert plant.values[m, k, seg.stop] != f.magnitude
        elif f.kind == "variance":
            running = state_at(plant, m)[seg] == "RUNNING"  # the regime of the onset, where sigma holds
            assert np.std(diff[running]) / 2 == pytest.approx(f.sigma, rel=0.2)  # noise x 3 adds 2x the noise
        else:
            assert np.all(plant.values[m, k, seg] == 0.0)
            assert seg.stop - seg.start == 120
    assert np.array_equal(plant.values[other], reference.values[other])  # nothing else is touched


def test_thermal_lag_reaches_63_percent_after_tau() -> None:
    y = lowpass(np.r_[np.zeros(10), np.ones(600)], 10.0, 1200.0)
    assert np.all(y[:11] == 0.0)
    assert y[10 + 120] == pytest.approx(1 - math.exp(-1), abs=1e-9)
    assert y[10 + 360] == pytest.approx(1 - math.exp(-3), abs=1e-9)
    long = lowpass(np.ones(200_000), 10.0, 900.0)  # many chunks: no drift, no overflow
    assert long[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.isfinite(long))


def test_spindle_temperature_lags_the_load(plant: Plant, reference: Plant) -> None:
    """After a long stop the temperature rises 63 % of its way τ after the machine starts running."""
    at_tau: list[float] = []
    for m, phys in enumerate(reference.physics):
        states = state_at(reference, m)
        lag = int(round(phys.tau_s / 10.0))
        temp = reference.values[m, reference.metrics.index("spindle_temp_c")]
        for sh in reference.shifts[m]:
            i0 = int(np.searchsorted(reference.ts_s, sh.start - 1e-6))
            cold = i0 >= 2000 and np.all(states[i0 - 2000 : i0] == "PLANNED_STOP")  # 5.5 h off: cold
            if not cold or i0 + 3 * lag >= len(states) or not np.all(states[i0 : i0 + lag] == "RUNNING"):
                continue
            before = np.mean(temp[i0 - 5 : i0])
            rise = [np.mean(temp[i0 + j - 2 : i0 + j + 3]) - before for j in (lag // 2, lag)]
            at_tau.append(rise[1] / (phys.gain_c * phys.run_load))  # the product factor moves it by up to 5 %
            assert rise[0] / rise[1] == pytest.approx((1 - math.exp(-0.5)) / (1 - math.exp(-1)), abs=0.04)
    assert len(at_tau) >= 5
    assert np.all(np.abs(np.asarray(at_tau) / (1 - math.exp(-1)) - 1) < 0.1)  # ambient moves too
    assert np.median(at_tau) == pytest.approx(1 - math.exp(-1), rel=0.03)


def test_noise_depends_on_the_regime(reference: Plant) -> None:
    power, vib = reference.metrics.index("power_kw"), reference.metrics.index("vibration_mm_s")
    sd: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    level: dict[str, list[float]] = collections.defaultdict(list)
    for m in range(len(reference.specs)):
        states = state_at(reference, m)
        same = states[1:] == states[:-1]
        for name in ("RUNNING", "IDLE", "PLANNED_STOP"):
            keep = same & (states[1:] == name) & (np.diff(reference.values[m, power]) ** 2 < 1.0)
            for k in (power, vib):
                sd[(name, k)].append(float(np.std(np.diff(reference.values[m, k])[keep]) / math.sqrt(2)))
            level[name].append(float(np.mean(reference.values[m, vib, 1:][keep])))
    assert np.median(sd[("RUNNING", power)]) == pytest.approx(0.1, rel=0.15)
    assert np.median(sd[("IDLE", power)]) == pytest.approx(0.03, rel=0.2)
    assert np.median(sd[("PLANNED_STOP", power)]) == pytest.approx(0.01, rel=0.3)
    # vibration: multiplicative noise, so an idle machine is much quieter than a running one
    for name in ("RUNNING", "IDLE"):
        rel = np.asarray(sd[(name, vib)]) / np.asarray(level[name])
        assert np.median(rel) == pytest.approx(0.06, rel=0.2)
    assert np.median(sd[("RUNNING", vib)]) > 3 * np.median(sd[("IDLE", vib)])


def test_replay_records_decode_without_rejects() -> None:
    p = generate_plant(SMALL)
    cfg = GatewayConfig()
    decoder = Decoder(cfg.mqtt.topic_template, cfg.mqtt.subscriptions(), cfg.gateway, SeriesRegistry(),
                      check_time_window=False)
    out = BatchBuilder()
    points = 0
    last_span: dict[str, float] = {}
    for rec in replay_records(p, state_channel=True):
        points += decoder.decode(rec["topic"], orjson.dumps(rec["payload"]), 0, out)
        ts = rec["payload"]["ts"]
        first = ts[0] if isinstance(ts, list) else ts
        assert first > last_span.get(rec["topic"], 0.0)  # each machine's channel in time order
        last_span[rec["topic"]] = ts[-1] if isinstance(ts, list) else ts
    batch = out.take()
    states = sum(len(s) for s in p.states)
    assert points == p.values.size + states
    assert len(batch.states) == states
    no_state = list(replay_records(p, state_channel=False))
    assert all(r["topic"].endswith("/telemetry") for r in no_state)
    assert len(no_state) == 6 * 2 * 24 * 6  # machines x days x hours x 10-min spans


def test_single_sensor_machines_send_the_faulty_metric_only() -> None:
    p = generate_plant(SMALL)
    faulty = {f.machine: f.metric for f in p.faults}
    recs = list(replay_records(p, state_channel=True, sensors="faulty"))
    tele = [r for r in recs if r["topic"].endswith("/telemetry")]
    assert {r["topic"].split("/")[4]: tuple(r["payload"]["values"]) for r in tele} == \
        {m: (metric,) for m, metric in faulty.items()}
    full = list(replay_records(p, state_channel=False))
    assert len(full) == len(tele)  # the same messages, with the faulty metric's readings only
    for one, every in zip(tele, full, strict=True):
        metric = faulty[one["topic"].split("/")[4]]
        assert (one["topic"], one["payload"]["ts"]) == (every["topic"], every["payload"]["ts"])
        assert one["payload"]["values"][metric] == every["payload"]["values"][metric]
    assert sum(r["topic"].endswith("/state") for r in recs) == sum(len(s) for s in p.states)
    with pytest.raises(ValueError, match="sensors must be 'all' or 'faulty'"):
        next(replay_records(p, state_channel=False, sensors="some"))


def test_spans_interleave_machines() -> None:
    p = generate_plant(PlantConfig(machines=3, days=1.0, interval_s=60.0))
    recs = list(replay_records(p, state_channel=False))
    assert [r["topic"].split("/")[4] for r in recs[:6]] == ["m001", "m002", "m003"] * 2
    assert recs[3]["payload"]["ts"][0] == recs[0]["payload"]["ts"][-1] + 60.0


def test_cli_writes_replay_and_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, faults = tmp_path / "plant.jsonl", tmp_path / "faults.jsonl"
    argv = ["plant", "--machines", "2", "--days", "1.5", "--interval", "60", "--seed", "3", "--no-state",
            "--out", str(out), "--faults", str(faults)]
    assert devices_main(argv) == 0
    lines = out.read_bytes().splitlines()
    assert len(lines) == 2 * 36 * 6
    assert orjson.loads(lines[0])["topic"] == "factory/plant1/hall1/line1/m001/telemetry"
    labels = [orjson.loads(x) for x in faults.read_text().splitlines()]
    assert [f["kind"] for f in labels] == ["step", "drift"]
    assert "2 machines" in capsys.readouterr().out
    assert devices_main([*argv[:-4], "--sensors", "faulty", "--out", str(out)]) == 0
    sent = {tuple(orjson.loads(x)["payload"]["values"]) for x in out.read_bytes().splitlines()}
    assert sent == {(labels[0]["metric"],), (labels[1]["metric"],)}


def test_coarse_sensors_read_multiples_of_their_step_and_the_rest_is_the_same_plant() -> None:
    fine = generate_plant(PlantConfig(machines=2, days=1.25, interval_s=60.0, seed=3))
    coarse = generate_plant(PlantConfig(machines=2, days=1.25, interval_s=60.0, seed=3,
                                        resolution={"vibration_mm_s": 0.01, "spindle_temp_c": 0.1}))
    for metric, step in (("vibration_mm_s", 0.01), ("spindle_temp_c", 0.1)):
        k = coarse.metrics.index(metric)
        q = coarse.values[:, k] / step
        assert np.allclose(q, np.round(q), atol=1e-6)
        assert np.abs(coarse.values[:, k] - fine.values[:, k]).max() <= step / 2 + 1e-9
    k = coarse.metrics.index("power_kw")
    assert np.array_equal(coarse.values[:, k], fine.values[:, k])
    assert coarse.faults == fine.faults
    assert coarse.states == fine.states


def test_clock_jitter_moves_each_machine_s_timestamps_off_the_grid_not_its_readings() -> None:
    """``clock_jitter_s``: each machine's telemetry timestamps deviate from the grid by up to ± the jitter (its
    own draw per sample, in order); the readings and state events are the grid's."""
    grid = generate_plant(SMALL)
    cfg = dataclasses.replace(SMALL, clock_jitter_s=2.0)
    p = generate_plant(cfg)
    assert np.array_equal(p.values, grid.values)
    a = list(replay_records(grid, state_channel=True))
    b = list(replay_records(p, state_channel=True))
    assert [r["topic"] for r in a] == [r["topic"] for r in b]
    d = []
    for ra, rb in zip(a, b, strict=True):
        if ra["topic"].endswith("/state"):
            assert ra == rb
            continue
        assert ra["payload"]["values"] == rb["payload"]["values"]
        d.extend(np.subtract(rb["payload"]["ts"], ra["payload"]["ts"]).tolist())
        assert np.all(np.diff(rb["payload"]["ts"]) > 0)
    d_arr = np.asarray(d)
    assert np.abs(d_arr).max() <= 2.0
    assert np.abs(d_arr).mean() > 0.5  # (uniform on ±2 s: mean |d| = 1)
    with pytest.raises(ValueError, match="clock_jitter_s must be in"):
        PlantConfig(interval_s=10.0, clock_jitter_s=5.0)
