"""The shipped acl_file end to end: devices (mosquitto_pub / mosquitto_sub) → mosquitto → gateway → InfluxDB.

A JSON device may write only its own machine's topics (and read none) and a Sparkplug edge node only its own
edge node's; whatever else they publish is dropped by the broker and never reaches the gateway or InfluxDB,
while the gateway (user ``gateway``) still reads everything and its rebirth request (NCMD) reaches the node.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.sparkplug import sparkplug_b_pb2 as pb
from tests.gwproc import GatewayProcess, store_toml, wait_until, write_config
from tests.servers import AclMosquitto, InfluxDB1, make_password_file

PW = "pw-acl"
SITE, AREA, LINE = "s1", "a1", "l1"
GROUP = "G"


def _topic(machine: str) -> str:
    return f"factory/{SITE}/{AREA}/{LINE}/{machine}/telemetry"


def _config(tmp_path: Path, broker: AclMosquitto, influx: InfluxDB1, db: str) -> Path:
    # Only telemetry and device_status go out (no detectors, OEE, features or stats points).
    return write_config(tmp_path / "gw.toml", f"""
[gateway]
instance = "acl"
stats_interval_s = 3600
[mqtt]
port = {broker.port}
client_id = "gw-acl"
username = "gateway"
clean_session = true
topics = [{{ topic = "factory/#", qos = 1, format = "json" }},
          {{ topic = "spBv1.0/#", qos = 1, format = "sparkplug" }}]
{store_toml(tmp_path, influx.url, db)}
[detect]
enabled = false
[oee]
enabled = false
[features]
enabled = false
[sparkplug]
host_id = "acl-host"
rebirth_interval_s = 0.2
""")


def _pub(port: int, user: str, topic: str, payload: bytes) -> None:
    """One QoS 1 publish with the C client; it exits after the PUBACK (sent for denied publishes too)."""
    subprocess.run(["mosquitto_pub", "-p", str(port), "-u", user, "-P", PW, "-q", "1", "-t", topic, "-s"],
                   input=payload, check=True, capture_output=True, timeout=10)


class Sub:
    """``mosquitto_sub -C 1 -W <wait>`` as ``user``: the first message (hex payload) or a timeout (exit 27)."""

    def __init__(self, port: int, user: str, topic: str, wait_s: int) -> None:
        # stdbuf: line-buffered stdout, so the SUBACK line of -d shows up while it waits (not at its exit).
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-p", str(port), "-u", user, "-P", PW, "-q", "1", "-t", topic,
             "-C", "1", "-W", str(wait_s), "-d", "-F", "%x"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert wait_until(lambda: any("received SUBACK" in line for line in self.lines), timeout=10, every=0.02), (
            self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def finish(self, timeout: float = 20) -> tuple[int, list[str], list[bytes]]:
        """Exit code, the PUBLISH lines of -d, and the payloads received."""
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        publishes = [line for line in self.lines if "received PUBLISH" in line]
        payloads = [bytes.fromhex(line) for line in self.lines
                    if line and not line.startswith(("Client ", "Subscribed"))]
        return rc, publishes, payloads

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


_CLOCK = iter(range(int(time.time() * 1000) - 60_000, 1 << 62))  # one distinct ms per payload


def _sp(seq: int | None, *metrics: pb.Payload.Metric) -> bytes:
    p = pb.Payload(timestamp=next(_CLOCK), metrics=list(metrics))
    if seq is not None:
        p.seq = seq
    return p.SerializeToString()


def _m(name: str = "", alias: int | None = None, **kw: Any) -> pb.Payload.Metric:
    m = pb.Payload.Metric(name=name, timestamp=next(_CLOCK), **kw)
    if alias is not None:
        m.alias = alias
    return m


def test_devices_write_only_their_own_topics_through_broker_gateway_and_influx(
    tmp_path: Path, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    passwd = make_password_file(tmp_path / "mq", "gateway", PW)
    for user in ("m001", "m002", "E1"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, PW], check=True, capture_output=True)

    def per_machine(measurement: str = "telemetry") -> dict[str, int]:
        rows = influx.query(f'SELECT count(*) FROM "{measurement}" GROUP BY machine', db)
        return {r["machine"]: max(v or 0 for k, v in r.items() if k.startswith("count")) for r in rows}

    def field(name: str) -> list[dict[str, Any]]:  # the points that have this field
        return influx.query(f'SELECT "{name}", machine, line FROM telemetry', db)

    ts = int(time.time()) - 60
    with AclMosquitto(tmp_path / "broker", password_file=passwd) as broker, \
            GatewayProcess(_config(tmp_path, broker, influx, db), env={"FGW_MQTT__PASSWORD": PW}) as gw:
        subs: list[Sub] = []
        try:
            # --- JSON: m001 writes only its own machine's topics and reads none ----------------------------------
            spy = Sub(broker.port, "m001", "factory/+/+/+/m002/#", wait_s=4)
            own = Sub(broker.port, "m001", "factory/+/+/+/m001/#", wait_s=4)  # the ACL grants devices no read
            control = Sub(broker.port, "gateway", "factory/+/+/+/m002/#", wait_s=15)  # the same filter, allowed
            subs += [spy, own, control]
            _pub(broker.port, "m001", _topic("m002"), b'{"ts": %d, "values": {"temp": 666.0}}' % ts)
            _pub(broker.port, "m002", _topic("m002"), b'{"ts": %d, "values": {"temp": 2.5}}' % (ts + 1))
            _pub(broker.port, "m001", _topic("m001"), b'{"ts": %d, "values": {"temp": 1.5}}' % (ts + 2))
            assert wait_until(lambda: per_machine().keys() >= {"m001", "m002"}, timeout=15), (per_machine(), gw.tail())
            # The spoof (temp 666.0, sent first) was dropped: m002 has only its own point.
            assert per_machine() == {"m001": 1, "m002": 1}, field("temp")
            assert sorted((r["machine"], r["temp"]) for r in field("temp")) == [("m001", 1.5), ("m002", 2.5)]
            rc, _, payloads = control.finish()
            assert (rc, payloads) == (0, [b'{"ts": %d, "values": {"temp": 2.5}}' % (ts + 1)]), control.lines
            for sub in (spy, own):
                rc, publishes, payloads = sub.finish()
                assert rc == 27, f"m001 read telemetry: {sub.lines}"  # 27: -W timed out
                assert publishes == payloads == []

            # --- Sparkplug: E1's rebirth request reaches it; E1 cannot publish as E2 ---------------------------
            ncmd = Sub(broker.port, "E1", f"spBv1.0/{GROUP}/NCMD/E1", wait_s=15)
            subs.append(ncmd)
            e1 = f"spBv1.0/{GROUP}/%s/E1"
            _pub(broker.port, "E1", e1 % "NDATA", _sp(0, _m("Temp", 1, datatype=9, float_value=1.0)))  # no NBIRTH
            rc, _, payloads = ncmd.finish()
            assert rc == 0, (ncmd.lines, gw.tail())
            [cmd] = [pb.Payload.FromString(p) for p in payloads]
            assert [(m.name, m.boolean_value) for m in cmd.metrics] == [("Node Control/Rebirth", True)]
            _pub(broker.port, "E1", e1 % "NBIRTH", _sp(0, _m("bdSeq", datatype=4, long_value=0),
                                                     _m("Temp", 1, datatype=9, float_value=20.0)))
            _pub(broker.port, "E1", e1 % "DBIRTH" + "/d1", _sp(1, _m("Speed", 2, datatype=3, int_value=10)))
            e2 = f"spBv1.0/{GROUP}/%s/E2"
            _pub(broker.port, "E1", e2 % "NBIRTH", _sp(0, _m("bdSeq", datatype=4, long_value=0),
                                                     _m("Spoofed", 1, datatype=9, float_value=666.0)))
            _pub(broker.port, "E1", e2 % "NDATA", _sp(1, _m(alias=1, float_value=667.0)))
            _pub(broker.port, "E1", e1 % "DDATA" + "/d1", _sp(2, _m(alias=2, int_value=11)))
            assert wait_until(lambda: [r["Speed"] for r in field("Speed")] == [10, 11], timeout=15), (
                field("Speed"), gw.tail())
            assert [(r["machine"], r["line"], r["Temp"]) for r in field("Temp")] == [("E1", "E1", 20.0)]
            assert field("Spoofed") == []
            assert {r["line"] for r in influx.query("SELECT * FROM device_status", db)} == {"E1"}
            assert per_machine() == {"m001": 1, "m002": 1, "E1": 1, "d1": 2}

            assert gw.proc is not None
            assert gw.proc.poll() is None, gw.tail()
            with urllib.request.urlopen(f"http://{gw.env['FGW_HTTP__LISTEN']}/metrics", timeout=5) as resp:
                metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for family in text_string_to_metric_families(resp.read().decode())
                           for s in family.samples}
            # 2 JSON + 4 Sparkplug from the devices, plus the gateway's own STATE and NCMD (it reads spBv1.0/#):
            # none of the 3 denied publishes reached it.
            assert metrics[("factory_gateway_messages_received_total", ())] == 8
            assert metrics[("factory_gateway_messages_rejected_total", (("reason", "no_birth"),))] == 1
            # 2 JSON, NBIRTH, DBIRTH, DDATA and the 2 device_status points (E1 and d1 online)
            assert metrics[("factory_gateway_points_written_total", ())] == 7
            assert metrics[("factory_gateway_mqtt_reconnects_total", ())] == 0
            assert gw.stop() == 0
        finally:
            for sub in subs:
                sub.close()
    log = gw.log.read_text()
    assert "Traceback" not in log
    assert "refused" not in log, gw.tail()
