"""Backlog drain: how fast each subscriber empties a queued 100,000-message QoS 1 session at mosquitto.

Every subscriber has its own persistent session on one broker (``max_queued_messages`` 1,000,000,
persistence off so the broker does no disk work); each round publishes the backlog once (it queues in
every session at the same time), then drains the sessions one after another, in an order that
alternates between rounds. Nothing else runs, so no publisher competes for the cores. Subscribers:

* ``paho``       a bare paho 2.x client that only counts (automatic QoS 1 acks);
* ``mosquitto_sub`` the C client (``-c -q 1 -C N``), the broker's pace;
* ``source``     the gateway's MQTT source (``MqttSource``, default config: fast receive), a callback
  that only keeps the ack tokens, PUBACKs in groups of 1000 as the WAL would send them;
* ``source-paho`` the same with ``fast_receive = false`` (paho reads every packet).

Usage: ``python bench/ingest.py [--messages N] [--rounds R]``; prints msg/s per round and ratios to paho.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
for p in (str(BENCH.parent), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

TOPIC = "factory/#"
KINDS = ("paho", "mosquitto_sub", "source", "source-paho")


def drain_paho(port: int, n: int, create: bool = False, *, topic: str = TOPIC, client_id: str = "bench-paho") -> float:
    """A bare paho subscriber's persistent session: create it (``create``), or drain ``n`` messages; seconds."""
    import paho.mqtt.client as mqtt

    done = threading.Event()
    got = [0]

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                    protocol=mqtt.MQTTv311)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if create:
        c.subscribe(topic, qos=1)
        time.sleep(0.5)
    else:
        done.wait(600)
    dt = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return dt


def drain_mosquitto_sub(port: int, n: int, create: bool = False) -> float:
    base = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "bench-c", "-c", "-q", "1", "-t", TOPIC]
    t0 = time.perf_counter()
    subprocess.run([*base, "-E"] if create else [*base, "-C", str(n)], stdout=subprocess.DEVNULL, check=True,
                   timeout=600)
    return time.perf_counter() - t0


def drain_source(port: int, n: int, create: bool = False, fast: bool = True) -> float:
    from gateway.config import MqttConfig
    from gateway.sources.mqtt import MqttSource

    cfg = MqttConfig.model_validate({"port": port, "client_id": f"bench-src-{fast}", "topics": [TOPIC],
                                     "fast_receive": fast})

    async def main() -> float:
        tokens: list[Any] = []
        count = [0]
        finished = asyncio.Event()

        def on_message(_t: str, _p: bytes, tok: Any) -> None:
            count[0] += 1
            tokens.append(tok)
            if len(tokens) >= 1000 or count[0] >= n:
                src.ack(tokens)
                tokens.clear()
                if count[0] >= n:
                    finished.set()

        src = MqttSource(cfg, on_message)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(src.run(stop))
        if create:
            await src.connected.wait()
        else:
            await asyncio.wait_for(finished.wait(), 600)
        dt = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # the last PUBACKs go out
        stop.set()
        await task
        return dt

    return asyncio.run(main())


DRAIN = {"paho": drain_paho, "mosquitto_sub": drain_mosquitto_sub, "source": drain_source,
         "source-paho": lambda port, n, create=False: drain_source(port, n, create, fast=False)}


def run(messages: int = 100_000, rounds: int = 3) -> dict[str, Any]:
    from publisher import publish_parallel, telemetry_messages

    from tests.servers import Mosquitto

    msgs = telemetry_messages(messages, 50, time.time() - 600)
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="fgw-ingest-") as tmp, \
            Mosquitto(Path(tmp), persistence=False) as broker:
        for k in KINDS:
            DRAIN[k](broker.port, 0, True)
        for r in range(rounds):
            publish_parallel(broker.port, msgs, procs=2)
            order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
            for k in order:
                dt = DRAIN[k](broker.port, messages)
                rates[k].append(messages / dt)
                print(f"round {r + 1} {k:14s} {messages / dt:10,.0f} msg/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("\nmedian msg/s and ratio to the bare paho subscriber (same run):")
    for k in KINDS:
        print(f"  {k:14s} {med[k]:10,.0f}   {med[k] / med['paho']:5.2f}x   rounds: "
              + ", ".join(f"{x:,.0f}" for x in rates[k]))
    return {"messages": messages, "rounds": rates, "median": med}


def gateway_session(srv: Any, name: str, **cfg: Any) -> tuple[Path, float]:
    """Write a gateway config and create its persistent session (start to "subscribed", stop).

    Returns the config and the start-up time (process start to "subscribed" on the empty session:
    Python imports, connect), which :func:`drain_gateway` subtracts.
    """
    from e2e import gateway_config

    from tests.gwproc import GatewayProcess

    conf = gateway_config(srv, name, db=f"bench_{name}", **cfg)
    gw = GatewayProcess(conf)
    t0 = time.perf_counter()
    gw.start("subscribed", timeout=60)
    startup = time.perf_counter() - t0
    gw.stop()
    return conf, startup


def _logged_at(log: Path, text: str, after: int) -> float | None:
    """Wall-clock time of the last log line past byte ``after`` that contains ``text`` (asctime, local)."""
    with open(log, "rb") as fh:
        fh.seek(after)
        lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if text in ln]
    if not lines:
        return None
    stamp, _, ms = lines[-1][:23].partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def drain_gateway(srv: Any, name: str, conf: Path, startup: float, messages: int) -> dict[str, Any]:
    """The whole gateway drains its session's queued backlog into InfluxDB; points are counted there.

    Timed from the gateway's "fast receive on" log line (written at the CONNACK, before the first queued
    message is read) to InfluxDB holding every point; without fast receive, from the process start
    minus ``startup`` (the start-up on the empty session, a noisier estimate).
    """
    from e2e import _count, wait_for

    from tests.gwproc import GatewayProcess

    db = f"bench_{name}"
    gw = GatewayProcess(conf)
    offset = gw.log.stat().st_size if gw.log.exists() else 0
    t0 = time.perf_counter()
    gw.start("subscribed", timeout=60)
    got, seen = wait_for(lambda: _count(srv.influx, db, "telemetry", "temp_c"), messages, 300, every=0.05)
    total = time.perf_counter() - t0
    code = gw.stop()
    minus_startup = max(total - startup, 1e-3)
    connack = _logged_at(gw.log, "fast receive on", offset)
    seconds = max(seen - connack, 1e-3) if connack is not None else minus_startup
    return {"messages": messages, "points": got, "loss": messages - got, "seconds": seconds, "startup_s": startup,
            "seconds_minus_startup": minus_startup,
            "timed_from": "CONNACK log line" if connack is not None else "process start - start-up",
            "msgs_per_s": got / seconds, "gateway_exit": code}


def row_backlog(messages: int = 100_000, machines: int = 50, rounds: int = 1,
                gateways: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """bench/run.py row 1, backlog: bare paho, ``mosquitto_sub`` and whole gateways drain the same backlog.

    ``gateways`` maps a name to ``gateway_config`` overrides (``{}`` = the default config). Each round
    publishes ``messages`` once (they queue in every session at once) and drains the sessions one after
    another, the order reversed every other round; rates are per round, the medians are compared.
    """
    from e2e import servers
    from publisher import publish_parallel, telemetry_messages

    gateways = gateways if gateways is not None else {"default": {}}
    base = time.time() - 600
    kinds = ["paho", "mosquitto_sub", *(f"gateway_{g}" for g in gateways)]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    runs: dict[str, list[dict[str, Any]]] = {f"gateway_{g}": [] for g in gateways}
    with servers() as srv:
        drain_paho(srv.broker.port, 0, True)
        drain_mosquitto_sub(srv.broker.port, 0, True)
        sessions = {g: gateway_session(srv, f"backlog_{g}", **cfg) for g, cfg in gateways.items()}
        for r in range(rounds):  # new timestamps each round: the gateways' databases keep every round's points
            publish_parallel(srv.broker.port, telemetry_messages(messages, machines, base + 10 * r), procs=2)
            for k in kinds if r % 2 == 0 else reversed(kinds):
                if k.startswith("gateway_"):
                    g = k.removeprefix("gateway_")
                    res = drain_gateway(srv, f"backlog_{g}", *sessions[g], (r + 1) * messages)
                    res["messages"] = messages  # the database holds every round's points
                    res["points"] -= r * messages
                    res["loss"] = messages - res["points"]
                    res["msgs_per_s"] = res["points"] / res["seconds"]
                    runs[k].append(res)
                    rate = res["msgs_per_s"]
                else:
                    rate = messages / DRAIN[k](srv.broker.port, messages)
                rates[k].append(rate)
                print(f"        backlog round {r + 1} {k:18s} {rate:10,.0f} msg/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"messages": messages, "machines": machines, "rounds": rates, "median": med, "gateway_runs": runs,
            "loss": {k: sum(x["loss"] for x in v) for k, v in runs.items()}}


def run_gateway(messages: int = 100_000, rounds: int = 2) -> None:
    """The whole gateway (default config, detect on, WAL, InfluxDB 1.x) draining a queued backlog,
    with fast receive on and off (``BENCH_FAST_RECEIVE``), alternating rounds."""
    from e2e import servers
    from publisher import publish_parallel, telemetry_messages

    msgs = telemetry_messages(messages, 50, time.time() - 600)
    with servers() as srv:
        for r in range(rounds):
            for fast in ((True, False) if r % 2 == 0 else (False, True)):
                name = f"drain_{fast}_{r}"
                os.environ["BENCH_FAST_RECEIVE"] = "true" if fast else "false"
                conf, startup = gateway_session(srv, name)
                publish_parallel(srv.broker.port, msgs, procs=2)
                res = drain_gateway(srv, name, conf, startup, messages)
                print(f"round {r + 1} gateway fast_receive={fast!s:5s} {res['points']:,} points in "
                      f"{res['seconds']:.2f} s (timed from the {res['timed_from']}; process start - start-up: "
                      f"{res['seconds_minus_startup']:.2f} s): {res['msgs_per_s']:10,.0f} msg/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gateway", action="store_true", help="drain with the whole gateway into InfluxDB instead")
    a = ap.parse_args()
    if a.gateway:
        run_gateway(a.messages, a.rounds)
    else:
        run(a.messages, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
