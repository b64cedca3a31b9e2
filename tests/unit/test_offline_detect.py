"""Offline mode: NAB-format CSVs in, one scored row per input row out, same tree."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from gateway.detect.offline import DETECTOR_NAMES, _ts_ns, run_detect, score_series


def _write(path: Path, n: int, spike_at: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value"])
        for i in range(n):
            v = 50.0 + rng.normal() + (40.0 if i == spike_at else 0.0)
            ts = f"2014-01-01 {(i // 60) % 24:02d}:{i % 60:02d}:00"
            w.writerow([ts, repr(v)])
        w.writerow(["2014-01-01 00:00:00", "51.0"])  # a repeated timestamp must be kept


@pytest.mark.parametrize("detector", [None, "ewma", "flatline"])
def test_run_detect_mirrors_tree(tmp_path: Path, detector: str | None) -> None:
    src = tmp_path / "in"
    _write(src / "a" / "one.csv", 600, 500)
    _write(src / "b" / "c" / "two.csv", 300, 250)
    assert run_detect(src, tmp_path / "out", detector) == 2
    for rel, n in (("a/one.csv", 601), ("b/c/two.csv", 301)):
        with (src / rel).open() as fh:
            rows_in = list(csv.reader(fh))
        with (tmp_path / "out" / rel).open() as fh:
            rows_out = list(csv.reader(fh))
        assert rows_out[0] == ["timestamp", "value", "anomaly_score"]
        assert len(rows_out) == n + 1
        assert [r[:2] for r in rows_out[1:]] == rows_in[1:]
        scores = np.array([float(r[2]) for r in rows_out[1:]])
        assert np.all((scores >= 0) & (scores <= 1))


def test_fused_score_flags_spike_and_matches_streaming(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _write(src / "one.csv", 600, 500)
    run_detect(src, tmp_path / "out")
    with (tmp_path / "out" / "one.csv").open() as fh:
        scores = np.array([float(r[2]) for r in list(csv.reader(fh))[1:]])
    # a lone series reports calibrated scores: the noise statistic (two large differences) peaks one sample later
    assert scores[500] >= 0.5
    assert int(np.argmax(scores)) in (500, 501)
    assert np.all(scores[:500] < scores[500])
    with (src / "one.csv").open() as fh:
        rows = list(csv.reader(fh))[1:]
    values = np.array([float(r[1]) for r in rows])
    ts = np.array([_ts_ns(r[0]) for r in rows], np.int64)  # the last row goes back in time: order matters
    np.testing.assert_array_equal(score_series(values, ts), scores)


def test_events_mode_scores_only_the_rows_of_anomaly_points() -> None:
    rng = np.random.default_rng(3)
    values = 10.0 + rng.normal(0, 0.1, 800)
    values[600] += 3.0  # 30 σ
    ts = (1_700_000_000 + 60 * np.arange(800)) * 10**9
    raw = score_series(values, ts)
    ev = score_series(values, ts, events=True)
    assert ev[600] == raw[600] >= 0.5
    flagged = np.flatnonzero(ev)
    assert 600 in flagged.tolist()
    assert np.all(ev[flagged] == raw[flagged])  # the fused score itself, where a point is written
    assert flagged.size < np.count_nonzero(raw >= 0.5) + 1


def test_unknown_detector_is_refused(tmp_path: Path) -> None:
    assert "spike" in DETECTOR_NAMES
    with pytest.raises(ValueError, match="allowed"):
        run_detect(tmp_path, tmp_path / "o", "nope")
