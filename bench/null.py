"""False alarms on sensors with nothing wrong: anomaly points of lone series (a single sensor on its machine).

A series with no sibling metric is modelled by its own levels only, and its scores are calibrated against
their own distribution (``[detect.likelihood]``); how often that calibration alarms where nothing happens is
what an operator of single-sensor machines lives with. Each case is a series of its own machine, fed through
the default :class:`~gateway.detect.fusion.AnomalyEngine` (or ``--config``'s ``[detect]``) in batches, and
the ``fused`` anomaly points are counted. No anomaly is injected: every point is a false alarm.

- ``5 min × 14 days`` (4032 samples, NAB's cadence): white noise, the same read to integers, a daily sine
  plus noise (large and small), a clean sine, a day/night square wave, a daily cycle on weekdays only, a
  flat line, a slow random walk plus noise, log-normal and Poisson readings.
- ``10 s × 3 days`` (25,920 samples, a plant's cadence): white noise, the same read to 0.1, a day and a
  night level, log-normal readings (four single-sensor machines fed together).

With ``p_alarm`` = 1e-5 per score (5 scores), a well-calibrated series alarms about 0.2 times in 4032 samples
and 1.3 times in 25,920. Figures only, no asserts.

Usage: ``python bench/null.py [--seeds 0,1] [--config FILE.toml]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.batch import MachineKey  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.detect import AnomalyEngine, DetectionConfig  # noqa: E402
from gateway.detect.fusion import EVENT_NAMES  # noqa: E402

FUSED = EVENT_NAMES.index("fused")
START_S = 1_764_547_200  # Monday 2025-12-01 00:00 UTC


def slow_cases(rng: np.random.Generator, days: int = 14) -> dict[str, np.ndarray]:
    """Every 5 minutes for ``days`` days (from a Monday)."""
    n = days * 288
    day = 2 * np.pi * np.arange(n) * 300 / 86400
    weekday = (np.arange(n) // 288) % 7 < 5
    return {
        "white noise": rng.normal(50, 5, n),
        "white noise, integers": np.round(rng.normal(50, 5, n)),
        "daily sine + noise": 50 + 20 * np.sin(day) + rng.normal(0, 2, n),
        "daily sine + small noise": 50 + 20 * np.sin(day) + rng.normal(0, 0.2, n),
        "daily sine, clean": 50 + 20 * np.sin(day),
        "day/night square wave": np.where(np.sin(day) > 0, 80.0, 20.0),
        "weekday cycle, quiet weekend": 30 + np.where(weekday, 20 * np.sin(day), 0.0) + rng.normal(0, 2, n),
        "flat line": np.full(n, 42.0),
        "random walk + noise": 50 + np.cumsum(rng.normal(0, 1, n)) * 0.1 + rng.normal(0, 1, n),
        "log-normal": np.exp(rng.normal(3, 0.5, n)),
        "Poisson counts": rng.poisson(3, n).astype(float),
    }


def fast_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every 10 s for 3 days."""
    n = 3 * 8640
    t = np.arange(n) * 10
    return {
        "white noise": rng.normal(50, 2, n),
        "white noise, read to 0.1": np.round(rng.normal(50, 2, n), 1),
        "a day and a night level": 40 + 10 * (np.sin(2 * np.pi * t / 86400) > 0) + rng.normal(0, 1, n),
        "log-normal": np.exp(rng.normal(1, 0.4, n)),
    }


def count(cases: dict[str, np.ndarray], interval_s: int, cfg: DetectionConfig, batch: int) -> list[int]:
    """Fused anomaly points per case, the cases fed together as single-sensor machines."""
    names = list(cases)
    x = np.column_stack([cases[k] for k in names])
    n, k = x.shape
    ts = (START_S + np.arange(n, dtype=np.int64) * interval_s) * 10**9
    eng = AnomalyEngine(cfg)
    machines = [MachineKey("plant", "hall", "line", f"m{i}") for i in range(k)]
    hits = [0] * k
    for a in range(0, n, batch):
        b = min(n, a + batch)
        ev = eng.process(np.tile(np.arange(k, dtype=np.int64), b - a), np.repeat(ts[a:b], k), x[a:b].reshape(-1),
                         ["value"] * k, machines)
        for c, s in zip(ev.code.tolist(), ev.series.tolist(), strict=True):
            hits[s] += c == FUSED
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--config", type=Path, default=None, help="a gateway TOML whose [detect] section to use")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    cfg = load_config(a.config).detect if a.config else DetectionConfig()
    print(f"[detect.likelihood] law = {cfg.likelihood.law!r}, p_alarm = {cfg.likelihood.p_alarm:g}")
    for title, make, interval, batch in (("5 min x 14 days (4032 samples)", slow_cases, 300, 256),
                                         ("10 s x 3 days (25,920 samples)", fast_cases, 10, 500)):
        per_seed = []
        for seed in seeds:
            cases = make(np.random.default_rng(seed))
            per_seed.append(count(cases, interval, cfg, batch))
        print(f"\n{title}: fused anomaly points per series, seeds {','.join(map(str, seeds))}")
        for i, name in enumerate(cases):
            print(f"  {name:28s} {' '.join(f'{h[i]:5d}' for h in per_seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
