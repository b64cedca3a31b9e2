"""The fused kernel against the separate detector classes: same scores, same events."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from gateway.batch import F64, I64
from gateway.detect import AnomalyEngine, DetectionConfig, EwmaDetector
from gateway.detect.config import CLASSIC_DETECTORS
from gateway.detect.fusion import AnomalyEvents

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "grace5": {"grace_samples": 5},
    "subset": {"detectors": ["cusum", "spike", "flatline"]},
    "no_ewma": {"detectors": ["western_electric", "robust"], "western_electric": {"alpha": 0.05}},
    "frozen_cusum": {"cusum": {"alpha": 0.0}, "flatline": {"n": 5, "tolerance": 0.5}},
    "spike_fast": {"spike": {"alpha": 0.5}, "grace_samples": 3},  # UP_RATE·alpha capped at 1
    "weights": {"fusion": {"weights": {"spike": 0.8, "robust": 1.0}, "holdoff": 0},
                "western_electric": {"rules": [2, 4], "rule_scores": [0.2, 0.95, 0.3, 0.6]}},
}


def _data(seed: int) -> tuple[I64, F64]:
    """Irregularly interleaved series that join late, with spikes, shifts, a ramp and stuck stretches."""
    rng = np.random.default_rng(seed)
    n_series, n = 7, 3000
    series = rng.integers(0, n_series, n)
    series[: n // 3] %= 4  # series 4..6 join later
    values = rng.normal(0.0, 1.0, n) + series * 10.0
    values[rng.integers(0, n, 30)] += rng.normal(0, 15, 30)
    values[(series == 2) & (np.arange(n) > 2000)] += 5.0
    values[series == 3] = np.round(values[series == 3])  # quantised: long flat runs
    values[series == 5] = np.arange(int((series == 5).sum())) * 0.3
    stuck = np.flatnonzero(series == 1)[400:450]
    values[stuck] = values[stuck[0]]
    return series, values


def _run(cfg: DetectionConfig, kernel: bool, series: I64, values: F64, cuts: list[int]) -> tuple[F64, AnomalyEvents]:
    eng = AnomalyEngine(cfg)
    metrics = [f"m{i}" for i in range(7)]
    eng._resolve(7, metrics)
    if not kernel:
        for p in eng._profiles:
            p.kernel = None
    fused, evs = [], []
    for a, b in itertools.pairwise(cuts):
        ts = np.arange(a, b, dtype=np.int64)
        evs.append(eng.process(series[a:b], ts, values[a:b], metrics))
        fused.append(eng.last_fused)
    return np.concatenate(fused), AnomalyEvents.concat(evs)


def _key(ev: AnomalyEvents) -> list[tuple[int, int, int]]:
    return sorted(zip(ev.ts_ns.tolist(), ev.series.tolist(), ev.code.tolist(), strict=True))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cuts", [[0, 3000], [0, 1, 17, 500, 1999, 2000, 3000]])
def test_kernel_matches_detector_classes(name: str, cuts: list[int]) -> None:
    cfg = DetectionConfig.model_validate(CONFIGS[name])
    series, values = _data(list(CONFIGS).index(name))
    fk, ek = _run(cfg, True, series, values, cuts)
    fc, ec = _run(cfg, False, series, values, cuts)
    np.testing.assert_allclose(fk, fc, rtol=1e-12, atol=1e-15)
    assert _key(ek) == _key(ec)
    ok = np.lexsort((ek.code, ek.series, ek.ts_ns))
    oc = np.lexsort((ec.code, ec.series, ec.ts_ns))
    for f in ("score", "value", "expected", "zscore"):
        np.testing.assert_allclose(getattr(ek, f)[ok], getattr(ec, f)[oc], rtol=1e-12, atol=1e-15)


def test_kernel_is_used_by_default_and_not_for_learn_flagged_false() -> None:
    eng = AnomalyEngine(DetectionConfig(detectors=CLASSIC_DETECTORS))
    eng._resolve(1, ["m"])
    assert eng._profiles[0].kernel is not None
    eng = AnomalyEngine(DetectionConfig(detectors=CLASSIC_DETECTORS, learn_flagged=False))
    eng._resolve(1, ["m"])
    assert eng._profiles[0].kernel is None
    assert isinstance(eng._profiles[0].baseline, EwmaDetector)
