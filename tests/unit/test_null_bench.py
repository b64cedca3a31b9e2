"""bench/null.py: false alarms of single-sensor machines with nothing wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from gateway.detect import DetectionConfig
from gateway.detect.likelihood import LikelihoodParams

_PATH = Path(__file__).resolve().parents[2] / "bench" / "null.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_null", _PATH)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_null"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load()


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
    assert out.count("\n  ") == 14  # one row per case
