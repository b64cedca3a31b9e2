"""`make run`: local mosquitto + InfluxDB (data under .state/), a simulated fleet and the gateway.

Prints a live summary every few seconds; Ctrl-C, SIGTERM, SIGHUP (the terminal closed) or --duration stop
everything it started, by pid. Every child also gets SIGTERM from the kernel if this runner dies
(PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tests.servers  # noqa: E402
from tests.servers import InfluxDB1, Mosquitto, die_with_parent, free_port, stop_process  # noqa: E402

MEASUREMENTS = ("telemetry", "machine_state", "production", "anomaly", "oee", "vibration_features")


def _count(influx: InfluxDB1, db: str, measurement: str) -> int:
    try:
        rows = influx.query(f'SELECT count(*) FROM "{measurement}"', db)
    except Exception:
        return 0
    if not rows:
        return 0
    return max((int(v) for k, v in rows[0].items() if k.startswith("count_") and v is not None), default=0)


def _summary(influx: InfluxDB1, db: str, started: float) -> str:
    counts = {m: _count(influx, db, m) for m in MEASUREMENTS}
    machines = 0
    try:
        machines = len(influx.query('SHOW TAG VALUES FROM "telemetry" WITH KEY = "machine"', db))
    except Exception:
        pass
    stats = ""
    try:
        rows = influx.query('SELECT last(*) FROM "gateway_stats"', db)
        if rows:
            r = rows[0]
            stats = (f"gateway: {r.get('last_messages_in', 0)} msgs in, {r.get('last_points_written', 0)} points "
                     f"written, {r.get('last_decode_errors', 0)} rejected, last batch "
                     f"{float(r.get('last_batch_latency_ms') or 0):.0f} ms")
        if not stats:
            stats = "gateway: starting"
    except Exception:
        stats = "gateway: (no stats yet)"
    body = "  ".join(f"{m}={n}" for m, n in counts.items())
    return f"[{time.monotonic() - started:6.0f}s] machines={machines}  {body}\n          {stats}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1.0, help="telemetry messages per second per machine")
    ap.add_argument("--time-scale", type=float, default=60.0, help="compress state durations for the demo")
    ap.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)")
    ap.add_argument("--state-dir", type=Path, default=ROOT / ".state")
    ap.add_argument("--every", type=float, default=5.0, help="summary period in seconds")
    ap.add_argument("--sparkplug-machines", type=int, default=4,
                    help="machines of a second simulator that speaks Sparkplug B (0: none)")
    args = ap.parse_args()

    state = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    stop = False

    def _stop(sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        if sig == signal.SIGHUP:  # the terminal is gone: printing to it would fail before the cleanup
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    tests.servers.DIE_WITH_PARENT = True  # this runner is single-threaded: preexec_fn is safe here

    procs: list[subprocess.Popen[bytes]] = []
    http = f"127.0.0.1:{free_port()}"  # not the default 9273: an installed gateway may hold it
    print(f"operator's page: http://{http}/  (the plant, OEE, anomalies, gateway panel)", flush=True)
    with Mosquitto(state / "mosquitto", log_to=state / "mosquitto.log") as broker, \
            InfluxDB1(state / "influxdb", log_to=state / "influxdb.log") as influx:
        print(f"mosquitto on 127.0.0.1:{broker.port} (pid {broker.pid}), "
              f"InfluxDB on {influx.url} (pid {influx.pid}); data under {state}")
        env = dict(os.environ, FGW_MQTT__PORT=str(broker.port), FGW_INFLUX__URL=influx.url,
                   FGW_BUFFER__DIR=str(state / "buffer"), FGW_DEADLETTER__PATH=str(state / "deadletter.jsonl"),
                   FGW_HTTP__LISTEN=http)
        bindir = ROOT / ".venv" / "bin"
        gw_log = open(state / "gateway.log", "ab")  # noqa: SIM115
        sim_log = open(state / "simulator.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [str(bindir / "factory-gateway"), "run", "--config", str(ROOT / "configs" / "local.toml")],
            env=env, stdout=gw_log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent))
        time.sleep(1.5)
        procs.append(subprocess.Popen(
            [str(bindir / "factory-devices"), "simulate", "--broker", f"127.0.0.1:{broker.port}",
             "--machines", str(args.machines), "--rate", str(args.rate), "--time-scale", str(args.time_scale),
             "--faults", "drift,spike,stuck,bearing_wear", "--fault-log", str(state / "faults.jsonl"),
             "--waveform-hz", "1000", "--waveform-every", "10"],
            env=env, stdout=sim_log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent))
        spb_log = open(state / "simulator-sparkplug.log", "ab")  # noqa: SIM115
        if args.sparkplug_machines > 0:
            procs.append(subprocess.Popen(
                [str(bindir / "factory-devices"), "simulate", "--broker", f"127.0.0.1:{broker.port}",
                 "--machines", str(args.sparkplug_machines), "--rate", str(args.rate), "--time-scale",
                 str(args.time_scale), "--seed", "7", "--client-id", "factory-sim-sparkplug", "--sparkplug",
                 "--sparkplug-node", "cell7", "--faults", "drift,spike,stuck"],
                env=env, stdout=spb_log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent))
        print(f"gateway pid {procs[0].pid} (log {state / 'gateway.log'}), "
              f"simulator pid {procs[1].pid}: {args.machines} machines at {args.rate} Hz"
              + (f", Sparkplug B edge node cell7 (pid {procs[2].pid}): {args.sparkplug_machines} devices"
                 if args.sparkplug_machines > 0 else "") + ". Ctrl-C stops.")
        print(f"query: influx -port {influx.port} -database factory -execute 'SELECT * FROM telemetry LIMIT 5'")
        print(f"page: http://{http}/  health and metrics: curl http://{http}/readyz  http://{http}/metrics")
        started = time.monotonic()
        next_summary = started + args.every
        while not stop:
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            for p in procs:
                if p.poll() is not None:
                    print(f"process {p.args[0]} exited with {p.returncode}; stopping (see logs in {state})")
                    stop = True
            if time.monotonic() >= next_summary:
                print(_summary(influx, "factory", started), flush=True)
                next_summary += args.every
            time.sleep(0.2)
        print("stopping: simulator, gateway, then the servers")
        for p in reversed(procs):  # simulator first, then the gateway drains
            stop_process(p, timeout=20)
        print(_summary(influx, "factory", started))
        gw_log.close()
        sim_log.close()
        spb_log.close()
        codes = [p.returncode for p in procs]
    print(f"stopped (gateway exit {codes[0]}, simulator exit {', '.join(map(str, codes[1:]))})")
    return 0 if codes[0] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
