"""Vibration window features: known signals, ISO 10816-1 zones, block-splitting invariance."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.batch import MachineKey, WaveformBlock
from gateway.features import (
    ISO10816_LIMITS_MM_S,
    FeatureExtractor,
    FeatureRows,
    FeaturesConfig,
    SeverityMonitor,
    VibrationClass,
    severity_zones,
)
from gateway.oee import MachineConfig

DT = 1_000_000  # 1 kHz
PUMP = MachineKey("plant1", "utilities", "water", "pump1")
FAN = MachineKey("plant1", "utilities", "hvac", "fan1")


def sine(amplitude: float, n: int = 4000, hz: float = 50.0, offset: float = 0.0) -> np.ndarray:
    return offset + amplitude * np.sin(2 * np.pi * hz * np.arange(n) * DT / 1e9)


def split(values: np.ndarray, sizes: list[int], series: int = 0, t0: int = 0) -> list[WaveformBlock]:
    blocks, i = [], 0
    for size in sizes:
        blocks.append(WaveformBlock(series, t0 + i * DT, DT, values[i : i + size]))
        i += size
    assert i == values.shape[0]
    return blocks


def run(fx: FeatureExtractor, blocks: list[WaveformBlock], metric: str, machine: MachineKey = PUMP) -> FeatureRows:
    return fx.process(blocks, [metric] * len(blocks), [machine] * len(blocks))


def concat(parts: list[FeatureRows]) -> dict[str, Any]:
    keys = ("series", "ts_ns", "rms", "peak", "crest", "kurtosis", "zone")
    return {k: np.concatenate([getattr(p, k) for p in parts]) for k in keys}


@pytest.mark.parametrize("amplitude", [0.5, 3.0, 20.0])
def test_sine_of_known_amplitude(amplitude: float) -> None:
    rows = run(FeatureExtractor(FeaturesConfig(), {}), split(sine(amplitude), [4000]), "accel_g")
    assert len(rows) == 4
    np.testing.assert_allclose(rows.rms, amplitude / math.sqrt(2), rtol=1e-9)
    np.testing.assert_allclose(rows.peak, amplitude, rtol=1e-9)
    np.testing.assert_allclose(rows.crest, math.sqrt(2), rtol=1e-9)
    np.testing.assert_allclose(rows.kurtosis, 1.5, rtol=1e-9)
    assert rows.zone.tolist() == [""] * 4  # acceleration: no severity zone
    assert rows.ts_ns.tolist() == [0, 10**9, 2 * 10**9, 3 * 10**9]
    assert rows.metric == ["accel_g"] * 4
    assert rows.machine == [PUMP] * 4


def test_gaussian_noise_has_kurtosis_three() -> None:
    rng = np.random.default_rng(42)
    fx = FeatureExtractor(FeaturesConfig(window_samples=200_000), {})
    rows = run(fx, split(rng.normal(0.0, 2.0, 200_000), [200_000]), "accel_g")
    assert rows.kurtosis[0] == pytest.approx(3.0, abs=0.05)
    assert rows.rms[0] == pytest.approx(2.0, rel=0.01)


def test_dc_offset_is_removed_unless_configured() -> None:
    values = sine(1.0, offset=9.81)  # an accelerometer axis that carries gravity
    ac = run(FeatureExtractor(FeaturesConfig(), {}), split(values, [4000]), "accel_z")
    np.testing.assert_allclose(ac.rms, 1 / math.sqrt(2), rtol=1e-9)
    np.testing.assert_allclose(ac.kurtosis, 1.5, rtol=1e-9)
    raw = run(FeatureExtractor(FeaturesConfig(remove_mean=False), {}), split(values, [4000]), "accel_z")
    np.testing.assert_allclose(raw.rms, math.sqrt(9.81**2 + 0.5), rtol=1e-9)
    np.testing.assert_allclose(raw.peak, 10.81, rtol=1e-9)
    np.testing.assert_allclose(raw.kurtosis, 1.5, rtol=1e-6)  # kurtosis is always about the mean


def test_constant_window_has_undefined_crest_and_kurtosis() -> None:
    rows = run(FeatureExtractor(FeaturesConfig(), {}), split(np.full(1000, 3.3), [1000]), "vibration_mm_s")
    assert (rows.rms[0], rows.peak[0]) == (0.0, 0.0)
    assert math.isnan(rows.crest[0])
    assert math.isnan(rows.kurtosis[0])
    assert rows.zone.tolist() == ["A"]


# --- ISO 10816-1 zones --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["I", "II", "III", "IV"])
def test_zone_boundaries_per_class(cls: VibrationClass) -> None:
    ab, bc, cd = ISO10816_LIMITS_MM_S[cls]
    values = [0.0, ab, ab + 1e-9, bc, bc + 1e-9, cd, cd + 1e-9, 100.0]
    assert severity_zones(values, cls).tolist() == ["A", "A", "B", "B", "C", "C", "D", "D"]


def test_iso_10816_table() -> None:
    assert ISO10816_LIMITS_MM_S == {
        "I": (0.71, 1.8, 4.5),
        "II": (1.12, 2.8, 7.1),
        "III": (1.8, 4.5, 11.2),
        "IV": (2.8, 7.1, 18.0),
    }
    assert severity_zones([2.0, 2.0, 2.0, 2.0], ["I", "II", "III", "IV"]).tolist() == ["C", "B", "B", "A"]


def test_zone_uses_the_machine_class_or_the_default() -> None:
    machines = {"pump1": MachineConfig(vibration_class="I"), "fan1": MachineConfig(ideal_cycle_s=2.0)}
    fx = FeatureExtractor(FeaturesConfig(default_vibration_class="III"), machines)
    velocity = sine(2.0 * math.sqrt(2), n=1000)  # RMS 2.0 mm/s: C for class I, B for class III
    rows = fx.process(
        [WaveformBlock(0, 0, DT, velocity), WaveformBlock(1, 0, DT, velocity), WaveformBlock(2, 0, DT, velocity)],
        ["velocity_rms_x", "velocity_rms_x", "accel_g"],
        [PUMP, FAN, FAN],
    )
    assert rows.series.tolist() == [0, 1, 2]
    assert rows.zone.tolist() == ["C", "B", ""]


@pytest.mark.parametrize(
    ("metric", "zoned"),
    [("vibration_mm_s", True), ("bearing_velocity", True), ("vel_x_mm_s", True), ("accel_g", False), ("temp_c", False)],
)
def test_velocity_metric_globs(metric: str, zoned: bool) -> None:
    rows = run(FeatureExtractor(FeaturesConfig(), {}), split(sine(1.0, n=1000), [1000]), metric)
    assert (rows.zone[0] != "") is zoned


# --- blocks and windows -------------------------------------------------------------------------------


def test_block_splitting_does_not_change_the_rows() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(0, 1, 10_000) + sine(2.0, n=10_000)
    t0 = 1_763_900_000 * 10**9
    cases = [
        [1000] * 10,
        [250] * 40,
        [10_000],
        [1, 999, 1001, 3, 2996, 5000],
        [int(x) for x in np.diff([0, *sorted(rng.choice(np.arange(1, 10_000), 60, replace=False)), 10_000])],
    ]
    results = []
    for sizes in cases:
        fx = FeatureExtractor(FeaturesConfig(), {})
        parts = [run(fx, [b], "vibration_mm_s") for b in split(values, sizes, series=5, t0=t0)]
        results.append(concat(parts))
    for other in results[1:]:
        assert other["ts_ns"].tolist() == results[0]["ts_ns"].tolist() == [t0 + i * 10**9 for i in range(10)]
        for key in ("rms", "peak", "crest", "kurtosis"):
            np.testing.assert_allclose(other[key], results[0][key], rtol=1e-12)
        assert other["zone"].tolist() == results[0]["zone"].tolist()


def test_one_row_per_block_or_every_fourth_block() -> None:
    fx = FeatureExtractor(FeaturesConfig(), {})
    assert [len(run(fx, [b], "accel_g")) for b in split(sine(1.0), [1000] * 4)] == [1, 1, 1, 1]
    fx = FeatureExtractor(FeaturesConfig(), {})
    assert [len(run(fx, [b], "accel_g")) for b in split(sine(1.0), [250] * 16)] == [0, 0, 0, 1] * 4


def test_series_are_carried_independently_within_one_call() -> None:
    fx = FeatureExtractor(FeaturesConfig(window_samples=100), {})
    a, b = sine(1.0, n=200), sine(4.0, n=200)
    blocks = [
        WaveformBlock(0, 0, DT, a[:60]),
        WaveformBlock(1, 0, DT, b[:60]),
        WaveformBlock(0, 60 * DT, DT, a[60:]),
        WaveformBlock(1, 60 * DT, DT, b[60:]),
    ]
    rows = fx.process(blocks, ["accel_g"] * 4, [PUMP] * 4)
    assert rows.series.tolist() == [0, 0, 1, 1]
    assert rows.ts_ns.tolist() == [0, 100 * DT, 0, 100 * DT]
    np.testing.assert_allclose(rows.peak, [1, 1, 4, 4], rtol=1e-3)


def test_a_gap_discards_the_incomplete_window() -> None:
    fx = FeatureExtractor(FeaturesConfig(), {})
    assert len(run(fx, [WaveformBlock(0, 0, DT, sine(1.0, n=600))], "accel_g")) == 0
    rows = run(fx, [WaveformBlock(0, 5 * 10**9, DT, sine(1.0, n=1000))], "accel_g")  # gap: starts afresh
    assert rows.ts_ns.tolist() == [5 * 10**9]
    assert fx.dropped_samples == 600
    # a timestamp off by less than half a sample still continues the series (rounded device clocks)
    fx = FeatureExtractor(FeaturesConfig(), {})
    run(fx, [WaveformBlock(0, 0, DT, sine(1.0, n=600))], "accel_g")
    rows = run(fx, [WaveformBlock(0, 600 * DT + DT // 3, DT, sine(1.0, n=400))], "accel_g")
    assert (rows.ts_ns.tolist(), fx.dropped_samples) == ([0], 0)


def test_empty_input_and_length_mismatch() -> None:
    fx = FeatureExtractor(FeaturesConfig(), {})
    rows = fx.process([WaveformBlock(0, 0, DT, np.empty(0))], ["accel_g"], [PUMP])
    assert len(rows) == 0
    assert rows.zone.dtype.kind == "U"
    with pytest.raises(ValueError, match="differ in length"):
        fx.process([WaveformBlock(0, 0, DT, np.zeros(10))], [], [PUMP])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_samples": 2}, "greater than or equal to 4"),
        ({"default_vibration_class": "V"}, "'I', 'II', 'III' or 'IV'"),
        ({"velocity_metrics": [" "]}, "a pattern is empty"),
        ({"window": 10}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FeaturesConfig.model_validate(kwargs)


def test_severity_monitor_latches_and_ignores_batch_size() -> None:
    import numpy as np

    from gateway.batch import MachineKey
    from gateway.features import FeaturesConfig, SeverityMonitor

    rng = np.random.default_rng(4)
    n = 3000
    series = rng.integers(0, 3, n)
    wear = np.linspace(1.0, 12.0, n)  # a bearing wearing out: B -> C -> D (class II)
    values = wear + rng.normal(0, 0.3, n)
    values[series == 2] = 0.5  # a healthy machine stays in zone A
    metrics = ["vibration_mm_s", "vibration_mm_s", "vibration_mm_s"]
    machines = [MachineKey("s", "a", "l", f"m{i}") for i in range(3)]

    def run(chunk: int) -> list[tuple[int, int, int]]:
        mon = SeverityMonitor(FeaturesConfig(), {})
        out = []
        for a in range(0, n, chunk):
            sl = slice(a, a + chunk)
            ev = mon.process(series[sl], np.arange(n)[sl], values[sl], metrics, machines)
            out += list(zip(ev.series.tolist(), ev.ts_ns.tolist(), ev.zone.tolist(), strict=True))
        return out

    whole = run(n)
    assert whole == run(97) == run(1)
    assert sorted((s, z) for s, _, z in whole) == [(0, 2), (0, 3), (1, 2), (1, 3)]  # once per zone per machine


def test_a_machine_running_in_zone_c_reports_once_not_at_every_start() -> None:
    """Runs of 3 h in zone C (class II: 2.8-7.1 mm/s) with 1 h stops (zone A) between, at 10-second
    samples for two days: one report; after a day without C, a new one."""
    from gateway.batch import MachineKey

    t = np.arange(2 * 8640)
    running = (t % 1440) < 1080
    values = np.where(running, 3.2, 0.05)
    ts = t * 10 * 10**9
    mon = SeverityMonitor(FeaturesConfig(), {})
    ev = mon.process(np.zeros(t.size, np.int64), ts, values, ["vibration_mm_s"], [MachineKey("s", "a", "l", "m")])
    assert ev.ts_ns.tolist() == [0]
    later = ts[-1] + 2 * 86_400 * 10**9
    ev = mon.process(np.zeros(1, np.int64), np.array([later]), np.array([3.2]), ["vibration_mm_s"],
                     [MachineKey("s", "a", "l", "m")])
    assert ev.ts_ns.tolist() == [later]


def test_severity_monitor_skips_non_velocity_metrics() -> None:
    import numpy as np

    from gateway.batch import MachineKey
    from gateway.features import FeaturesConfig, SeverityMonitor

    mon = SeverityMonitor(FeaturesConfig(), {})
    ev = mon.process(np.zeros(3, np.int64), np.arange(3), np.array([50.0, 60.0, 70.0]), ["spindle_temp_c"],
                     [MachineKey("s", "a", "l", "m")])
    assert len(ev) == 0


# --- checkpoints and redelivery ----------------------------------------------------------------------


def _feature_lists(rows: Any) -> list[tuple[int, int, float, float]]:
    return [(int(s), int(t), float(r), float(p)) for s, t, r, p in zip(rows.series, rows.ts_ns, rows.rms, rows.peak,
                                                                          strict=True)]


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_extractor_checkpoint_round_trip_continues_as_if_never_stopped(cut: int) -> None:
    from gateway.checkpoint import State

    rng = np.random.default_rng(2)
    blocks = [*split(rng.normal(0, 1, 3000), [250] * 12, series=0),
              *split(rng.normal(0, 2, 3000), [300] * 10, series=1, t0=5)]
    blocks.sort(key=lambda b: b.t0_ns)
    metrics, machines = ["accel_g"] * len(blocks), [PUMP] * len(blocks)
    never = FeatureExtractor(FeaturesConfig(), {})
    whole = _feature_lists(never.process(blocks, metrics, machines))
    first = FeatureExtractor(FeaturesConfig(), {})
    head = _feature_lists(first.process(blocks[:cut], metrics[:cut], machines[:cut]))
    saved = first.snapshot()
    second = FeatureExtractor(FeaturesConfig(), {})
    second.restore(State(saved.meta, {k: v.copy() for k, v in saved.arrays.items()}))
    tail = _feature_lists(second.process(blocks[cut:], metrics[cut:], machines[cut:]))
    assert head + tail == whole
    a, b = never.snapshot(), second.snapshot()
    assert a.meta == b.meta
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_a_redelivered_block_is_not_taken_twice() -> None:
    blocks = split(sine(5.0, n=2000), [500] * 4)
    fx = FeatureExtractor(FeaturesConfig(), {})
    first = fx.process(blocks[:3], ["vibration_mm_s"] * 3, [PUMP] * 3)
    again = fx.process(blocks[1:], ["vibration_mm_s"] * 3, [PUMP] * 3)  # blocks 1 and 2 redelivered, then 3
    assert (len(first), len(again), fx.repeated_blocks, fx.dropped_samples) == (1, 1, 2, 0)


def test_severity_latch_round_trip() -> None:
    """The episode (worst zone, last time in C or D) survives a checkpoint: a restored monitor reports
    what an uninterrupted one does, a new episode only a day after the last sample in C or D."""
    day = 86_400 * 10**9
    v = np.array([1.0, 2.0, 3.0, 2.9, 3.1, 8.0, 7.5, 0.5, 3.0, 3.0])
    ts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8 + 2 * day])  # the last: two days after the one before
    args = (["vibration_mm_s"], [PUMP])
    never = SeverityMonitor(FeaturesConfig(), {})
    whole = never.process(np.zeros(10, np.int64), ts, v, *args).ts_ns.tolist()
    first = SeverityMonitor(FeaturesConfig(), {})
    head = first.process(np.zeros(4, np.int64), ts[:4], v[:4], *args).ts_ns.tolist()
    second = SeverityMonitor(FeaturesConfig(), {})
    second.restore(first.snapshot())
    tail = second.process(np.zeros(6, np.int64), ts[4:], v[4:], *args).ts_ns.tolist()
    assert head + tail == whole == [2, 5, 8 + 2 * day]  # C, D; back in C at 8 is the same episode
