"""Focused checks of each detector's logic, the layout, the config and the engine's events."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.detect import (
    AnomalyEngine,
    BatchLayout,
    CusumDetector,
    DetectionConfig,
    EwmaDetector,
    FlatlineDetector,
    RobustDetector,
    SpikeDetector,
    WesternElectricDetector,
    squash,
)
from gateway.detect.config import CLASSIC_DETECTORS

WARM = np.array([1.0, -1.0] * 10)  # mean 0, population σ 1


def _one(det: object, x: np.ndarray) -> np.ndarray:
    return det.score_learn(np.zeros(x.shape[0], np.int64), x)  # type: ignore[attr-defined,no-any-return]


def test_layout_packs_by_step() -> None:
    lay = BatchLayout.build(np.array([5, 2, 5, 9, 5, 2], np.int64))
    assert lay.rows.tolist() == [5, 2, 9]
    assert lay.active.tolist() == [3, 2, 1]
    packed = lay.pack(np.arange(6.0))
    assert packed.tolist() == [0.0, 1.0, 3.0, 2.0, 5.0, 4.0]
    np.testing.assert_array_equal(lay.unpack(packed), np.arange(6.0))


def test_cusum_matches_hand_computation() -> None:
    det = CusumDetector(k=0.5, h=5.0, alpha=0.0, grace_samples=20)
    _one(det, WARM)  # phase I: mean 0, σ 1, then frozen
    s = _one(det, np.array([1.5, 2.0, 2.0, 1.0, 0.0, -3.0]))
    # S+ = 1.0, 2.5, 4.0, 4.5, 4.0, 0.5 (never ≥ h); S- = 0 … 0, then 3 - 0.5 = 2.5 at -3.0
    expected_stat = np.array([1.0, 2.5, 4.0, 4.5, 4.0, 2.5])
    np.testing.assert_allclose(s, squash(expected_stat, 5.0), rtol=1e-6)


def test_cusum_alarms_at_h_and_restarts() -> None:
    det = CusumDetector(k=0.5, h=5.0, alpha=0.0, grace_samples=20)
    _one(det, WARM)
    s = _one(det, np.full(4, 3.0))  # S+ = 2.5, 5.0 (alarm → restart), 2.5, 5.0
    np.testing.assert_allclose(s, squash(np.array([2.5, 5.0, 2.5, 5.0]), 5.0), rtol=1e-6)
    assert s[1] == pytest.approx(0.5)


def test_ewma_z_score() -> None:
    det = EwmaDetector(alpha=0.1, z_alarm=4.0, grace_samples=20)
    _one(det, WARM)
    mean = det._state["mean"][0]
    sd = np.sqrt(det._state["var"][0])
    s = _one(det, np.array([mean + 4.0 * sd]))
    assert s[0] == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(
    ("rule", "tail"),
    [
        (1, [3.5]),
        (2, [2.5, 0.0, 2.5]),
        (3, [1.5, 1.5, 0.0, 1.5, 1.5]),
        (4, [0.5] * 8),
    ],
)
def test_western_electric_rule_fires(rule: int, tail: list[float]) -> None:
    det = WesternElectricDetector(alpha=1e-9, rules=(rule,), grace_samples=20)
    warm = np.array([1.0, -1.0] * 20)
    _one(det, warm)
    s = _one(det, np.array(tail))
    assert s[-1] == pytest.approx(det.rule_scores[rule - 1])
    assert np.all(s[:-1] == 0.0)


def test_western_electric_quiet_on_alternating_data() -> None:
    det = WesternElectricDetector(grace_samples=20)
    assert np.all(_one(det, np.array([0.5, -0.5] * 100)) == 0.0)


def test_flatline_after_n_identical_readings() -> None:
    det = FlatlineDetector(n=5, grace_samples=3)
    x = np.array([1.0, 2.0, 3.0, 4.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 8.0])
    s = _one(det, x)
    assert np.all(s[:8] == 0.0)
    assert s[8] == pytest.approx(0.5)  # 5th identical reading
    assert s[9] > s[8]
    assert s[10] == 0.0


def test_spike_scores_the_step_not_the_level() -> None:
    det = SpikeDetector(grace_samples=20)
    x = np.arange(150.0) * 2.0  # a steady ramp: big level change, constant step
    s = _one(det, x)
    assert s[20:].max() < 0.2
    s2 = _one(det, np.array([x[-1] + 50.0]))
    assert s2[0] > 0.9


def test_robust_ignores_outliers_in_its_window() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, 60)
    x[40:44] = 50.0  # a burst of outliers does not move the median
    det = RobustDetector(window=32, grace_samples=20)
    s = _one(det, x)
    assert np.all(s[40:44] > 0.9)


def test_learn_flagged_false_keeps_outliers_out() -> None:
    x = np.r_[np.array([1.0, -1.0] * 20), 100.0, np.array([1.0, -1.0] * 5)]
    kept_out = EwmaDetector(grace_samples=20, learn_flagged=False)
    learned = EwmaDetector(grace_samples=20, learn_flagged=True)
    s_out = _one(kept_out, x)
    s_in = _one(learned, x)
    assert s_out[40] == s_in[40]
    assert kept_out._state["var"][0] < learned._state["var"][0]


def test_state_grows_on_demand() -> None:
    det = EwmaDetector()
    det.score_learn(np.array([3], np.int64), np.array([1.0]))
    assert det.n_series >= 4
    det.score_learn(np.array([1000], np.int64), np.array([1.0]))
    assert det.n_series >= 1001


def test_config_rejects_typos_and_resolves_rules() -> None:
    with pytest.raises(ValidationError):
        DetectionConfig.model_validate({"treshold": 0.4})
    with pytest.raises(ValidationError):
        DetectionConfig.model_validate({"rules": [{"metrics": "x", "ewma": {"alfa": 0.1}}]})
    cfg = DetectionConfig.model_validate(
        {"rules": [{"metrics": "state_*", "enabled": False}, {"metrics": ["*_c"], "cusum": {"h": 8.0}}]}
    )
    assert not cfg.resolve("state_code").enabled
    assert cfg.resolve("temp_c").params["cusum"].h == 8.0  # type: ignore[attr-defined]
    assert cfg.resolve("temp_c").params["cusum"].k == 0.5  # type: ignore[attr-defined]


def test_engine_events_and_fused_crossing() -> None:
    cfg = DetectionConfig.model_validate(
        {"detectors": CLASSIC_DETECTORS, "grace_samples": 20, "rules": [{"metrics": "off_*", "enabled": False}]}
    )
    eng = AnomalyEngine(cfg)
    rng = np.random.default_rng(1)
    n = 600
    series = np.tile(np.arange(3, dtype=np.int64), n // 3)
    values = rng.normal(0.0, 1.0, n)
    values[series == 2] += 1000.0  # disabled metric: never scored
    values[301] = 30.0  # series 1
    values[304] = 30.0  # series 1, next sample: still above threshold → no second fused event
    values[20] = np.nan
    ts = np.arange(n, dtype=np.int64)
    ev = eng.process(series, ts, values, ["a", "b", "off_x"])
    assert set(ev.series.tolist()) <= {0, 1}
    fused_ts = [int(t) for t, d in zip(ev.ts_ns, ev.detector, strict=True) if d == "fused"]
    assert 301 in fused_ts
    assert 304 not in fused_ts
    at = ev.ts_ns == 301
    assert "ewma" in [d for d, a in zip(ev.detector, at, strict=True) if a]
    assert np.all(ev.value[at] == 30.0)
    assert np.all(np.abs(ev.zscore[at]) > 10)
    assert np.all(ev.score >= 0.5)
    assert np.all(eng.last_fused[series == 2] == 0.0)
    assert eng.last_fused[20] == 0.0
    assert len(ev) == ev.code.shape[0] == ev.expected.shape[0]


def test_fused_holdoff_reports_only_new_peaks() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, 400)
    x[200] += 30.0
    x[203] += 30.0  # a repeat of the same size soon after: suppressed
    x[350] += 30.0  # long after (≫ half-life): reported again
    series = np.zeros(400, np.int64)
    ts = np.arange(400, dtype=np.int64)
    on = AnomalyEngine(DetectionConfig(detectors=CLASSIC_DETECTORS, grace_samples=20)).score(series, ts, x, ["m"])
    off = AnomalyEngine(DetectionConfig.model_validate({"detectors": CLASSIC_DETECTORS, "grace_samples": 20,
                                                   "fusion": {"holdoff": 0}}))
    raw = off.score(series, ts, x, ["m"])
    assert on[200] == raw[200] >= 0.5
    assert on[203] == 0.0 < raw[203]
    assert on[350] >= 0.5
    assert np.all((on == raw) | (on == 0.0))


def test_robust_layout_fast_path_matches_general() -> None:
    series = np.tile(np.arange(5, dtype=np.int64), 40)
    values = np.random.default_rng(4).normal(0.0, 1.0, 200)
    fast = RobustDetector(grace_samples=5).score_learn(series, values)
    assert BatchLayout.build(series).in_order
    order = np.argsort(series, kind="stable")  # series-major: not tiled, takes the sorting path
    assert not BatchLayout.build(series[order]).in_order
    slow = RobustDetector(grace_samples=5).score_learn(series[order], values[order])
    np.testing.assert_array_equal(fast[order], slow)
