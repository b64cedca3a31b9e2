"""Sparkplug B end to end: DDATA with 20 aliased metrics per message, drained from a queued backlog.

Edge nodes with devices publish an NBIRTH, a DBIRTH per device (20 metrics with names, aliases and
datatypes), then DDATA messages carrying the 20 metrics by alias only (Float, per-metric timestamps,
``seq`` per node). The messages queue in two persistent sessions at one mosquitto: a bare paho 2.x
subscriber that only counts (the ceiling of any Python subscriber, the same baseline as row 1) and the
gateway (default configuration plus ``format = "sparkplug"`` for ``spBv1.0/#``: host application,
births and aliases resolved, detectors, WAL, InfluxDB 1.x). Each drains its session; the gateway is
timed from its CONNACK ("fast receive on") to InfluxDB showing the last step's points (a query over
that one timestamp: counting every point each 50 ms would load InfluxDB with the poller's own work),
then one full count checks that every metric value is there (loss). Target (issue 11): the gateway's
msg/s ≥ 0.7× the bare subscriber's.

Usage: ``python bench/sparkplug.py [--messages N] [--rounds R]``; ``bench/run.py --only sparkplug``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
for p in (str(BENCH.parent), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

METRICS = 20
GROUP = "bench"
FIELD = "Motor/Temp00"  # the first metric's name: one point per DDATA in InfluxDB


def messages(n: int, nodes: int = 5, devices: int = 4, t0_ms: int | None = None) -> list[tuple[str, bytes]]:
    """Births, then ``n`` DDATA messages round-robin over ``nodes`` × ``devices`` (one per device per step)."""
    from gateway.sparkplug import sparkplug_b_pb2 as pb
    from gateway.sparkplug.decode import DataType

    t0 = t0_ms if t0_ms is not None else int((time.time() - 600) * 1000)
    names = [f"Motor/Temp{k:02d}" for k in range(METRICS)]
    seq = [0] * nodes
    out: list[tuple[str, bytes]] = []

    def nxt(node: int) -> int:
        s = seq[node]
        seq[node] = (s + 1) % 256
        return s

    for e in range(nodes):
        birth = pb.Payload(timestamp=t0, seq=nxt(e), metrics=[
            pb.Payload.Metric(name="bdSeq", datatype=DataType.Int64, long_value=0)])
        out.append((f"spBv1.0/{GROUP}/NBIRTH/E{e}", birth.SerializeToString()))
        for d in range(devices):
            dbirth = pb.Payload(timestamp=t0, seq=nxt(e), metrics=[
                pb.Payload.Metric(name=nm, alias=d * METRICS + k + 1, datatype=DataType.Float, float_value=20.0,
                                  timestamp=t0)  # aliases are unique within the edge node
                for k, nm in enumerate(names)])
            out.append((f"spBv1.0/{GROUP}/DBIRTH/E{e}/D{d}", dbirth.SerializeToString()))
    per_step = nodes * devices
    for i in range(n):
        step, which = divmod(i, per_step)
        e, d = divmod(which, devices)
        ts = t0 + 1 + step * 10
        data = pb.Payload(timestamp=ts, seq=nxt(e), metrics=[
            pb.Payload.Metric(alias=d * METRICS + k + 1, float_value=20.0 + k + (step % 7) * 0.1, timestamp=ts)
            for k in range(METRICS)])
        out.append((f"spBv1.0/{GROUP}/DDATA/E{e}/D{d}", data.SerializeToString()))
    return out


def _count_at(influx: Any, db: str, at_ms: int) -> int:
    """Points of ``FIELD`` with timestamp ``at_ms`` (0 while the database does not exist)."""
    try:
        rows = influx.query(f'SELECT count("{FIELD}") FROM "telemetry" WHERE time >= {at_ms}ms '
                            f"AND time < {at_ms + 1}ms", db)
    except Exception:
        return 0
    return int(rows[0]["count"]) if rows else 0


def _paho(port: int, n: int, create: bool = False) -> float:
    from ingest import drain_paho

    return drain_paho(port, n, create, topic="spBv1.0/#", client_id="bench-spb-paho")


def _gateway_config(srv: Any, name: str) -> Path:
    from e2e import gateway_config

    conf = gateway_config(srv, name, db=f"bench_{name}")
    text = conf.read_text().replace(
        "[mqtt]\n", '[mqtt]\ntopics = [{ topic = "spBv1.0/#", qos = 1, format = "sparkplug" }]\n', 1)
    conf.write_text(text)
    return conf


def run(n: int = 50_000, rounds: int = 1, profile: Path | None = None) -> dict[str, Any]:
    """Publish ``n`` DDATA (plus births) per round into both sessions, drain each; rates per round.

    ``profile``: record the gateway's first drain with py-spy into that file (perturbs that round).
    """
    from e2e import Profiler, _count, servers, wait_for
    from ingest import _logged_at
    from publisher import publish_parallel

    from tests.gwproc import GatewayProcess

    rates: dict[str, list[float]] = {"paho": [], "gateway": []}
    loss: list[int] = []
    with servers() as srv:
        _paho(srv.broker.port, 0, create=True)
        conf = _gateway_config(srv, "spb")
        gw = GatewayProcess(conf)
        gw.start("subscribed", timeout=60)
        gw.stop()
        db = "bench_spb"
        for r in range(rounds):
            # each round ~2.8 h earlier: new points, inside max_past_s (later ones were max_future_s rejects)
            t0_ms = int((time.time() - 600) * 1000) - r * 10**7
            msgs = messages(n, t0_ms=t0_ms)
            per_step = 20  # 5 nodes x 4 devices, as messages() makes them
            last_ms, last_step = t0_ms + 1 + (n - 1) // per_step * 10, n - (n - 1) // per_step * per_step
            births = 20  # the DBIRTHs (5 nodes x 4 devices) also store Motor/Temp00
            publish_parallel(srv.broker.port, msgs, procs=1)  # one publisher: births before data
            for kind in ("paho", "gateway") if r % 2 == 0 else ("gateway", "paho"):
                if kind == "paho":
                    rate = len(msgs) / _paho(srv.broker.port, len(msgs))
                else:
                    offset = gw.log.stat().st_size if gw.log.exists() else 0
                    gw = GatewayProcess(conf)
                    t0 = time.time()
                    gw.start("subscribed", timeout=60)
                    prof = Profiler(gw.proc.pid, profile, 60) if profile and r == 0 and gw.proc else None
                    want = (r + 1) * (n + births)  # each DBIRTH stores its values too
                    # Finish line: the last step's points visible (a query over the newest points only;
                    # counting every point each 50 ms loads InfluxDB with the poller's own work), then
                    # one full count for loss. The gateway writes its WAL records in order, one at a time.
                    _, seen = wait_for(lambda at=last_ms: _count_at(srv.influx, db, at), last_step, 300,
                                       every=0.05)
                    got, _ = wait_for(lambda: _count(srv.influx, db, "telemetry", FIELD), want, 30, every=0.2)
                    if prof is not None:
                        print(f"  profile: {prof.finish()}", flush=True)
                    gw.stop()
                    connack = _logged_at(gw.log, "fast receive on", offset) or t0
                    rate = (got - r * (n + births)) / max(seen - connack, 1e-3)
                    loss.append(want - got)
                rates[kind].append(rate)
                print(f"  sparkplug round {r + 1} {kind:8s} {rate:10,.0f} msg/s ({rate * METRICS:12,.0f} metrics/s)",
                      flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["gateway"] / med["paho"]
    print(f"  sparkplug: gateway {med['gateway']:,.0f} msg/s = {ratio:.2f}x bare paho ({med['paho']:,.0f}); "
          f"loss {sum(loss)}; target >= 0.7x: {'met' if ratio >= 0.7 else 'NOT met'}", flush=True)
    return {"messages": n, "metrics_per_message": METRICS, "rounds": rates, "median": med, "ratio": ratio,
            "loss": sum(loss), "target_ratio": 0.7}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy raw stacks of the first gateway drain")
    args = ap.parse_args()
    run(args.messages, args.rounds, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
