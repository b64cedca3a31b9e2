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
    rng = np.random.default_rng(2)
    raw = np.clip(rng.normal(0.6, 0.15, 3000), 0.0, 1.0)  # at the alarm point half of the time
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
    assert cal.state[1].sum() == 0.0
    assert cal.state[0, 0, 0] > 0.0
