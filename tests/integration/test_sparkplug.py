"""Sparkplug B end to end: edge nodes → mosquitto → gateway (host application) → InfluxDB.

The edge node of the first test is Eclipse Tahu's JavaScript client (tests/node/edge.js on the npm
packages sparkplug-client / sparkplug-payload that setup installs); the fault cases publish raw
protobuf with paho.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from gateway.sparkplug import sparkplug_b_pb2 as pb
from tests.gwproc import ROOT, GatewayProcess, store_toml, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto

NODE_DIR = ROOT / "tests" / "node"


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxDB1, db: str, host_id: str) -> Path:
    return write_config(tmp_path / "gw.toml", f"""
[gateway]
instance = "it"
[mqtt]
port = {broker.port}
client_id = "gw-{host_id}"
clean_session = true
topics = [{{ topic = "spBv1.0/#", qos = 1, format = "sparkplug" }}]
{store_toml(tmp_path, influx.url, db)}
[sparkplug]
host_id = "{host_id}"
reorder_timeout_s = 0.5
rebirth_interval_s = 0.2
""")


class Watcher:
    """A paho subscriber keeping every message (topic, payload, retain) it sees."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(t, 1) for t in topics])
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self._lock:
            return [(p, r) for t, p, r in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _field(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def test_tahu_edge_node_births_aliases_rebirth_and_death(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "sparkplug-client").is_dir():
        pytest.fail("Node.js and tests/node/node_modules are installed by `make setup`", pytrace=False)
    influx, db = influx_db
    n = 50
    edge, device = f"edge-{uuid.uuid4().hex[:6]}", "press 1"
    with GatewayProcess(_config(tmp_path, mosquitto, influx, db, "gw-tahu")) as gw:
        proc = subprocess.Popen(["node", "edge.js", str(mosquitto.port), "Plant1", edge, device, str(n)],
                                cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=lambda: [events.put(json.loads(line)) for line in proc.stdout or []],
                         daemon=True).start()
        seen: list[dict[str, Any]] = []

        def until(event: str, timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while not any(e["event"] == event for e in seen):
                try:
                    seen.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
                except queue.Empty:
                    raise AssertionError(f"edge node never said {event!r}: {seen}\n{gw.tail()}") from None

        try:
            until("unknown_alias")
            until("rebirth_requested")  # the gateway asked (NCMD) and Tahu's client understood it
            until("births")
            temp = _field("Motor/Temperature")
            landed = wait_until(lambda: influx.count("telemetry", db, "Motor/Temperature") >= n + 1, timeout=30)
            assert landed, gw.tail()
            rows = influx.query(f'SELECT {temp}, {_field("Motor/RPM")}, {_field("Motor/Offset")}, '
                                f'{_field("Motor/Running")}, {_field("Motor/Energy")} FROM telemetry '
                                f"WHERE machine = 'press 1' AND line = '{edge}'", db)
            assert len(rows) == n + 1  # the birth (rewritten by the rebirth: same timestamp) and every DDATA
            birth, data = rows[0], rows[1:]
            assert (birth["Motor/Temperature"], birth["Motor/RPM"], birth["Motor/Offset"], birth["Motor/Running"],
                    birth["Motor/Energy"]) == (60.5, 1500, -3, 1, -1234567890123)
            assert [r["Motor/RPM"] for r in data] == [-i for i in range(1, n + 1)]  # alias-only, signed Int32
            assert [r["Motor/Temperature"] for r in data] == [60.5 + i / 10 for i in range(1, n + 1)]
            [node] = influx.query(f'SELECT {_field("Node/Uptime")}, {_field("Node/Firmware")}, site, area '
                                  f"FROM telemetry WHERE machine = '{edge}'", db)
            assert (node["Node/Uptime"], node["Node/Firmware"], node["site"], node["area"]) == (
                42, 'v1.2, "beta"', "Plant1", "sparkplug")
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            until("stopped")

            def offline() -> list[dict[str, Any]]:
                return influx.query(f"SELECT * FROM device_status WHERE line = '{edge}' AND online = false", db)

            assert wait_until(lambda: len(offline()) == 2, timeout=20), gw.tail()
            assert {r["machine"] for r in offline()} == {edge, device}
            online = influx.query(f"SELECT * FROM device_status WHERE line = '{edge}' AND online = true", db)
            assert {r["machine"] for r in online} == {edge, device}
            assert gw.stop() == 0
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
    dead = [orjson.loads(line) for line in (tmp_path / "deadletter.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dead] == ["1 of 1 metrics not stored: alias 999 is not in the births of "
                                           f"Plant1/{edge}/press 1"]


def _payload(seq: int | None, *metrics: pb.Payload.Metric, ts: int | None = None) -> bytes:
    p = pb.Payload(timestamp=ts or int(time.time() * 1000), metrics=list(metrics))
    if seq is not None:
        p.seq = seq
    return p.SerializeToString()


_CLOCK = iter(range(int(time.time() * 1000) - 60_000, 1 << 62))  # one distinct ms per metric


def _m(name: str = "", alias: int | None = None, **kw: Any) -> pb.Payload.Metric:
    m = pb.Payload.Metric(name=name, timestamp=next(_CLOCK), **kw)
    if alias is not None:
        m.alias = alias
    return m


def test_raw_protobuf_seq_gap_rebirth_ndeath_and_primary_host_state(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    group, edge, host = "G", f"raw-{uuid.uuid4().hex[:6]}", f"host-{uuid.uuid4().hex[:6]}"
    state_topic, ncmd = f"spBv1.0/STATE/{host}", f"spBv1.0/{group}/NCMD/{edge}"
    watch = Watcher(mosquitto.port, [state_topic, ncmd])
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-{edge}")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()

    def send(kind: str, body: bytes, device: str | None = None) -> None:
        topic = f"spBv1.0/{group}/{kind}/{edge}" + (f"/{device}" if device else "")
        pub.publish(topic, body, qos=1).wait_for_publish(10)

    gw = GatewayProcess(_config(tmp_path, mosquitto, influx, db, host)).start()
    try:
        # STATE: retained online while up, with the Will's timestamp
        assert wait_until(lambda: any(orjson.loads(p)["online"] for p, _ in watch.on(state_topic)), timeout=10)
        late = Watcher(mosquitto.port, [state_topic])  # a new subscriber gets the retained STATE
        assert wait_until(lambda: bool(late.on(state_topic)), timeout=10)
        [(retained, flag)] = late.on(state_topic)
        assert flag
        assert orjson.loads(retained)["online"] is True
        late.close()

        send("NBIRTH", _payload(0, _m("bdSeq", datatype=4, long_value=1), _m("Temp", 1, datatype=9, float_value=20.0)))
        send("DBIRTH", _payload(1, _m("Speed", 2, datatype=3, int_value=10)), "d1")
        send("NDATA", _payload(2, _m(alias=1, float_value=21.0)))
        send("NDATA", _payload(5, _m(alias=1, float_value=22.0)))  # 3 and 4 never come
        assert wait_until(lambda: bool(watch.on(ncmd)), timeout=10), gw.tail()  # the reorder timeout ran out
        cmd = pb.Payload.FromString(watch.on(ncmd)[0][0])
        assert [(m.name, m.boolean_value) for m in cmd.metrics] == [("Node Control/Rebirth", True)]
        assert not cmd.HasField("seq")

        send("NDEATH", _payload(None, _m("bdSeq", datatype=4, long_value=0)))  # a stale Will: ignored
        send("NDEATH", _payload(None, _m("bdSeq", datatype=4, long_value=1)))

        def status() -> list[dict[str, Any]]:
            return influx.query(f"SELECT * FROM device_status WHERE line = '{edge}'", db)

        assert wait_until(lambda: len(status()) == 4, timeout=20), (status(), gw.tail())
        got = sorted((r["machine"], r["online"], r["bdseq"]) for r in status())
        assert got == [("d1", False, 1), ("d1", True, 1), (edge, False, 1), (edge, True, 1)]
        temps = influx.query(f"SELECT \"Temp\" FROM telemetry WHERE line = '{edge}'", db)
        assert [r["Temp"] for r in temps] == [20.0, 21.0, 22.0]
        gw.kill()  # SIGKILL: the broker publishes the Will
        assert wait_until(lambda: any(not orjson.loads(p)["online"] for p, _ in watch.on(state_topic)), timeout=10)
        after = Watcher(mosquitto.port, [state_topic])
        assert wait_until(lambda: bool(after.on(state_topic)), timeout=10)
        [(retained, flag)] = after.on(state_topic)
        assert flag
        assert orjson.loads(retained)["online"] is False
        assert orjson.loads(retained)["timestamp"] == orjson.loads(watch.on(state_topic)[0][0])["timestamp"]
        after.close()
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        pub.loop_stop()
        pub.disconnect()
        watch.close()


def test_fleet_simulator_as_a_sparkplug_edge_node_feeds_telemetry_oee_and_answers_rebirth(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    """`factory-devices simulate --sparkplug`: births, alias-only DDATA, OEE from state and counters, an
    NCMD rebirth answered with the next bdSeq, and the NDEATH of a clean exit."""
    import sys

    influx, db = influx_db
    node = f"sim-{uuid.uuid4().hex[:6]}"
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-sim").read_text() + (
        'state_metric = "Machine/State"\ntotal_metric = "Counts/Total"\ngood_metric = "Counts/Good"\n'
        '[oee]\nwindows = ["10s"]\nidle_close_s = 2\n')
    conf = write_config(tmp_path / "gw-sim.toml", cfg)
    watch = Watcher(mosquitto.port, [f"spBv1.0/+/NBIRTH/{node}", f"spBv1.0/+/NDEATH/{node}"])
    with GatewayProcess(conf) as gw:
        sim = subprocess.Popen(
            [sys.executable, "-m", "devices.cli", "simulate", "--broker", f"127.0.0.1:{mosquitto.port}",
             "--machines", "3", "--rate", "5", "--duration", "12", "--count-every", "1", "--time-scale", "20",
             "--sparkplug", "--sparkplug-node", node, "--progress", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_until(lambda: len(watch.on(f"spBv1.0/plant1/NBIRTH/{node}")) == 1, timeout=20), gw.tail()
            landed = wait_until(lambda: influx.count("telemetry", db, "spindle_temp_c") >= 30, timeout=30)
            assert landed, gw.tail()
            machines = {r["machine"] for r in influx.query(
                f"SELECT spindle_temp_c, machine FROM telemetry WHERE line = '{node}'", db)}
            assert machines == {"m001", "m002", "m003"}  # the devices, under the names of their births
            cmd = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"host-{uuid.uuid4().hex[:6]}")
            cmd.connect("127.0.0.1", mosquitto.port)
            cmd.loop_start()
            rebirth = pb.Payload(timestamp=int(time.time() * 1000), metrics=[pb.Payload.Metric(
                name="Node Control/Rebirth", datatype=11, boolean_value=True)])
            cmd.publish(f"spBv1.0/plant1/NCMD/{node}", rebirth.SerializeToString(), qos=1).wait_for_publish(5)
            cmd.loop_stop()
            cmd.disconnect()
            assert wait_until(lambda: len(watch.on(f"spBv1.0/plant1/NBIRTH/{node}")) == 2, timeout=10)
            bdseqs = [next(m.long_value for m in pb.Payload.FromString(p).metrics if m.name == "bdSeq")
                      for p, _ in watch.on(f"spBv1.0/plant1/NBIRTH/{node}")]
            assert bdseqs == [0, 1]
            assert wait_until(lambda: influx.count("oee", db, "availability") >= 1, timeout=90), gw.tail()
            out, _ = sim.communicate(timeout=60)
            assert sim.returncode == 0, out
            assert wait_until(lambda: len(watch.on(f"spBv1.0/plant1/NDEATH/{node}")) == 1, timeout=10)
            offline = influx.query(f"SELECT * FROM device_status WHERE line = '{node}' AND online = false", db)
            assert wait_until(lambda: len(influx.query(
                f"SELECT * FROM device_status WHERE line = '{node}' AND online = false", db)) == 4, timeout=20), offline
            dead = (tmp_path / "deadletter.jsonl")
            assert not dead.exists() or not dead.read_text().strip(), dead.read_text()
        finally:
            if sim.poll() is None:
                sim.kill()
                sim.communicate()
            watch.close()
