"""Fault detection on a realistic plant: which labelled faults become `anomaly` points, how fast, and how
many points fire when nothing is wrong.

Usage::

    python bench/faults.py [--seeds 1,2,3] [--modes state,nostate] [--machines 24] [--days 3]
                           [--interval 10] [--machines-per-area 8] [--resolution METRIC=STEP,...]
                           [--sensors all|faulty] [--config FILE.toml] [--json FILE]

For each seed and mode the plant of ``devices/plant.py`` (24 machines x 3 days at 10 s from a Monday,
shift calendars, regimes, one labelled fault per machine) is written as a replay file, with (``state``)
or without (``nostate``) its state channel, and run through the gateway exactly as
``factory-gateway replay`` does (``gateway.server.replay``), with the default ``GatewayConfig`` (or
``--config``) and only ``buffer.enabled = false``; a capturing sink keeps the ``anomaly`` lines of the
line protocol. Nothing of the detectors is imported: the bench measures whatever they are.

The plant as it is elsewhere: ``--interval`` samples every N seconds (plants log at 1-60 s),
``--machines-per-area`` sets the peer groups (a hall of 3 machines or of 24), ``--resolution`` rounds
readings to their sensors' steps (``spindle_temp_c=0.1,vibration_mm_s=0.01,power_kw=0.01``: coarse
sensors, whose quiet levels read as constants that flip by one step), ``--sensors faulty`` has each
machine send only the metric its fault is on (machines with one sensor: every series lone).

Scoring (:func:`score`):

- caught: an anomaly point (any detector) for the fault's machine and metric in
  ``[onset, onset + window]``; windows: step 30 min, drift 6 h, spike 1 min, stuck 2 h, variance 3 h,
  dropout 20 min. Time to detection: first such point - onset (median minutes per kind).
- false alarms: distinct (machine, metric, 10-minute bucket) with an anomaly point after the first day
  (warm-up), leaving out points on a faulty machine + metric inside ``[onset, fault end + 10 min]``;
  per machine-day = count / (machines x (days - 1)). Also counted per detector (a bucket where several
  detectors fired counts once for each) and per metric.

Target: >= 90 % of faults caught and <= 1 false alarm per machine-day. Prints a table per mode and seed,
then a summary over seeds; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devices.plant import (  # noqa: E402
    FAULT_KINDS,
    SENSORS,
    WARMUP_S,
    PlantConfig,
    PlantFault,
    generate_plant,
    write_replay,
)
from gateway.config import GatewayConfig, load_config  # noqa: E402
from gateway.errors import ConfigError  # noqa: E402
from gateway.server import replay  # noqa: E402
from tests.lp_parser import parse_line  # noqa: E402

BUCKET_S = 600.0  # false alarms are counted per (machine, metric, 10-minute bucket)
FAULT_GRACE_S = 600.0  # points on the faulty series up to 10 min after the fault's end are not false alarms
TARGET_CAUGHT_PCT, TARGET_FA_PER_MACHINE_DAY = 90.0, 1.0
MODES = ("state", "nostate")


@dataclass(frozen=True, slots=True)
class AnomalyPoint:
    machine: str
    metric: str
    detector: str
    ts_s: float


class CaptureSink:
    """A sink that keeps the ``anomaly`` lines of every line-protocol body it is given."""

    name = "capture"

    def __init__(self) -> None:
        self.anomaly_lines: list[bytes] = []
        self.bodies = 0
        self.lines = 0

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        lines = body.split(b"\n")
        self.bodies += 1
        self.lines += len(lines)
        self.anomaly_lines.extend(line for line in lines if line.startswith(b"anomaly,"))

    async def close(self) -> None:
        return None


def parse_anomalies(lines: Iterable[bytes]) -> list[AnomalyPoint]:
    """The anomaly points of ``anomaly,<tags>,metric=..,detector=.. fields <ns>`` lines."""
    points = []
    for raw in lines:
        p = parse_line(raw.decode())
        if p.measurement != "anomaly" or p.timestamp is None:
            continue
        points.append(AnomalyPoint(p.tags["machine"], p.tags["metric"], p.tags["detector"], p.timestamp / 1e9))
    return points


def score(
    faults: Sequence[PlantFault],
    points: Sequence[AnomalyPoint],
    *,
    start_s: float,
    days: float,
    machines: int,
    warmup_s: float = WARMUP_S,
    bucket_s: float = BUCKET_S,
    grace_s: float = FAULT_GRACE_S,
    clock_jitter_s: float = 0.0,
) -> dict[str, Any]:
    """Caught faults per kind, time to detection and false alarms (see the module docstring).

    A fault's window and its exclusion from false alarms start ``clock_jitter_s`` before its onset: the
    devices' timestamps are that far off the grid the faults are labelled on.

    >>> f = PlantFault("m1", "s", "a", "l", "power_kw", "spike", 90_000.0, 90_000.0, 60.0, 0.1, 0.8)
    >>> r = score([f], [AnomalyPoint("m1", "power_kw", "fused", 90_030.0),
    ...                 AnomalyPoint("m1", "vibration_mm_s", "fused", 90_030.0)],
    ...           start_s=0.0, days=2.0, machines=1)
    >>> r["kinds"]["spike"]["caught"], r["kinds"]["spike"]["median_delay_min"], r["false_alarms"]
    (1, 0.5, 1)
    >>> r["metrics"]
    {'power_kw': {'caught': 1, 'total': 1}}
    """
    by_series: dict[tuple[str, str], list[AnomalyPoint]] = defaultdict(list)
    for p in points:
        by_series[(p.machine, p.metric)].append(p)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys([*FAULT_KINDS, *(f.kind for f in faults)]):
        kinds[kind] = {"caught": 0, "total": 0, "delays_min": [], "missed": []}
    excluded: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    metrics: dict[str, dict[str, int]] = {}  # caught of total per metric (a model's weak metric shows here)
    for f in faults:
        k = kinds[f.kind]
        k["total"] += 1
        m = metrics.setdefault(f.metric, {"caught": 0, "total": 0})
        m["total"] += 1
        series = by_series.get((f.machine, f.metric), ())
        hits = [p.ts_s for p in series if f.start_ts - clock_jitter_s <= p.ts_s <= f.start_ts + f.window_s]
        if hits:
            k["caught"] += 1
            m["caught"] += 1
            k["delays_min"].append(max(0.0, min(hits) - f.start_ts) / 60.0)
        else:
            k["missed"].append(f"{f.machine}/{f.metric}")
        excluded[(f.machine, f.metric)].append((f.start_ts - clock_jitter_s, f.end_ts + grace_s))
    for k in kinds.values():
        k["median_delay_min"] = statistics.median(k["delays_min"]) if k["delays_min"] else None
    alarms: set[tuple[str, str, int]] = set()
    per_detector: dict[str, set[tuple[str, str, int]]] = defaultdict(set)
    for p in points:
        if p.ts_s < start_s + warmup_s:
            continue
        if any(a <= p.ts_s <= b for a, b in excluded.get((p.machine, p.metric), ())):
            continue
        bucket = (p.machine, p.metric, int(p.ts_s // bucket_s))
        alarms.add(bucket)
        per_detector[p.detector].add(bucket)
    per_metric: dict[str, int] = defaultdict(int)
    for _, metric, _ in alarms:
        per_metric[metric] += 1
    machine_days = machines * (days - warmup_s / 86_400.0)
    caught = sum(k["caught"] for k in kinds.values())
    total = sum(k["total"] for k in kinds.values())
    return {
        "kinds": kinds,
        "metrics": dict(sorted(metrics.items())),
        "caught": caught,
        "total": total,
        "caught_pct": 100.0 * caught / total if total else None,
        "false_alarms": len(alarms),
        "machine_days": machine_days,
        "fa_per_machine_day": len(alarms) / machine_days if machine_days > 0 else None,
        "fa_by_detector": {d: len(s) for d, s in sorted(per_detector.items())},
        "fa_by_metric": dict(sorted(per_metric.items())),
        "points": len(points),
    }


async def _replay(cfg: GatewayConfig, path: Path) -> tuple[CaptureSink, Any]:
    sink = CaptureSink()
    pipeline = await replay(cfg, path, sink=sink)
    return sink, pipeline.stats


def run_one(seed: int, mode: str, machines: int, days: float, cfg: GatewayConfig, workdir: Path,
            sensors: str = "all", **extra: Any) -> dict[str, Any]:
    """Generate, replay through the gateway and score one plant (``sensors``: see
    :func:`devices.plant.replay_records`; ``extra``: more :class:`PlantConfig` fields); returns the score
    with run details."""
    t0 = time.perf_counter()
    plant = generate_plant(PlantConfig(machines=machines, days=days, seed=seed, **extra))
    path = workdir / f"plant-{seed}-{mode}.jsonl"
    messages = write_replay(plant, path, state_channel=mode == "state", sensors=sensors)
    t1 = time.perf_counter()
    sink, stats = asyncio.run(_replay(cfg, path))
    t2 = time.perf_counter()
    path.unlink()
    points = parse_anomalies(sink.anomaly_lines)
    result = score(plant.faults, points, start_s=float(plant.ts_s[0]), days=days, machines=machines,
                   clock_jitter_s=plant.config.clock_jitter_s)
    result.update({
        "seed": seed, "mode": mode, "machines": machines, "days": days, "messages": messages,
        "points_in": stats.points_in, "rejected": stats.decode_errors,
        "generate_s": round(t1 - t0, 2), "replay_s": round(t2 - t1, 2),
        "faults": [json.loads(f.to_json()) for f in plant.faults],
    })
    return result


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100.0 * a / b:.0f} %)" if b else "0/0"


def print_run(r: dict[str, Any]) -> None:
    print(f"\n== mode {r['mode']}, seed {r['seed']}: {r['machines']} machines x {r['days']:g} days, "
          f"{r['messages']:,} messages, {r['points_in']:,} points, {r['rejected']} rejected, "
          f"{r['points']:,} anomaly points (replay {r['replay_s']:.1f} s)")
    print(f"  {'kind':10s} {'caught':>14s} {'median delay':>14s}  missed")
    for kind, k in r["kinds"].items():
        delay = "-" if k["median_delay_min"] is None else f"{k['median_delay_min']:.1f} min"
        print(f"  {kind:10s} {_pct(k['caught'], k['total']):>14s} {delay:>14s}  {' '.join(k['missed'])}")
    print(f"  {'all':10s} {_pct(r['caught'], r['total']):>14s}")
    print("  caught by metric: " + ", ".join(f"{m} {v['caught']}/{v['total']}" for m, v in r["metrics"].items()))
    print(f"  false alarms: {r['false_alarms']} in {r['machine_days']:g} machine-days = "
          f"{r['fa_per_machine_day']:.2f} per machine-day")
    print("    by detector: " + (", ".join(f"{d} {n}" for d, n in r["fa_by_detector"].items()) or "none"))
    print("    by metric:   " + (", ".join(f"{m} {n}" for m, n in r["fa_by_metric"].items()) or "none"))


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: mean caught % and mean false alarms per machine-day over the seeds, against the targets."""
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        rs = [r for r in results if r["mode"] == mode]
        caught = statistics.mean(r["caught_pct"] for r in rs)
        fa = statistics.mean(r["fa_per_machine_day"] for r in rs)
        out[mode] = {
            "seeds": [r["seed"] for r in rs],
            "caught_pct": caught,
            "fa_per_machine_day": fa,
            "caught_per_kind_pct": {
                kind: 100.0 * sum(r["kinds"][kind]["caught"] for r in rs)
                / max(1, sum(r["kinds"][kind]["total"] for r in rs))
                for kind in rs[0]["kinds"]
            },
            "caught_per_metric": {
                metric: [sum(r["metrics"].get(metric, {}).get(c, 0) for r in rs) for c in ("caught", "total")]
                for metric in sorted({m for r in rs for m in r["metrics"]})
            },
            "meets_target": caught >= TARGET_CAUGHT_PCT and fa <= TARGET_FA_PER_MACHINE_DAY,
        }
    return out


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n== summary (mean over seeds); target >= {TARGET_CAUGHT_PCT:.0f} % caught, "
          f"<= {TARGET_FA_PER_MACHINE_DAY:g} false alarm per machine-day")
    kinds = list(next(iter(summary.values()))["caught_per_kind_pct"])
    print(f"  {'mode':8s} {'seeds':8s} {'caught':>8s} {'FA/m-day':>9s}  " + " ".join(f"{k:>8s}" for k in kinds)
          + "  target")
    for mode, s in summary.items():
        per_kind = " ".join(f"{s['caught_per_kind_pct'][k]:7.0f}%" for k in kinds)
        print(f"  {mode:8s} {','.join(map(str, s['seeds'])):8s} {s['caught_pct']:7.1f}% "
              f"{s['fa_per_machine_day']:9.2f}  {per_kind}  {'met' if s['meets_target'] else 'not met'}")
    for mode, s in summary.items():
        print(f"  {mode:8s} caught by metric: "
              + ", ".join(f"{m} {_pct(c, t)}" for m, (c, t) in s["caught_per_metric"].items()))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _resolution(text: str) -> dict[str, float]:
    """``metric=step,...``

    >>> _resolution("spindle_temp_c=0.1, vibration_mm_s=0.01")
    {'spindle_temp_c': 0.1, 'vibration_mm_s': 0.01}
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        metric, sep, step = part.partition("=")
        try:
            out[metric.strip()] = float(step) if sep else float("nan")
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected metric=step") from None
        if not sep or not out[metric.strip()] > 0:
            raise argparse.ArgumentTypeError(f"{part!r}: expected metric=step with step > 0")
    return out


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="plant seeds (default 1,2,3)")
    ap.add_argument("--modes", type=_modes, default=list(MODES), help="state,nostate (default both)")
    ap.add_argument("--machines", type=int, default=24)
    ap.add_argument("--days", type=float, default=3.0, help="days from Monday 00:00 UTC; the first is warm-up")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="seconds by which each machine's timestamps deviate from the grid, up to ± (default 0)")
    ap.add_argument("--machines-per-area", type=int, default=8, help="machines of a hall: a peer group (default 8)")
    ap.add_argument("--resolution", type=_resolution, default={},
                    help="sensor steps, metric=step,... (default: readings to 3 decimals)")
    ap.add_argument("--sensors", choices=SENSORS, default="all",
                    help="faulty: each machine sends only the metric its fault is on (single-sensor machines: "
                    "every series lone)")
    ap.add_argument("--config", type=Path, help="gateway TOML to use instead of the default GatewayConfig")
    ap.add_argument("--json", type=Path, help="write every figure (and the fault labels) here")
    a = ap.parse_args(argv)
    if a.days <= WARMUP_S / 86_400.0:
        ap.error("--days must be more than the 1-day warm-up")
    extra = {"interval_s": a.interval, "machines_per_area": a.machines_per_area, "resolution": a.resolution,
             "clock_jitter_s": a.jitter}
    try:
        PlantConfig(**extra)  # type: ignore[arg-type]
    except ValueError as exc:
        ap.error(str(exc))
    try:
        cfg = load_config(a.config) if a.config else GatewayConfig()
    except ConfigError as exc:
        for line in exc.problems:
            print(f"--config {a.config}: {line}", file=sys.stderr)
        return 2
    cfg.buffer = cfg.buffer.model_copy(update={"enabled": False})
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="fgw-faults-") as tmp:
        for mode in a.modes:
            for seed in a.seeds:
                r = run_one(seed, mode, a.machines, a.days, cfg, Path(tmp), a.sensors, **extra)
                print_run(r)
                results.append(r)
    summary = summarise(results)
    print_summary(summary)
    elapsed = time.perf_counter() - started
    print(f"\n{len(results)} runs in {elapsed:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"config": str(a.config) if a.config else "default",
                                      "plant": {**extra, "sensors": a.sensors},
                                      "runtime_s": elapsed, "summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
