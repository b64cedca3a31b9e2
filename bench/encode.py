"""Line-protocol encoding: ``LineProtocolEncoder.telemetry`` vs influxdb-client's ``Point`` vs an f-string loop.

The three outputs are parsed with the tests' independent parser (``tests/lp_parser.py``) and compared
point by point before anything is timed.

Usage: ``python bench/encode.py [--rows 200000]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.batch import MachineKey, SeriesRegistry, TelemetryBatch  # noqa: E402
from gateway.encode import LineProtocolEncoder  # noqa: E402
from tests.lp_parser import parse_body  # noqa: E402


def make_batch(rows: int, machines: int = 50) -> tuple[SeriesRegistry, TelemetryBatch]:
    reg = SeriesRegistry()
    for i in range(machines):
        m = MachineKey("plant1", f"area{i // 10 + 1}", f"line{i % 2 + 1}", f"m{i + 1:04d}")
        for metric in ("temp_c", "vib"):
            reg.series_id(m, metric)
    rng = np.random.default_rng(0)
    series = np.arange(rows, dtype=np.int64) % len(reg)
    ts = 1_763_900_000_000_000_000 + (np.arange(rows, dtype=np.int64) // len(reg)) * 1_000_000
    values = np.round(rng.standard_normal(rows) * 10 + 50, 3)
    return reg, TelemetryBatch(series, ts, values)


def point_encode(reg: SeriesRegistry, batch: TelemetryBatch) -> bytes:
    from influxdb_client import Point, WritePrecision

    lines = []
    machines, metrics = reg.machines, reg.metrics
    for s, v, t in zip(batch.series.tolist(), batch.value.tolist(), batch.ts_ns.tolist(), strict=True):
        m = machines[s]
        p = (Point("telemetry").tag("site", m.site).tag("area", m.area).tag("line", m.line)
             .tag("machine", m.machine).field(metrics[s], v).time(t, WritePrecision.NS))
        lines.append(p.to_line_protocol())
    return "\n".join(lines).encode()


def naive_encode(reg: SeriesRegistry, batch: TelemetryBatch) -> bytes:
    """What one writes first: an f-string per row, no escaping, no prefix cache."""
    lines = []
    machines, metrics = reg.machines, reg.metrics
    for s, v, t in zip(batch.series.tolist(), batch.value.tolist(), batch.ts_ns.tolist(), strict=True):
        m = machines[s]
        lines.append(f"telemetry,area={m.area},line={m.line},machine={m.machine},site={m.site} {metrics[s]}={v} {t}")
    return "\n".join(lines).encode()


def _canon(body: bytes) -> list[tuple[Any, ...]]:
    """One entry per stored value (ours puts a machine's values with one timestamp on one line)."""
    return sorted((p.measurement, tuple(sorted(p.tags.items())), k, v, p.timestamp)
                  for p in parse_body(body) for k, v in p.fields.items())


def _best(fn: Callable[[], bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(rows: int = 200_000, repeat: int = 3) -> dict[str, Any]:
    reg, batch = make_batch(rows)
    enc = LineProtocolEncoder(reg)
    ours = enc.telemetry(batch)
    # Equivalence on a slice (the parser is pure Python and slow): the same values, tags and timestamps.
    check = min(rows, 20_000)
    sub = TelemetryBatch(batch.series[:check], batch.ts_ns[:check], batch.value[:check])
    a, b, c = _canon(enc.telemetry(sub)), _canon(point_encode(reg, sub)), _canon(naive_encode(reg, sub))
    if not (a == b == c):
        bad = next(i for i in range(min(len(a), len(b), len(c))) if not (a[i] == b[i] == c[i]))
        raise AssertionError(f"outputs differ at row {bad}: {a[bad]} / {b[bad]} / {c[bad]}")
    t_ours = _best(lambda: enc.telemetry(batch), repeat)
    t_point = _best(lambda: point_encode(reg, batch), max(1, repeat - 1))
    t_naive = _best(lambda: naive_encode(reg, batch), repeat)
    return {
        "rows": rows, "checked_rows": check, "equivalent": True, "body_bytes": len(ours),
        "ours_rows_per_s": rows / t_ours, "point_rows_per_s": rows / t_point, "naive_rows_per_s": rows / t_naive,
        "ratio_vs_point": t_point / t_ours, "ratio_vs_naive": t_naive / t_ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    print(json.dumps(run(ap.parse_args().rows), indent=2))


if __name__ == "__main__":
    main()
