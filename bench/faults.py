"""Fault detection on the simulated plant: which injected faults become `anomaly` events, and how many
events fire when nothing is wrong.

The fleet simulator (``devices/``) runs N machines for H simulated hours at 1 Hz (state durations
compressed 60×, as in ``make run``); every machine gets one scheduled fault of each kind in turn
(drift, spike, stuck, bearing_wear) at a random time. The same engines as the live gateway (default
``[detect]``, the state-change hold-off fed by the state channel, and the ISO 10816 severity monitor on
``vibration_mm_s``) score every sample, in 6,000-row batches. A fault counts as found when an event for its
machine and metric falls between its start and 10 minutes after (its ground truth is the simulator's
fault log); every other event is a false alarm.

Usage: ``python bench/faults.py [--machines 20] [--hours 2] [--seed 1]``
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devices.fleet import fleet_layout  # noqa: E402
from devices.machine import FaultKind, FaultPlan, Machine, ScheduledFault  # noqa: E402
from gateway.batch import (  # noqa: E402
    MachineKey,
    SeriesRegistry,
    StateEvent,
)
from gateway.detect.config import DetectionConfig  # noqa: E402
from gateway.detect.context import StateChangeFilter  # noqa: E402
from gateway.detect.fusion import AnomalyEngine  # noqa: E402
from gateway.features import FeaturesConfig, SeverityMonitor  # noqa: E402
from gateway.pipeline import severity_events  # noqa: E402

METRIC = {FaultKind.DRIFT: "spindle_temp_c", FaultKind.SPIKE: "power_kw", FaultKind.STUCK: "spindle_temp_c",
          FaultKind.BEARING_WEAR: "vibration_mm_s"}
KINDS = list(METRIC)


def run(machines: int, hours: float, seed: int, time_scale: float = 1.0, holdoff_s: float = 120.0,
        overrides: dict[str, Any] | None = None) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    seconds = int(hours * 3600)
    specs = fleet_layout(machines)
    faults: dict[tuple[str, str], tuple[float, FaultKind]] = {}
    fleet = []
    t0 = 1_763_900_000.0
    for i, spec in enumerate(specs):
        kind = KINDS[i % len(KINDS)]
        at = float(rng.uniform(600, seconds - 900))  # after warm-up, and room for the fault to show
        fleet.append(Machine(spec, seed, time_scale=time_scale,
                             faults=FaultPlan(scheduled=(ScheduledFault(kind, at, metric=METRIC[kind]),))))
        faults[(spec.name, METRIC[kind])] = (t0 + at, kind)
    reg = SeriesRegistry()
    cfg = DetectionConfig(state_change_holdoff_s=holdoff_s, **(overrides or {}))
    engine = AnomalyEngine(cfg)
    context = StateChangeFilter(cfg.state_change_holdoff_s)
    severity = SeverityMonitor(FeaturesConfig(), {})
    states: list[StateEvent] = []
    rows: list[tuple[int, int, float]] = []
    events: list[tuple[int, int, str]] = []

    def flush() -> None:
        if not rows:
            return
        a = np.asarray(rows)
        context.observe(states)  # the pipeline does the same with the state channel of each batch
        states.clear()
        ev = engine.process(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], reg.metrics)
        ev = context.keep(ev, reg.machines)
        events.extend(zip(ev.series.tolist(), ev.ts_ns.tolist(), ev.detector, strict=True))
        sev = severity.process(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], reg.metrics, reg.machines)
        sev_ev = context.keep(severity_events(sev), reg.machines)
        events.extend((s, t, "iso10816") for s, t in zip(sev_ev.series.tolist(), sev_ev.ts_ns.tolist(), strict=True))
        rows.clear()

    for s in range(seconds):
        for m in fleet:
            for e in m.step(t0 + s):
                if e.channel == "state":
                    st = e.message
                    states.append(StateEvent(MachineKey("plant1", "a", "l", m.spec.name),
                                             round(float(st.ts) * 1e6) * 1000, st.state))  # type: ignore[union-attr,arg-type]
                if e.channel != "telemetry":
                    continue
                msg = e.message
                for name, v in msg.values.items():  # type: ignore[union-attr]
                    key = MachineKey("plant1", "a", "l", m.spec.name)
                    rows.append((reg.series_id(key, name), round(float(msg.ts) * 1e6) * 1000, v))  # type: ignore[union-attr]
        if len(rows) >= 6000:
            flush()
    flush()
    found: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    false_alarms = collections.Counter()
    for sid, ts, det in events:
        key = (reg.machines[sid].machine, reg.metrics[sid])
        f = faults.get(key)
        if f is not None and f[0] * 1e9 <= ts <= (f[0] + 600) * 1e9:
            found[key].add(det)
        else:
            false_alarms[det] += 1
    per_kind = {k.value: [0, 0] for k in KINDS}
    for key, (_, kind) in faults.items():
        per_kind[kind.value][1] += 1
        per_kind[kind.value][0] += bool(found.get(key))
    fused_false = false_alarms["fused"]
    return {"machines": machines, "hours": hours, "samples": seconds * machines * 3,
            "found": {k: f"{a}/{b}" for k, (a, b) in per_kind.items()},
            "false_events": dict(false_alarms), "fused_false_per_machine_hour": fused_false / (machines * hours)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--holdoff", type=float, default=120.0, help="[detect] state_change_holdoff_s")
    ap.add_argument("--time-scale", type=float, default=1.0, help="compress state durations (make run uses 60)")
    a = ap.parse_args(argv)
    r = run(a.machines, a.hours, a.seed, a.time_scale, a.holdoff)
    print(f"{r['machines']} machines x {r['hours']} h at 1 Hz ({r['samples']:,} samples), default [detect], "
          f"state_change_holdoff_s={a.holdoff:g}")
    print("faults found (an event on the faulty metric within 10 min of the start):")
    for kind, frac in r["found"].items():  # type: ignore[attr-defined]
        print(f"  {kind:14s} {frac}")
    print(f"events outside any fault: {r['false_events']} "
          f"({r['fused_false_per_machine_hour']:.2f} fused per machine-hour)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
