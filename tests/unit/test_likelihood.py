"""Calibrated scores (gateway.detect.likelihood): which series report them, and what they do."""

from __future__ import annotations

import numpy as np

from gateway.batch import MachineKey
from gateway.detect import AnomalyEngine, DetectionConfig
from gateway.detect.base import BatchLayout
from gateway.detect.likelihood import LikelihoodParams, ScoreLikelihood


def _fleet(n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[MachineKey], list[str]]:
    """Two machines × two metrics (siblings) and one lone series on a third machine."""
    rng = np.random.default_rng(11)
    machines = [MachineKey("s", "a", "l", m) for m in ("m1", "m1", "m2", "m2", "m3")]
    metrics = ["power_kw", "vibration_mm_s", "power_kw", "vibration_mm_s", "power_kw"]
    series = np.tile(np.arange(5, dtype=np.int64), n)
    ts = np.repeat(np.arange(n, dtype=np.int64) * 10**10, 5)
    values = rng.normal(5.0, 0.1, series.shape[0])
    values[5 * 400 + 1] += 3.0  # a spike on a machine with siblings
    values[5 * 400 + 4] += 3.0  # and on the lone series
    return series, ts, values, machines, metrics


def _fused(scope: str) -> np.ndarray:
    series, ts, values, machines, metrics = _fleet()
    eng = AnomalyEngine(DetectionConfig(likelihood=LikelihoodParams(scope=scope)))  # type: ignore[arg-type]
    out = []
    for a in range(0, series.shape[0], 250):
        eng.process(series[a : a + 250], ts[a : a + 250], values[a : a + 250], metrics, machines)
        out.append(eng.last_fused)
    return np.concatenate(out)


def test_series_with_siblings_keep_their_raw_scores() -> None:
    series = _fleet()[0]
    lone, off, every = _fused("lone"), _fused("off"), _fused("all")
    sib = series != 4
    np.testing.assert_array_equal(lone[sib], off[sib])
    assert not np.array_equal(lone[~sib], off[~sib])  # the lone series is calibrated
    np.testing.assert_array_equal(lone[~sib], every[~sib])
    assert lone[5 * 400 + 1] >= 0.5  # both spikes flagged
    assert lone[5 * 400 + 4] >= 0.5


def test_a_series_whose_raw_score_is_always_high_is_not_alarmed() -> None:
    from gateway.detect.base import squash

    rng = np.random.default_rng(2)
    raw = squash(np.abs(rng.normal(1.2, 0.3, 3000)), 1.0)  # a statistic beyond its alarm point most of the time
    cal = ScoreLikelihood(LikelihoodParams(), grace=30)
    lay = BatchLayout.build(np.zeros(raw.shape[0], np.int64))
    out = cal.run(lay, lay.pack(raw))[:, 0]
    assert np.count_nonzero(raw >= 0.5) > 1000
    assert np.count_nonzero(out >= 0.5) == 0
    assert np.all(out[:130] == 0.0)  # grace (30) then warm-up (100): nothing reported


def test_unmarked_rows_pass_through_and_learn_nothing() -> None:
    cal = ScoreLikelihood(LikelihoodParams(), grace=2, channels=2)
    lay = BatchLayout.build(np.array([0, 1] * 50, np.int64))
    raw = np.random.default_rng(0).uniform(0, 1, (100, 2))
    out = cal.run(lay, lay.pack(raw[:, 0]).reshape(-1, 1).repeat(2, axis=1), np.array([True, False]))
    packed = lay.pack(raw[:, 0])
    np.testing.assert_array_equal(out[1::2, 0], packed[1::2])  # series 1 (local row 1) untouched
    assert cal.slots.ids.tolist() == [0]  # only series 0 has a state
    assert cal.state.shape[0] == 1


def _daily(n_series: int = 3, days: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lone series at 15 min with a daily cycle, interleaved, each with a spike on day 10."""
    rng = np.random.default_rng(4)
    per = days * 96
    series = np.tile(np.arange(n_series, dtype=np.int64), per)
    step = np.repeat(np.arange(per), n_series)
    ts = step * 900 * 10**9
    values = 10.0 * series + 3.0 * np.sin(2 * np.pi * step / 96) + rng.normal(0, 0.1, series.shape[0])
    values[(10 * 96 + 30) * n_series :: 1][: n_series] += 2.5  # 25 σ off the profile, within the cycle's range
    return series, ts, values


def test_seasonal_engine_is_batch_invariant_and_survives_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.checkpoint import read_checkpoint, write_checkpoint

    series, ts, values = _daily()
    metrics = ["a", "b", "c"]

    seasonal_at: list[int] = []

    def run(eng: AnomalyEngine, a: int, b: int, size: int) -> list[np.ndarray]:
        out = []
        for i in range(a, b, size):
            j = min(i + size, b)
            ev = eng.process(series[i:j], ts[i:j], values[i:j], metrics)
            seasonal_at.extend((ev.ts_ns[np.array(ev.detector) == "seasonal"] // (900 * 10**9)).tolist())
            out.append(eng.last_fused)
        return out

    whole = np.concatenate(run(AnomalyEngine(DetectionConfig()), 0, series.shape[0], series.shape[0]))
    np.testing.assert_array_equal(whole, np.concatenate(run(AnomalyEngine(DetectionConfig()), 0, series.shape[0], 97)))
    cut = 9 * 96 * 3 + 5
    first = AnomalyEngine(DetectionConfig())
    head = run(first, 0, cut, 256)
    write_checkpoint(tmp_path / "c.npz", first.snapshot(), fingerprint="f", wal_id=1)
    second = AnomalyEngine(DetectionConfig())
    second.restore(read_checkpoint(tmp_path / "c.npz", fingerprint="f").state, metrics)
    tail = run(second, cut, series.shape[0], 256)
    np.testing.assert_array_equal(whole, np.concatenate(head + tail))
    at = (10 * 96 + 30) * 3
    assert np.all(whole[at : at + 3] >= 0.5)  # every series' spike
    assert set(seasonal_at) == {10 * 96 + 30}  # the profile flags the spikes, nothing else (4 runs over the data)


def test_seasonal_needs_the_machine_model() -> None:
    import pytest

    eng = AnomalyEngine(DetectionConfig(detectors=("ewma", "seasonal")))
    with pytest.raises(ValueError, match="seasonal"):
        eng.process(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1), ["m"])


def test_series_with_siblings_have_no_calibration_state_in_a_checkpoint() -> None:
    series, ts, values, machines, metrics = _fleet()
    eng = AnomalyEngine(DetectionConfig())
    eng.process(series, ts, values, metrics, machines)
    st = eng.snapshot()
    assert st.arrays["p0/likelihood/ids"].tolist() == [4]  # the lone series only
    assert st.arrays["p0/seasonal/ids"].tolist() == [4]
    assert st.arrays["p0/seasonal/buckets"].shape == (1, 24, 3)


def _noise_sensors(law: str, seed: int = 0) -> list[int]:
    """Anomaly points of four single-sensor machines (lone series) over 3 days at 10 s, nothing wrong with
    them: white noise, the same read to 0.1, a day and a night level, and a skewed (log-normal) reading
    (``bench/null.py``'s 10-s cases, counted as it counts them)."""
    from tests.scripts import load_script

    null = load_script("bench/null.py", "bench_null")
    cfg = DetectionConfig(likelihood=LikelihoodParams(law=law))  # type: ignore[arg-type]
    hits: list[int] = null.count(null.fast_cases(np.random.default_rng(seed)), 10, cfg, 500)
    return hits


def test_pure_noise_on_a_single_sensor_alarms_about_as_rarely_as_p_alarm_says() -> None:
    """26,000 samples a sensor at p_alarm = 1e-5 per score: a fraction of an alarm expected; the exponential
    tail gives a few at most. Numenta's Gaussian tail of the same scores alarmed every few hundred samples
    (a CUSUM is 0 most of the time, and its excursions are far beyond a Gaussian of its mean and σ)."""
    exponential = _noise_sensors("exponential")
    assert max(exponential) <= 5, exponential
    gaussian = _noise_sensors("gaussian")
    assert min(gaussian) >= 50, gaussian


def test_an_eight_sigma_spike_in_noise_is_still_alarmed() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    x = rng.normal(10.0, 0.5, n)
    x[4000] += 8 * 0.5
    ts = np.arange(n, dtype=np.int64) * 10**10
    eng = AnomalyEngine(DetectionConfig())
    fused = []
    for a in range(0, n, 256):
        eng.process(np.zeros(min(256, n - a), np.int64), ts[a : a + 256], x[a : a + 256], ["temp_c"])
        fused.append(eng.last_fused)
    f = np.concatenate(fused)
    assert f[4000] >= 0.5
    assert np.count_nonzero(f[:4000] >= 0.5) <= 1
