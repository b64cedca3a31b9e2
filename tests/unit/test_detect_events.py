"""Which flagged samples become `anomaly` events: fused onsets, always-reported detectors, modes."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.detect.config import CLASSIC_DETECTORS, DetectionConfig
from gateway.detect.fusion import AnomalyEngine, AnomalyEvents


def _series(n: int = 1000, seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).normal(50.0, 1.0, n)
    x[500] = 80.0  # a spike
    x[700:800] = x[699]  # a stuck sensor for 100 readings
    return x


def _run(cfg: DetectionConfig, x: np.ndarray, chunk: int) -> list[tuple[int, str]]:
    eng = AnomalyEngine(cfg)
    out: list[tuple[int, str]] = []
    for a in range(0, len(x), chunk):
        v = x[a : a + chunk]
        ev: AnomalyEvents = eng.process(np.zeros(len(v), np.int64), np.arange(a, a + len(v), dtype=np.int64),
                                        v, ["temp_c"])
        out.extend(zip(ev.ts_ns.tolist(), ev.detector, strict=True))
    return sorted(out)


def test_fused_mode_reports_the_spike_once_and_the_stuck_sensor_once() -> None:
    events = _run(DetectionConfig(detectors=CLASSIC_DETECTORS), _series(), 1000)
    fused = [t for t, d in events if d == "fused"]
    assert 500 in fused
    flat = [t for t, d in events if d == "flatline"]
    assert len(flat) == 1
    assert 700 < flat[0] < 760  # the onset, once, not every stuck reading
    assert len(events) < 15


@pytest.mark.parametrize("mode", ["fused", "onset", "all"])
def test_events_do_not_depend_on_batch_size(mode: str) -> None:
    cfg = DetectionConfig(detectors=CLASSIC_DETECTORS, events=mode)  # type: ignore[arg-type]
    x = _series()
    assert _run(cfg, x, 1000) == _run(cfg, x, 100) == _run(cfg, x, 37)


def test_all_mode_reports_every_flagged_sample() -> None:
    x = _series()
    n_all = len(_run(DetectionConfig(detectors=CLASSIC_DETECTORS, events="all"), x, 1000))
    n_onset = len(_run(DetectionConfig(detectors=CLASSIC_DETECTORS, events="onset"), x, 1000))
    n_fused = len(_run(DetectionConfig(detectors=CLASSIC_DETECTORS), x, 1000))
    assert n_all > n_onset >= n_fused
    stuck = [t for t, d in _run(DetectionConfig(detectors=CLASSIC_DETECTORS, events="all"), x, 1000) if d == "flatline"]
    assert len(stuck) > 50  # every stuck reading past the run length


def test_always_report_can_be_emptied() -> None:
    events = _run(DetectionConfig(detectors=CLASSIC_DETECTORS, always_report=()), _series(), 1000)
    assert not [t for t, d in events if d == "flatline" and t not in {500}]
