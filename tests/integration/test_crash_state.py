"""A crash changes nothing: derived outputs after SIGKILLs equal an uninterrupted run's — real servers.

The gateway is SIGKILLed several times while a publisher streams a shift of state and count messages
(OEE), or fault-injected telemetry (anomalies), over mosquitto. The reference is the same messages
through ``factory-gateway replay`` into another database. The short cases run in the default suite;
the long ones carry the ``chaos`` marker.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.gwproc import ROOT, GatewayProcess, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto

T0 = 1_763_618_400  # 2025-11-20T06:00Z
SHIFT = '[oee]\nwindows = ["1h"]\ntimezone = "UTC"\n[[oee.shifts]]\nname = "early"\nstart = "06:00"\nend = "14:00"\n'
ENV = {"FGW_GATEWAY__MAX_PAST_S": str(10 * 365 * 86400)}  # recorded data from 2025
# The peers' common mode depends on how arrival interleaves across batches (a message older than
# another machine's newer one in an earlier batch, as after a redelivery): machines of an area share it.
# Off here; everything else (machine model with regimes, siblings, fusion, state-change hold-off) is on.
DETECT = "[detect.machine]\nmin_peers = 1000000\n"


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxDB1, db: str, cid: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / f"{db}.toml",
        f"""
[gateway]
instance = "{cid}"
stats_interval_s = 3600
shutdown_timeout_s = 10
[mqtt]
host = "127.0.0.1"
port = {broker.port}
client_id = "{cid}"
reconnect_max_s = 1
[influx]
url = "{influx.url}"
database = "{db}"
flush_interval_ms = 50
batch_size = 2000
max_retry_s = 1
[buffer]
dir = "{tmp_path / cid}"
checkpoint_interval_s = 1.5  # kills land between checkpoints: restarts re-compute records
[deadletter]
path = "{tmp_path / cid}.deadletter.jsonl"
{extra}
""",
    )


def _shift_messages(machines: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The Vorne worked example (press1) and ``machines`` more: states now and then, a count a minute."""
    data = ROOT / "tests" / "data" / "replay" / "vorne_shift.jsonl"
    rows = [orjson.loads(line) for line in data.read_text().splitlines() if line]
    out: list[tuple[float, str, dict[str, Any]]] = [(r["payload"]["ts"], r["topic"], r["payload"]) for r in rows]
    rng = random.Random(seed)
    for m in range(machines):
        base = f"factory/plant1/assembly/line2/m{m:02d}"
        total = good = rng.randrange(0, 10_000)
        state = "RUNNING"
        out.append((T0 - 60 + m, f"{base}/state", {"ts": T0 - 60 + m, "state": state}))
        for k in range(8 * 60 + 2):
            t = T0 + 60 * k + m + 0.25
            if rng.random() < 0.04:
                state = rng.choice(["RUNNING", "RUNNING", "IDLE", "DOWN", "SETUP", "PLANNED_STOP"])
                out.append((t, f"{base}/state", {"ts": t, "state": state, "reason": "test"}))
            if state == "RUNNING":
                made = rng.randrange(40, 61)
                total += made
                good += made - rng.randrange(0, 3)
            out.append((t + 0.5, f"{base}/count", {"ts": t + 0.5, "total": total, "good": good}))
    out.sort(key=lambda r: r[0])
    return [(topic, payload) for _, topic, payload in out]


def _plant_messages(tmp_path: Path, machines: int, days: float, interval: float) -> list[tuple[str, Any]]:
    out = tmp_path / "plant.jsonl"
    subprocess.run([sys.executable, "-m", "devices.cli", "plant", "--machines", str(machines), "--days", str(days),
                    "--interval", str(interval), "--seed", "1", "--out", str(out),
                    "--faults", str(tmp_path / "faults.jsonl")], cwd=ROOT, check=True, capture_output=True)
    return [(r["topic"], r["payload"]) for r in map(orjson.loads, out.read_bytes().splitlines()) if r]


class _Throttled(threading.Thread):
    """Publishes QoS 1 at about ``rate`` messages/s, so the kills land in the middle of the stream."""

    def __init__(self, port: int, msgs: list[tuple[str, Any]], rate: float, client_id: str) -> None:
        super().__init__(daemon=True)
        self.port, self.msgs, self.rate, self.client_id = port, msgs, rate, client_id

    def run(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(1000)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        infos = []
        chunk = max(1, int(self.rate / 20))
        for i in range(0, len(self.msgs), chunk):
            for topic, payload in self.msgs[i : i + chunk]:
                infos.append(client.publish(topic, orjson.dumps(payload), qos=1))
            time.sleep(0.05)
        for info in infos:
            info.wait_for_publish(timeout=120)
        client.loop_stop()
        client.disconnect()


def _reference(tmp_path: Path, msgs: list[tuple[str, Any]], influx: InfluxDB1, db: str, extra: str) -> None:
    """The uninterrupted run: the same messages through ``replay`` (same decode → compute → encode)."""
    influx.create_database(db)
    lines = tmp_path / f"{db}.jsonl"
    lines.write_bytes(b"\n".join(orjson.dumps({"topic": t, "payload": p}) for t, p in msgs))
    cfg = write_config(tmp_path / f"{db}.toml", f'[influx]\nurl = "{influx.url}"\ndatabase = "{db}"\n{extra}')
    r = subprocess.run([sys.executable, "-m", "gateway", "replay", "--config", str(cfg), "--input", str(lines)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _crash_run(
    tmp_path: Path, mosquitto: Mosquitto, influx: InfluxDB1, db: str, msgs: list[tuple[str, Any]], *,
    extra: str, kills: int, rate: float, expect: tuple[str, int], between: tuple[float, float] = (0.6, 1.6),
) -> GatewayProcess:
    influx.create_database(db)
    cfg = _config(tmp_path, mosquitto, influx, db, f"gw-{db}", extra)
    rng = random.Random(11)
    gw = GatewayProcess(cfg, env=ENV).start()
    pub = _Throttled(mosquitto.port, msgs, rate, f"pub-{db}")
    pub.start()
    for _ in range(kills):
        time.sleep(rng.uniform(*between))
        gw.kill()
        gw = GatewayProcess(cfg, env=ENV).start()
    pub.join(timeout=300)
    measurement, n = expect
    assert wait_until(lambda: influx.count(measurement, db) >= n, timeout=120), gw.tail()
    time.sleep(1.0)  # the last batches: nothing more may come
    replayed = re.findall(r"(\d+) WAL records re-computed", gw.log.read_text())
    assert len(replayed) == kills
    assert kills == 0 or sum(map(int, replayed)) > 0, "no restart re-computed WAL records"
    return gw


def _rows(influx: InfluxDB1, db: str, query: str) -> list[dict[str, Any]]:
    return sorted(influx.query(query, db), key=lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))


def _exactly_once(influx: InfluxDB1, db: str, ref: str, measurement: str) -> int:
    """Every input point of ``measurement`` is in the crash run's database once, as in the reference."""
    got = _rows(influx, db, f'SELECT * FROM "{measurement}"')
    want = _rows(influx, ref, f'SELECT * FROM "{measurement}"')
    assert got == want
    return len(got)


def _shift_case(tmp_path: Path, mosquitto: Mosquitto, influx: InfluxDB1, name: str, machines: int,
                kills: int, rate: float) -> None:
    msgs = _shift_messages(machines, seed=5)
    _reference(tmp_path, msgs, influx, f"{name}_ref", SHIFT)
    counts = sum(1 for t, _ in msgs if t.endswith("/count"))
    gw = _crash_run(tmp_path, mosquitto, influx, name, msgs, extra=SHIFT, kills=kills, rate=rate,
                    expect=("production", counts))
    shift = 'SELECT * FROM "oee" WHERE "window" = \'shift\''
    got, want = _rows(influx, name, shift), _rows(influx, f"{name}_ref", shift)
    assert len(want) == machines + 1
    assert got == want  # every field, to the last digit
    press = next(r for r in got if r["machine"] == "press1")
    assert (round(press["oee"], 4), press["total_count"]) == (0.7479, 19271)
    hourly = 'SELECT * FROM "oee" WHERE "window" = \'1h\' AND time < \'2025-11-20T13:00:00Z\''
    assert _rows(influx, name, hourly) == _rows(influx, f"{name}_ref", hourly)
    assert _exactly_once(influx, name, f"{name}_ref", "production") == counts
    _exactly_once(influx, name, f"{name}_ref", "machine_state")
    assert gw.stop() == 0


def _anomaly_case(tmp_path: Path, mosquitto: Mosquitto, influx: InfluxDB1, name: str, machines: int, days: float,
                  interval: float, kills: int, rate: float) -> None:
    msgs = _plant_messages(tmp_path, machines, days, interval)
    _reference(tmp_path, msgs, influx, f"{name}_ref", DETECT)
    want = _rows(influx, f"{name}_ref", 'SELECT * FROM "anomaly"')
    assert len(want) >= 3, "the faults should flag something"
    points = influx.count("telemetry", f"{name}_ref")
    gw = _crash_run(tmp_path, mosquitto, influx, name, msgs, extra=DETECT, kills=kills, rate=rate,
                    expect=("telemetry", points), between=(1.5, 2.5))  # the first batch loads the compiled kernel
    got = _rows(influx, name, 'SELECT * FROM "anomaly"')
    assert got == want, (len(got), len(want))
    print(f"{name}: {len(got)} anomaly points equal the uninterrupted run's")
    _exactly_once(influx, name, f"{name}_ref", "telemetry")
    assert gw.stop() == 0


def test_shift_oee_equal_across_sigkills(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    _shift_case(tmp_path, mosquitto, influxdb, "crash_oee_short", machines=4, kills=3, rate=200)


def test_anomalies_equal_across_sigkills(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    _anomaly_case(tmp_path, mosquitto, influxdb, "crash_anomaly_short", machines=4, days=0.5, interval=10,
                  kills=2, rate=150)


@pytest.mark.chaos
@pytest.mark.timeout(1200)
def test_shift_oee_equal_across_many_sigkills(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    _shift_case(tmp_path, mosquitto, influxdb, "crash_oee_long", machines=12, kills=8, rate=200)


@pytest.mark.chaos
@pytest.mark.timeout(1200)
def test_a_day_of_anomalies_equal_across_sigkills(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    _anomaly_case(tmp_path, mosquitto, influxdb, "crash_anomaly_long", machines=12, days=1, interval=10,
                  kills=8, rate=250)

