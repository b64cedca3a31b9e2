"""NAB scorer: our implementation of the public Numenta Anomaly Benchmark scoring rules.

By default runs the offline detector (``gateway.detect.offline.run_detect``) over the NAB data into a
temp dir, then scores it; ``--results DIR`` scores existing ``timestamp,value,anomaly_score`` CSVs.

Rules (Lavin & Ahmad 2015, NAB v1.1 sweeper): rows in the first min(15 % of the file, 750) are not
scored; inside a labelled window only the earliest detection counts, weighted by the scaled sigmoid
of its relative position (+1 at the window start → ~0 at its end); a missed window costs -fn; each
detection outside every window costs fp × a scaled sigmoid of its distance past the previous window
(-fp before the first window). One threshold is swept over the whole corpus; the normalised score is
100·(raw − null)/(perfect − null), null never fires, perfect fires at each window's first row.

Usage: ``python bench/nab.py [--data DIR] [--results DIR] [--detector NAME] [--raw-scores] [--config FILE]
[--lofo]``
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROFILES: dict[str, tuple[float, float, float]] = {  # name: (tp, fp, fn) weights
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
}
REFERENCES = "7-file references (standard): numenta HTM 57.78, relativeEntropy 49.93, knncad 45.24, " \
    "windowedGaussian 13.36, null 0"


def scaled_sigmoid(x: float) -> float:
    """NAB's scaled sigmoid: +0.987 at x = -1 (window start), 0 at 0, → -1 far past a window."""
    if x > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def probation(n: int) -> int:
    return min(int(math.floor(0.15 * n)), int(0.15 * 5000))


@dataclass
class FileParts:
    name: str
    scores: np.ndarray  # anomaly score per row
    label: np.ndarray  # -2 probationary, -1 outside windows, else global window id
    unit: np.ndarray  # unweighted sigmoid per row (TP position inside a window, FP position outside)
    n_windows: int
    window_ids: list[int]


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.strip())


def file_parts(name: str, timestamps: list[datetime], scores: np.ndarray,
               windows: list[tuple[datetime, datetime]], first_id: int) -> FileParts:
    """Label every row and compute its unweighted sweep score (NAB sweeper.calcSweepScoreParts)."""
    n = len(timestamps)
    prob = probation(n)
    label = np.full(n, -1, np.int64)
    unit = np.zeros(n, np.float64)
    pending = sorted(windows)
    cur: int | None = None
    cur_right = cur_width = -1
    prev_right = prev_width = -1
    wid = first_id - 1
    ids: list[int] = []
    max_tp = scaled_sigmoid(-1.0)
    for i, t in enumerate(timestamps):
        if cur is None and pending and t >= pending[0][0]:
            left_ts, right_ts = pending.pop(0)
            left = next(j for j, u in enumerate(timestamps) if u == left_ts)
            cur_right = next(j for j, u in enumerate(timestamps) if u == right_ts)
            cur_width = cur_right - left + 1
            wid += 1
            cur = wid
            ids.append(wid)
        if cur is not None:
            unit[i] = scaled_sigmoid(-(cur_right - i + 1) / cur_width) / max_tp
        elif prev_right < 0:
            unit[i] = -1.0
        else:
            unit[i] = scaled_sigmoid(abs(prev_right - i) / (prev_width - 1))
        label[i] = (cur if cur is not None else -1) if i >= prob else -2
        if cur is not None and i == cur_right:
            prev_right, prev_width = cur_right, cur_width
            cur = None
    scorable = sorted({int(x) for x in label[label >= 0]})
    return FileParts(name, scores, label, unit, len(scorable), scorable)


def sweep(parts: list[FileParts], weights: tuple[float, float, float]) -> tuple[float, float]:
    """Sweep one threshold over the corpus; return (best threshold, best raw score)."""
    tp_w, fp_w, fn_w = weights
    scores = np.concatenate([p.scores for p in parts])
    label = np.concatenate([p.label for p in parts])
    unit = np.concatenate([p.unit for p in parts])
    keep = label != -2
    scores, label, unit = scores[keep], label[keep], unit[keep]
    n_windows = sum(p.n_windows for p in parts)
    order = np.argsort(-scores, kind="stable")
    best_t, best = 1.1, -fn_w * n_windows  # nothing flagged
    fp_score = 0.0
    max_tp: dict[int, float] = {}
    tp_sum = 0.0
    s_sorted = scores[order].tolist()
    l_sorted = label[order].tolist()
    u_sorted = unit[order].tolist()
    for j, (s, lab, u) in enumerate(zip(s_sorted, l_sorted, u_sorted, strict=True)):
        if lab == -1:
            fp_score += u * fp_w
        else:
            w = u * tp_w
            old = max_tp.get(lab)
            if old is None:
                max_tp[lab] = w
                tp_sum += w
            elif w > old:
                max_tp[lab] = w
                tp_sum += w - old
        if j + 1 == len(s_sorted) or s_sorted[j + 1] != s:  # end of a group of equal scores
            total = tp_sum + fp_score - fn_w * (n_windows - len(max_tp))
            if total > best:
                best, best_t = total, s
    return best_t, best


def score_at(p: FileParts, threshold: float, weights: tuple[float, float, float]) -> tuple[float, int, int]:
    """Raw score of one file at a threshold; returns (raw, windows detected, false positives)."""
    tp_w, fp_w, fn_w = weights
    flagged = (p.scores >= threshold) & (p.label != -2)
    fp = flagged & (p.label == -1)
    raw = float(np.sum(p.unit[fp])) * fp_w
    hit = 0
    for w in p.window_ids:
        sel = flagged & (p.label == w)
        if sel.any():
            raw += float(p.unit[sel].max()) * tp_w
            hit += 1
        else:
            raw -= fn_w
    return raw, hit, int(fp.sum())


Windows = dict[str, list[tuple[datetime, datetime]]]


def load(data: Path, results: Path) -> tuple[list[str], list[list[datetime]], list[np.ndarray], Windows]:
    windows_raw = json.loads((data / "windows.json").read_text())
    windows = {k: [(_parse(a), _parse(b)) for a, b in v] for k, v in windows_raw.items()}
    names, stamps, scores = [], [], []
    for key in sorted(windows):
        path = results / key
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        names.append(key)
        stamps.append([_parse(r[0]) for r in rows])
        scores.append(np.array([float(r[2]) for r in rows], np.float64))
    return names, stamps, scores, windows


def evaluate(names: list[str], stamps: list[list[datetime]], scores: list[np.ndarray],
             windows: dict[str, list[tuple[datetime, datetime]]], verbose: bool = True) -> dict[str, float]:
    parts: list[FileParts] = []
    wid = 0
    for name, ts, sc in zip(names, stamps, scores, strict=True):
        p = file_parts(name, ts, sc, windows[name], wid)
        wid += len(windows[name])
        parts.append(p)
    n_windows = sum(p.n_windows for p in parts)
    result: dict[str, float] = {}
    for prof, weights in PROFILES.items():
        t, raw = sweep(parts, weights)
        null = -weights[2] * n_windows
        perfect = weights[0] * n_windows
        norm = 100.0 * (raw - null) / (perfect - null)
        result[prof] = norm
        if verbose:
            print(f"\n[{prof}] threshold={t:.6g} raw={raw:.3f} null={null:.1f} perfect={perfect:.1f} "
                  f"score={norm:.2f}")
            print(f"  {'file':55s} {'windows':>8s} {'FP':>5s} {'raw':>8s} {'norm':>7s}")
            for p in parts:
                r, hit, fp = score_at(p, t, weights)
                fnull, fperf = -weights[2] * p.n_windows, weights[0] * p.n_windows
                fnorm = 100.0 * (r - fnull) / (fperf - fnull) if p.n_windows else float("nan")
                print(f"  {p.name:55s} {hit:>3d}/{p.n_windows:<4d} {fp:>5d} {r:8.3f} {fnorm:7.2f}")
    return result


def lofo(names: list[str], stamps: list[list[datetime]], scores: list[np.ndarray], windows: Windows,
         weights: tuple[float, float, float] = PROFILES["standard"]) -> float:
    """Leave-one-file-out: each file scored at the threshold swept on the other files; the held-out raw
    scores are summed and normalised over the whole corpus (100·(Σ raw − null)/(perfect − null))."""
    parts: list[FileParts] = []
    wid = 0
    for name, ts, sc in zip(names, stamps, scores, strict=True):
        parts.append(file_parts(name, ts, sc, windows[name], wid))
        wid += len(windows[name])
    total = 0.0
    print(f"\n[leave-one-file-out, {next(k for k, v in PROFILES.items() if v == weights)}]")
    for i, p in enumerate(parts):
        t, _ = sweep(parts[:i] + parts[i + 1 :], weights)
        raw, hit, fp = score_at(p, t, weights)
        total += raw
        print(f"  {p.name:55s} threshold={t:<9.6g} {hit:>3d}/{p.n_windows:<4d} FP {fp:>4d} raw {raw:8.3f}")
    n_windows = sum(p.n_windows for p in parts)
    null, perfect = -weights[2] * n_windows, weights[0] * n_windows
    norm = 100.0 * (total - null) / (perfect - null)
    print(f"  LOFO score={norm:.2f}")
    return norm


def sanity(names: list[str], stamps: list[list[datetime]],
           windows: dict[str, list[tuple[datetime, datetime]]]) -> None:
    """Perfect (fires at each window's first row) must score 100, null (never fires) 0."""
    perfect, null = [], []
    for name, ts in zip(names, stamps, strict=True):
        s = np.zeros(len(ts))
        for a, _ in windows[name]:
            s[next(j for j, u in enumerate(ts) if u == a)] = 1.0
        perfect.append(s)
        null.append(np.zeros(len(ts)))
    rp = evaluate(names, stamps, perfect, windows, verbose=False)
    rn = evaluate(names, stamps, null, windows, verbose=False)
    print("sanity: perfect " + ", ".join(f"{k}={v:.2f}" for k, v in rp.items()))
    print("sanity: null    " + ", ".join(f"{k}={v:.2f}" for k, v in rn.items()))
    assert all(abs(v - 100.0) < 1e-9 for v in rp.values()), rp
    assert all(abs(v) < 1e-9 for v in rn.values()), rn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "nab")
    ap.add_argument("--results", type=Path, default=None, help="score existing output CSVs")
    ap.add_argument("--detector", default=None, help="score one named detector instead of the fused set")
    ap.add_argument("--raw-scores", action="store_true",
                    help="score the fused score of every row, not only the rows where an anomaly point is written")
    ap.add_argument("--config", type=Path, default=None, help="a gateway TOML whose [detect] section to use")
    ap.add_argument("--lofo", action="store_true",
                    help="also score leave-one-file-out (each file at the threshold swept on the others)")
    args = ap.parse_args(argv)
    data = args.data.resolve()
    tmp = None
    results = args.results
    if results is None:
        from gateway.config import load_config
        from gateway.detect.offline import run_detect

        tmp = tempfile.TemporaryDirectory(prefix="nab-")
        results = Path(tmp.name)
        t0 = time.perf_counter()
        detect = load_config(args.config).detect if args.config else None
        n = run_detect(data, results, args.detector, events=not args.raw_scores, config=detect)
        print(f"ran detector {args.detector or 'fused'} on {n} files in {time.perf_counter() - t0:.1f} s")
    names, stamps, scores, windows = load(data, results)
    sanity(names, stamps, windows)
    evaluate(names, stamps, scores, windows)
    if args.lofo:
        lofo(names, stamps, scores, windows)
    print("\n" + REFERENCES)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
