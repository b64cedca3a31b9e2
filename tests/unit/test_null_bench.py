"""bench/null.py: false alarms of single-sensor machines with nothing wrong."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.detect import DetectionConfig
from gateway.detect.likelihood import LikelihoodParams
from tests.scripts import load_script

bench = load_script("bench/null.py", "bench_null")


def test_counts_each_sensors_points_and_the_laws_differ() -> None:
    cases = {k: v for k, v in bench.slow_cases(np.random.default_rng(0)).items()
             if k in ("white noise", "flat line")}
    exp = bench.count(cases, 300, DetectionConfig(), 256)
    gauss = bench.count(cases, 300, DetectionConfig(likelihood=LikelihoodParams(law="gaussian")), 256)
    assert exp[1] == gauss[1] == 0  # a flat line never alarms
    assert exp[0] <= 2 < 10 <= gauss[0]


def test_prints_a_table_per_cadence(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "law = 'exponential'" in out
    assert "5 min x 14 days (4032 samples)" in out
    assert "10 s x 3 days (25,920 samples)" in out
    assert out.count("\n  ") == 15  # one row per case (11 + 4)
