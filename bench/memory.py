"""Memory: RSS of a gateway pipeline holding detector and OEE state for 10,000 machines × 8 metrics.

Builds a :class:`gateway.pipeline.Pipeline` with a sink that discards what it gets (no WAL), and feeds
columnar telemetry messages through ``submit``/``flush`` exactly as the MQTT source does: ``--rounds``
messages per machine of ``--per`` samples for each of the 8 metrics (50 samples per series by default),
flushing whenever ``batch_size`` points are pending (as ``replay`` does), so detector state carries
across batches. RSS is read from
``/proc/self/status`` (VmRSS; baseline = after imports and pipeline construction, before data). The
process sets glibc's mmap threshold as the gateway's ``run`` and ``replay`` do (:mod:`gateway.malloc`).

OEE: every round also sends one ``state`` and one ``count`` message per machine through ``submit``, so
the pipeline's OEE engine holds open 1m/1h windows for every machine, as in production.

Run it in a fresh process (``bench/run.py`` does): ``python bench/memory.py [--machines 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _malloc_trim() -> float | None:
    """RSS after glibc returns freed heap pages: separates live state from allocator slack."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_mb()


async def _feed(machines: int, metrics: int, rounds: int, per: int, batch_size: int) -> dict[str, Any]:
    import numpy as np
    import orjson

    from gateway.config import GatewayConfig
    from gateway.malloc import fix_mmap_threshold
    from gateway.pipeline import Pipeline
    from tests.fakes import NullSink

    fix_mmap_threshold()  # as `gateway run` and `replay` do at start (gateway/malloc.py)

    cfg = GatewayConfig.model_validate({
        "gateway": {"max_series": max(100_000, machines * metrics + 10)},
        "influx": {"batch_size": batch_size},
        "buffer": {"enabled": False},
    })
    pipe = Pipeline(cfg, NullSink(), check_time_window=False, emit_stats=False)
    names = [f"metric_{k}" for k in range(metrics)]
    topics = [f"factory/plant1/area{i // 500}/line{i // 50}/m{i:05d}/telemetry" for i in range(machines)]
    rng = np.random.default_rng(0)
    gc.collect()
    base = rss_mb()
    t0 = time.perf_counter()
    t_start = 1_763_900_000.0
    cycle = ["RUNNING", "IDLE", "RUNNING", "DOWN"]
    for r in range(rounds):
        ts = (t_start + (r * per + np.arange(per)) * 1.0).tolist()
        for i, topic in enumerate(topics):
            vals = np.round(rng.standard_normal((metrics, per)) + 20, 3)
            body = orjson.dumps({"ts": ts, "values": dict(zip(names, vals.tolist(), strict=True))})
            pipe.submit(topic, body, None)
            base_topic = topic.rsplit("/", 1)[0]
            pipe.submit(f"{base_topic}/state", orjson.dumps({"ts": ts[0], "state": cycle[(r + i) % 4]}), None)
            pipe.submit(f"{base_topic}/count", orjson.dumps({"ts": ts[-1], "total": 100 * (r + 1),
                                                             "good": 95 * (r + 1)}), None)
            if pipe.batch_full():  # as `replay` does: flush whenever batch_size points are pending
                await pipe.flush()
        await pipe.flush()
    feed_s = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()
    trimmed = _malloc_trim()
    series = len(pipe.registry)
    points = pipe.stats.points_in

    oee_machines = pipe.oee.machine_count if pipe.oee is not None else 0
    return {"machines": machines, "metrics": metrics, "series": series, "samples_per_series": rounds * per,
            "points_fed": points, "feed_seconds": feed_s, "rss_baseline_mb": base, "rss_after_mb": after,
            "rss_delta_mb": after - base, "rss_after_malloc_trim_mb": trimmed, "batch_size": batch_size,
            "oee_machines": oee_machines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=10_000)
    ap.add_argument("--metrics", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=5000, help="[influx] batch_size (default: the default)")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(_feed(a.machines, a.metrics, a.rounds, a.per, a.batch_size))))


if __name__ == "__main__":
    main()
