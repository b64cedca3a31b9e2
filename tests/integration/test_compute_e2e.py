"""Compute through the real servers: anomalies and simulator faults reach InfluxDB as `anomaly` points."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.gwproc import ROOT, GatewayProcess, publish, store_toml, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxDB1, db: str, client_id: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / "gw.toml",
        f"""
[gateway]
instance = "compute"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
client_id = "{client_id}"
{store_toml(tmp_path, influx.url, db)}
{extra}
""",
    )


def test_spike_becomes_anomaly_point(tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]) -> None:
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-spike")
    t0 = time.time() - 600
    spike_at = 400
    msgs = []
    for i in range(500):
        value = 60.0 + 0.5 * math.sin(i / 10) + 0.05 * ((i * 7919) % 13 - 6)
        if i == spike_at:
            value = 95.0
        msgs.append(("factory/p/a/l/press1/telemetry", {"ts": round(t0 + i, 3), "values": {"temp_c": value}}))
    with GatewayProcess(cfg) as gw:
        publish(mosquitto.port, msgs, client_id="pub-spike")
        assert wait_until(lambda: influx.count("telemetry", db) >= len(msgs), timeout=30), gw.tail()
        assert wait_until(lambda: influx.count("anomaly", db) >= 1, timeout=10), gw.tail()
        assert gw.stop() == 0
    rows = influx.query('SELECT * FROM "anomaly"', db)
    spike_ns = round(round(t0 + spike_at, 3) * 1e6) * 1000
    at_spike = [r for r in rows if r["time"] == spike_ns]
    assert at_spike, f"no anomaly at the spike; anomalies at {[r['time'] for r in rows][:10]}"
    r = at_spike[0]
    assert (r["machine"], r["metric"], r["value"]) == ("press1", "temp_c", 95.0)
    assert 0 < r["score"] <= 1
    assert r["expected"] < 70
    assert {x["detector"] for x in at_spike} >= {"fused"} or any(x["detector"] == "fused" for x in rows)


def test_simulator_10s_into_gateway(tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]) -> None:
    """The simulator for 10 s: telemetry, state and production for every machine; injected faults flagged."""
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-sim", extra='[oee]\nwindows = ["2s"]\nidle_close_s = 1')
    faults = tmp_path / "faults.jsonl"
    with GatewayProcess(cfg) as gw:
        sim = subprocess.run(
            [sys.executable, "-m", "devices.cli", "simulate", "--broker", f"127.0.0.1:{mosquitto.port}",
             "--machines", "20", "--rate", "5", "--duration", "10", "--seed", "3", "--time-scale", "60",
             "--count-every", "2", "--fault-at", "m004:spike:8", "--fault-at", "m007:stuck:2:8",
             "--fault-log", str(faults)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert sim.returncode == 0, sim.stderr
        time.sleep(1.5)
        assert gw.stop() == 0
    machines = {f"m{i:03d}" for i in range(1, 21)}
    for measurement in ("telemetry", "machine_state", "production", "oee"):
        got = {r["value"] for r in influx.query(f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "machine"', db)}
        assert got == machines, f"{measurement}: {sorted(machines - got)} missing"
    truth = [orjson.loads(line) for line in faults.read_text().splitlines()]
    assert {(f["machine"], f["kind"]) for f in truth} == {("m004", "spike"), ("m007", "stuck")}
    anomalies = influx.query('SELECT * FROM "anomaly"', db)
    for f in truth:
        lo, hi = round(f["start_ts"] * 1e9) - 10**9, round(f["end_ts"] * 1e9) + 5 * 10**9
        hits = [a for a in anomalies if a["machine"] == f["machine"] and a["metric"] == f["metric"]
                and lo <= a["time"] <= hi]
        assert hits, f"fault {f} not flagged; anomalies: {[(a['machine'], a['metric']) for a in anomalies][:20]}"


def test_vorne_shift_replayed_into_influxdb(tmp_path: Path, influx_db: tuple[InfluxDB1, str]) -> None:
    """The oee.com / Vorne worked example, fed as state and count messages through `replay`."""
    influx, db = influx_db
    data = ROOT / "tests" / "data" / "replay"
    cfg = write_config(
        tmp_path / "vorne.toml",
        (data / "vorne.toml").read_text() + f'\n[influx]\nurl = "{influx.url}"\ndatabase = "{db}"\n',
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "replay", "--config", str(cfg), "--input", str(data / "vorne_shift.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    [row] = influx.query("""SELECT * FROM "oee" WHERE "window" = 'shift'""", db)
    assert row["shift"] == "early"
    assert row["machine"] == "press1"
    assert abs(row["availability"] - 0.8881) <= 0.0005
    assert abs(row["performance"] - 0.8611) <= 0.0005
    assert abs(row["quality"] - 0.9780) <= 0.0005
    assert abs(row["oee"] - 0.7479) <= 0.0005
    assert (row["total_count"], row["good_count"]) == (19271, 18848)
    assert row["planned_s"] == 420 * 60
    assert row["down_s"] == 47 * 60
    assert row["time"] == 1763618400 * 10**9  # 2025-11-20T06:00:00Z, the window start
    hourly = influx.query("""SELECT "oee" FROM "oee" WHERE "window" = '1h'""", db)
    assert len(hourly) >= 8


def test_vorne_shift_over_mqtt_with_a_gateway_restart_mid_shift(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    """The Vorne shift published over MQTT; the gateway is restarted (SIGTERM) in the middle of the shift.

    The open shift window and the counter baselines are checkpointed at shutdown and restored, so the
    shift's OEE is the same as without the restart.
    """
    influx, db = influx_db
    data = ROOT / "tests" / "data" / "replay"
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-vorne-restart", extra=(
        '[oee]\nwindows = ["1h"]\ntimezone = "UTC"\ndefault_ideal_cycle_s = 1.0\n'
        '[[oee.shifts]]\nname = "early"\nstart = "06:00"\nend = "14:00"\n'
    ))
    env = {"FGW_GATEWAY__MAX_PAST_S": str(10 * 365 * 86400)}  # the example is from 2025
    records = [orjson.loads(line) for line in (data / "vorne_shift.jsonl").read_text().splitlines() if line]
    half = len(records) // 2
    done = 0
    for part in (records[:half], records[half:]):
        with GatewayProcess(cfg, env=env) as gw:
            publish(mosquitto.port, [(r["topic"], r["payload"]) for r in part], client_id="pub-vorne")
            done += sum(1 for r in part if r["topic"].endswith("/count"))
            expect = done
            assert wait_until(lambda e=expect: influx.count("production", db) >= e, timeout=30), gw.tail()
            time.sleep(0.5)
            assert gw.stop() == 0
    assert (tmp_path / "wal" / "checkpoint.npz").exists()
    [row] = influx.query("""SELECT * FROM "oee" WHERE "window" = 'shift'""", db)
    assert abs(row["oee"] - 0.7479) <= 0.0005
    assert (row["total_count"], row["good_count"]) == (19271, 18848)
