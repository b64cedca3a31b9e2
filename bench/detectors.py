"""Detector speed bench: samples/s of one batch update, 10,000 series × 100 samples per batch.

Compares every vectorised detector, the engine running the six classes separately (its fallback when
``learn_flagged`` is false or fusion is not ``max``) and the default engine with the fused kernel
(``gateway/detect/kernel.py``) with a per-sample pure-Python EWMA loop and River's HalfSpaceTrees
(``pip install river``; skipped with a note when absent), all in the same run.
Figures only, no asserts: the machine is small and noisy.

Usage: ``python bench/detectors.py [--series 10000] [--per 100] [--batches 3]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.batch import MachineKey  # noqa: E402
from gateway.detect import AnomalyEngine, DetectionConfig, make_detector  # noqa: E402
from gateway.detect.config import CLASSIC_DETECTORS  # noqa: E402
from gateway.detect.machine import MachineModel  # noqa: E402


def _batches(n_series: int, per: int, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Time-major (interleaved) batches: every series sends one sample, ``per`` times over."""
    rng = np.random.default_rng(0)
    series = np.tile(np.arange(n_series, dtype=np.int64), per)
    out = []
    for b in range(count):
        ts = (np.repeat(np.arange(per, dtype=np.int64), n_series) + b * per) * 1_000_000_000
        values = 20.0 + rng.standard_normal(series.shape[0])
        out.append((series, ts, values))
    return out


def _rate(run: Callable[[np.ndarray, np.ndarray, np.ndarray], object],
          batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    run(*batches[0])  # warm-up batch: allocates state, passes the grace period
    best = math.inf
    for b in batches[1:]:
        t0 = time.perf_counter()
        run(*b)
        best = min(best, time.perf_counter() - t0)
    return batches[0][0].shape[0] / best


def python_ewma_rate(n: int = 200_000) -> float:
    """The same EWMA z-score, one sample at a time in pure Python (per-series dicts)."""
    rng = np.random.default_rng(1)
    series = (np.arange(n) % 1000).tolist()
    values = (20.0 + rng.standard_normal(n)).tolist()
    mean: dict[int, float] = {}
    var: dict[int, float] = {}
    cnt: dict[int, int] = {}
    alpha, z_alarm, ln2 = 0.02, 4.0, math.log(2.0)
    t0 = time.perf_counter()
    for s, x in zip(series, values, strict=True):
        m = mean.get(s, 0.0)
        v = var.get(s, 0.0)
        c = cnt.get(s, 0)
        d = x - m
        z = d / math.sqrt(v + (m * 1e-6) ** 2 + 1e-18)
        _ = -math.expm1(-ln2 * abs(z) / z_alarm) if c >= 30 else 0.0
        a = max(alpha, 1.0 / (c + 1))
        mean[s] = m + a * d
        var[s] = (1 - a) * (v + a * d * d)
        cnt[s] = c + 1
    return n / (time.perf_counter() - t0)


def river_rate(n: int = 20_000) -> float | None:
    try:
        from river import anomaly
    except ImportError:
        return None
    rng = np.random.default_rng(2)
    values = (20.0 + rng.standard_normal(n)).tolist()
    model = anomaly.HalfSpaceTrees(seed=42)
    t0 = time.perf_counter()
    for x in values:
        row = {"x": x}
        model.score_one(row)
        model.learn_one(row)
    return n / (time.perf_counter() - t0)


def oee_rate(machines: int = 10_000, batches: int = 6) -> tuple[float, float]:
    """OEE update for ``machines`` machines per batch (one state + one count event each).

    Returns (events/s, seconds per batch), best batch of ``batches`` after one warm-up; the batches
    cross 1-minute boundaries, so closing windows is part of the cost.
    """
    from gateway.batch import CountEvent, MachineKey, StateEvent
    from gateway.oee import OeeConfig, OeeEngine
    from gateway.schema import MachineState

    engine = OeeEngine(OeeConfig(windows=["1m", "1h"]), {})
    keys = [MachineKey("plant1", f"area{i // 500}", f"line{i // 50}", f"m{i:05d}") for i in range(machines)]
    cycle = [MachineState.RUNNING, MachineState.IDLE, MachineState.RUNNING, MachineState.DOWN]
    t0 = 1_763_900_000 * 1_000_000_000
    best = math.inf
    for b in range(batches + 1):
        ts = t0 + b * 20_000_000_000  # 20 s apart: every third batch closes the 1m windows
        states = [StateEvent(k, ts, cycle[(b + i) % 4]) for i, k in enumerate(keys)]
        counts = [CountEvent(k, ts + 1, 100 * (b + 1), 97 * (b + 1)) for k in keys]
        t = time.perf_counter()
        engine.update(states, counts, now_wall_ns=ts)
        if b:
            best = min(best, time.perf_counter() - t)
    return 2 * machines / best, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--per", type=int, default=100)
    ap.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up batch)")
    args = ap.parse_args(argv)
    batches = _batches(args.series, args.per, args.batches + 1)
    cfg = DetectionConfig()
    rows: list[tuple[str, float]] = []
    for name in CLASSIC_DETECTORS:
        det = make_detector(name, cfg)
        rows.append((name, _rate(lambda s, t, v, d=det: d.score_learn(s, v), batches)))
    mm = MachineModel(cfg.machine, cfg.grace_samples)
    rows.append(("machine model (4 default detectors, no siblings)", _rate(lambda s, t, v: mm.run(s, t, v), batches)))
    metrics = [f"m{i % 8}" for i in range(args.series)]
    machines = [MachineKey("s", f"a{i // 800}", "l", f"m{i // 8}") for i in range(args.series)]
    mm2 = MachineModel(cfg.machine, cfg.grace_samples)
    rows.append(("machine model, 8 metrics per machine, peers",
                 _rate(lambda s, t, v: mm2.run(s, t, v, machines=machines, metrics=metrics), batches)))
    default = AnomalyEngine(cfg)
    rows.append(("default engine (machine model + events, siblings, peers)",
                 _rate(lambda s, t, v: default.process(s, t, v, metrics, machines), batches)))
    default_rate = rows[-1][1]
    threaded = AnomalyEngine(DetectionConfig(threads=2))  # 13 areas of 100 machines: parts to split
    rows.append(("default engine, [detect] threads = 2",
                 _rate(lambda s, t, v: threaded.process(s, t, v, metrics, machines), batches)))
    lone = AnomalyEngine(DetectionConfig())
    lone_metrics = ["value"] * args.series
    rows.append(("default engine, lone series (calibrated, + seasonal)",
                 _rate(lambda s, t, v: lone.process(s, t, v, lone_metrics), batches)))
    cfg = DetectionConfig(detectors=CLASSIC_DETECTORS)
    metrics = ["temp_c"] * args.series
    classes = AnomalyEngine(cfg)
    classes._resolve(args.series, metrics)
    for prof in classes._profiles:
        prof.kernel = None  # the fallback path: the six detector classes one after the other
    rows.append(("engine, 6 separate classes", _rate(lambda s, t, v: classes.process(s, t, v, metrics), batches)))
    eng = AnomalyEngine(cfg)
    rows.append(("classic fused (engine, kernel + events)",
                 _rate(lambda s, t, v: eng.process(s, t, v, metrics), batches)))
    py = python_ewma_rate()
    rv = river_rate()
    fused = default_rate
    print(f"batch: {args.series} series × {args.per} samples = {args.series * args.per:,} samples; "
          f"best of {args.batches}")
    print(f"{'detector':58s} {'samples/s':>14s} {'× python ewma':>14s} {'× river HST':>12s}")
    for name, r in rows:
        rv_ratio = f"{r / rv:12.0f}" if rv else f"{'n/a':>12s}"
        print(f"{name:58s} {r:14,.0f} {r / py:14.0f} {rv_ratio}")
    print(f"{'python per-sample ewma loop':58s} {py:14,.0f} {1.0:14.0f} {py / rv if rv else float('nan'):12.1f}")
    oee_eps, oee_s = oee_rate()
    print(f"{'OEE update, 10,000 machines/batch':58s} {oee_eps:14,.0f} events/s ({oee_s * 1000:.0f} ms per batch)")
    if rv is None:
        print("river not installed")
    else:
        print(f"{'river HalfSpaceTrees (1 series)':58s} {rv:14,.0f} {rv / py:14.3f} {1.0:12.0f}")
    print(f"\ntargets (default engine): ≥ 10,000,000 samples/s ({'met' if fused >= 1e7 else 'NOT met'}); "
          f"≥ 200× river ({'met' if rv and fused / rv >= 200 else 'NOT met' if rv else 'n/a'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
