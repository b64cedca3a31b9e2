"""End to end through the real servers: paho → mosquitto → gateway → InfluxDB 1.x / VictoriaMetrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gwproc import ROOT, GatewayProcess, publish, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto, VictoriaMetrics

MACHINES = 50
PER_MACHINE = 200


def _config(tmp_path: Path, broker: Mosquitto, influx_section: str, client_id: str) -> Path:
    return write_config(
        tmp_path / "gw.toml",
        f"""
[gateway]
instance = "it"
stats_interval_s = 1
[mqtt]
host = "127.0.0.1"
port = {broker.port}
client_id = "{client_id}"
[influx]
{influx_section}
flush_interval_ms = 100
batch_size = 5000
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'deadletter.jsonl'}"
""",
    )


def _fleet(t0: float) -> list[tuple[str, dict[str, object]]]:
    msgs = []
    for i in range(PER_MACHINE):
        for m in range(MACHINES):
            ts = t0 + i * 0.5 + m * 0.001
            msgs.append((
                f"factory/plant{m % 2}/area{m % 5}/line{m % 3}/m{m:03d}/telemetry",
                {"ts": round(ts, 3), "seq": i, "values": {"temp_c": 20.0 + m + i / 1000, "vib": float(i % 17) / 7}},
            ))
    return msgs


def test_10k_qos1_messages_land_exactly_in_influxdb(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, f'url = "{influx.url}"\ndatabase = "{db}"', "gw-e2e-v1")
    t0 = time.time() - 3600
    msgs = _fleet(t0)
    with GatewayProcess(cfg) as gw:
        assert publish(mosquitto.port, msgs) == MACHINES * PER_MACHINE
        assert wait_until(lambda: influx.count("telemetry", db) >= len(msgs), timeout=60), gw.tail()
        code = gw.stop()
    assert code == 0, gw.tail()
    rows = influx.query('SELECT "temp_c", "vib", "site", "area", "line", "machine" FROM "telemetry"', db)
    assert len(rows) == len(msgs)
    got = {(r["machine"], r["time"]): r for r in rows}
    for topic, payload in msgs:
        _, site, area, line, machine, _ = topic.split("/")
        ts_ns = round(float(payload["ts"]) * 1e6) * 1000  # type: ignore[arg-type]
        row = got[(machine, ts_ns)]
        values = payload["values"]
        assert (row["site"], row["area"], row["line"]) == (site, area, line)
        assert row["temp_c"] == values["temp_c"]  # type: ignore[index]
        assert row["vib"] == values["vib"]  # type: ignore[index]
    stats = influx.query('SELECT last("decode_errors") FROM "gateway_stats"', db)
    assert stats
    assert stats[0]["last"] == 0


def test_v2_api_into_victoriametrics(tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics) -> None:
    cfg = _config(
        tmp_path, mosquitto,
        f'url = "{victoria.url}"\napi = "v2"\nbucket = "plant"\norg = "acme"\ntoken = "unused"',
        "gw-e2e-v2",
    )
    t0 = time.time() - 7200
    msgs = _fleet(t0)[: 20 * MACHINES]
    with GatewayProcess(cfg) as gw:
        publish(mosquitto.port, msgs, client_id="pub-v2")

        def landed() -> bool:
            series = victoria.export('{__name__="telemetry_temp_c"}')
            return sum(len(s["values"]) for s in series) >= len(msgs)

        assert wait_until(landed, timeout=60), gw.tail()
        assert gw.stop() == 0
    series = victoria.export('{__name__="telemetry_temp_c"}')
    got = {}
    for s in series:
        for v, t in zip(s["values"], s["timestamps"], strict=True):
            got[(s["metric"]["machine"], t)] = v
    assert len(got) == len(msgs)
    for topic, payload in msgs:
        machine = topic.split("/")[4]
        t_ms = round(float(payload["ts"]) * 1000)  # type: ignore[arg-type]
        assert got[(machine, t_ms)] == payload["values"]["temp_c"]  # type: ignore[index]


def test_mosquitto_pub_by_the_contract(tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]) -> None:
    """A client no one here wrote publishes by the README's contract; the points appear exactly."""
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, f'url = "{influx.url}"\ndatabase = "{db}"', "gw-e2e-pub")
    ts = int(time.time()) - 60
    with GatewayProcess(cfg) as gw:
        for topic, body in [
            ("factory/p/a/l/press1/telemetry", f'{{"ts": {ts}.25, "values": {{"spindle_temp_c": 61.2}}}}'),
            ("factory/p/a/l/press1/state", f'{{"ts": {ts}, "state": "DOWN", "reason": "jam"}}'),
            ("factory/p/a/l/press1/count", f'{{"ts": {ts}, "total": 19271, "good": 18848}}'),
            ("factory/p/a/l/press1/telemetry", f"env,probe=x humidity=40.5 {ts}000000000"),
        ]:
            subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t", topic, "-m", body],
                           check=True)
        assert wait_until(lambda: influx.count("env", db) == 1 and influx.count("production", db) == 1), gw.tail()
        assert gw.stop() == 0
    [t] = influx.query('SELECT * FROM "telemetry"', db)
    assert (t["time"], t["spindle_temp_c"], t["machine"]) == (ts * 10**9 + 250_000_000, 61.2, "press1")
    [s] = influx.query('SELECT * FROM "machine_state"', db)
    assert (s["state"], s["reason"]) == ("DOWN", "jam")
    [p] = influx.query('SELECT * FROM "production"', db)
    assert (p["total"], p["good"]) == (19271, 18848)
    [e] = influx.query('SELECT * FROM "env"', db)
    assert (e["humidity"], e["probe"], e["machine"], e["site"]) == (40.5, "x", "press1", "p")


def test_check_config_names_keys(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", '[influx]\nurl = "localhost"\n[mqtt]\nport = 0\n')
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "influx.url:" in r.stderr
    assert "mqtt.port:" in r.stderr
    good = ROOT / "configs" / "local.toml"
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


@pytest.mark.parametrize("sink", ["stdout"])
def test_replay_stdout_golden(sink: str) -> None:
    data = ROOT / "tests" / "data" / "replay"
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "replay", "--config", str(data / "golden.toml"),
         "--input", str(data / "golden.jsonl"), "--sink", sink],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    expected = (data / "golden.expected.lp").read_text()
    assert r.stdout == expected
