"""Crash safety cost: checkpoint size and time for 10,000 machines × 8 metrics, restore, restart with a backlog.

Builds a :class:`gateway.pipeline.Pipeline` with a real WAL in a temporary directory and feeds it like
``bench/memory.py`` (columnar telemetry for every machine, one state and one count message per machine
and round), so detectors, the machine model, OEE and the registry hold state for every series. Then:

* checkpoint: the in-loop copy (the pause between two batches) and the file write (a thread), its size;
* restore: a fresh pipeline loads the checkpoint (no WAL records after it);
* restart-to-ready: more rounds are fed after the checkpoint (the backlog a crash leaves to re-compute),
  the pipeline is dropped, and a new one opens the WAL (scan + crc of every record) and recovers
  (load + re-compute). Rates are per MB of WAL, so a 1 GiB backlog extrapolates linearly.

Run it in a fresh process (``bench/run.py`` does): ``python bench/checkpoint.py [--machines 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fakes import NullSink  # noqa: E402


def _wal_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("wal-*.seg"))


async def _run(machines: int, metrics: int, rounds: int, backlog_rounds: int, per: int, tmp: Path) -> dict[str, Any]:
    import numpy as np
    import orjson

    from gateway.checkpoint import write_checkpoint
    from gateway.config import GatewayConfig
    from gateway.pipeline import Pipeline
    from gateway.wal import WriteAheadLog

    wal_dir = tmp / "buffer"
    cfg = GatewayConfig.model_validate({
        "gateway": {"max_series": max(100_000, machines * metrics + 10)},
        "influx": {"batch_size": 5000},
        "buffer": {"dir": str(wal_dir), "max_bytes": "8GiB"},
    })

    def pipeline() -> tuple[Pipeline, WriteAheadLog]:
        wal = WriteAheadLog.from_config(cfg.buffer)
        return Pipeline(cfg, NullSink(), wal=wal, check_time_window=False, emit_stats=False), wal

    names = [f"metric_{k}" for k in range(metrics)]
    topics = [f"factory/plant1/area{i // 500}/line{i // 50}/m{i:05d}" for i in range(machines)]
    rng = np.random.default_rng(0)
    cycle = ["RUNNING", "IDLE", "RUNNING", "DOWN"]
    t_start = 1_763_900_000.0

    async def feed(pipe: Pipeline, first: int, n: int) -> int:
        samples = 0
        for r in range(first, first + n):
            ts = (t_start + (r * per + np.arange(per)) * 1.0).tolist()
            for i, base in enumerate(topics):
                vals = np.round(rng.standard_normal((metrics, per)) + 20, 3)
                pipe.submit(f"{base}/telemetry", orjson.dumps({"ts": ts, "values": dict(zip(names, vals.tolist(),
                                                                                             strict=True))}), None)
                pipe.submit(f"{base}/state", orjson.dumps({"ts": ts[0], "state": cycle[(r + i) % 4]}), None)
                pipe.submit(f"{base}/count", orjson.dumps({"ts": ts[-1], "total": 100 * (r + 1),
                                                           "good": 95 * (r + 1)}), None)
                samples += metrics * per
                if pipe.batch_full():
                    await pipe.flush()
            await pipe.flush()
        return samples

    pipe, wal = pipeline()
    pipe.recover(wal_dir / "checkpoint.npz")
    t0 = time.perf_counter()
    fed = await feed(pipe, 0, rounds)
    feed_s = time.perf_counter() - t0
    wal_per_sample = _wal_bytes(wal_dir) / fed

    t0 = time.perf_counter()
    state = pipe.snapshot_state()
    copy_s = time.perf_counter() - t0
    path = wal_dir / "checkpoint.npz"
    t0 = time.perf_counter()
    size = write_checkpoint(path, state, fingerprint=pipe.fingerprint(), wal_id=wal.last_id)
    write_s = time.perf_counter() - t0
    wal.cover(wal.last_id)
    wal.confirm(wal.last_id)  # the database has it all: only the backlog below is re-computed
    series = len(pipe.registry)

    # restore only: a fresh pipeline, the checkpoint covers every record
    wal.close()
    pipe2, wal2 = pipeline()
    t0 = time.perf_counter()
    pipe2.recover(path)
    restore_s = time.perf_counter() - t0
    assert len(pipe2.registry) == series

    # a backlog after the checkpoint, then a "crash" (no shutdown checkpoint) and a restart
    before = _wal_bytes(wal_dir)
    await feed(pipe2, rounds, backlog_rounds)
    backlog = _wal_bytes(wal_dir) - before
    wal2.close()
    t0 = time.perf_counter()
    wal3 = WriteAheadLog.from_config(cfg.buffer)
    open_s = time.perf_counter() - t0
    pipe3 = Pipeline(cfg, NullSink(), wal=wal3, check_time_window=False, emit_stats=False)
    t1 = time.perf_counter()
    pipe3.recover(path)
    recover_s = time.perf_counter() - t1
    ready_s = time.perf_counter() - t0
    replayed = pipe3.replayed_records
    wal3.close()
    mib = backlog / 2**20
    return {
        "machines": machines, "metrics": metrics, "series": series, "samples_fed": fed, "feed_seconds": feed_s,
        "checkpoint_bytes": size, "checkpoint_copy_s": copy_s, "checkpoint_write_s": write_s,
        "checkpoint_arrays": len(state.arrays), "restore_s": restore_s,
        "wal_bytes_per_sample": wal_per_sample, "backlog_bytes": backlog, "backlog_records": replayed,
        "wal_open_s": open_s, "recover_s": recover_s, "ready_s": ready_s,
        "ready_s_per_mib": ready_s / mib if mib else None,
        "ready_s_1gib_extrapolated": (open_s / mib * 1024 + (recover_s - restore_s) / mib * 1024 + restore_s)
        if mib else None,
        "wal_open_s_per_mib": open_s / mib if mib else None,
        "recompute_s_per_mib": (recover_s - restore_s) / mib if mib else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=10_000)
    ap.add_argument("--metrics", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backlog-rounds", type=int, default=3)
    ap.add_argument("--per", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=None, help="where the WAL goes (default: a temporary dir)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fgw-ckpt-", dir=a.dir))
    try:
        print(json.dumps(asyncio.run(_run(a.machines, a.metrics, a.rounds, a.backlog_rounds, a.per, tmp))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
