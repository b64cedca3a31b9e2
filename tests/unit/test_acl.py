"""deploy/mosquitto/acl: every line is a directive mosquitto knows, and a real mosquitto enforces it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import SHIPPED_ACL as ACL
from tests.servers import AclMosquitto, make_password_file


def test_shipped_acl_has_only_known_directives() -> None:
    users = 0
    for line in ACL.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            assert len(words) == 2, line
            users += 1
        else:
            assert words[0] in ("topic", "pattern"), line
            assert len(words) == 3, line
            assert words[1] in ("read", "write", "readwrite"), line
    assert users == 1, "only the gateway has its own section: devices are covered by patterns"


def _client(port: int, user: str, got: list[str] | None = None) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=mqtt.MQTTv311)
    c.username_pw_set(user, "pw")
    if got is not None:
        c.on_message = lambda _c, _u, msg: got.append(msg.topic)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _wait(pred: Any, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.05)
    return bool(pred())


@pytest.mark.integration
def test_shipped_acl_in_a_real_broker(tmp_path: Path) -> None:
    """A device writes only its own machine (JSON) or edge node (Sparkplug) and reads only its own commands."""
    passwd = make_password_file(tmp_path, "gateway", "pw")
    for user in ("m001", "m002", "E1"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, "pw"], check=True, capture_output=True)
    with AclMosquitto(tmp_path / "broker", password_file=passwd) as broker:
        gw_got: list[str] = []
        dev_got: list[str] = []
        e1_got: list[str] = []
        gw = _client(broker.port, "gateway", gw_got)
        m001 = _client(broker.port, "m001", dev_got)
        m002 = _client(broker.port, "m002")
        e1 = _client(broker.port, "E1", e1_got)
        try:
            for c, topics in ((gw, ["factory/#", "spBv1.0/#"]), (m001, ["factory/+/+/+/m002/#"]),
                              (e1, ["spBv1.0/G/NCMD/E1", "spBv1.0/G/NCMD/E2"])):
                for t in topics:
                    c.subscribe(t, qos=1)
            time.sleep(0.3)
            m001.publish("factory/s/a/l/m002/telemetry", b"spoof", qos=1).wait_for_publish(5)
            m002.publish("factory/s/a/l/m002/telemetry", b"own", qos=1).wait_for_publish(5)
            e1.publish("spBv1.0/G/NDATA/E2", b"spoof", qos=1).wait_for_publish(5)
            gw.publish("spBv1.0/G/NCMD/E2", b"x", qos=1).wait_for_publish(5)
            gw.publish("spBv1.0/G/NCMD/E1", b"x", qos=1).wait_for_publish(5)
            e1.publish("spBv1.0/G/NDATA/E1", b"own", qos=1).wait_for_publish(5)
            m001.publish("factory/s/a/l/m001/telemetry", b"own", qos=1).wait_for_publish(5)
            assert _wait(lambda: "factory/s/a/l/m001/telemetry" in gw_got), gw_got
            assert _wait(lambda: "spBv1.0/G/NCMD/E1" in e1_got), e1_got
            time.sleep(0.3)
            assert gw_got.count("factory/s/a/l/m002/telemetry") == 1, "m001's spoof of m002 was dropped"
            assert "spBv1.0/G/NDATA/E2" not in gw_got, "E1 cannot publish as E2"
            assert "spBv1.0/G/NDATA/E1" in gw_got
            assert dev_got == [], "m001 cannot read m002's data"
            assert e1_got == ["spBv1.0/G/NCMD/E1"], "E1 reads its own NCMD only"
        finally:
            for c in (gw, m001, m002, e1):
                c.disconnect()
                c.loop_stop()


def test_add_device_script_adds_a_user(tmp_path: Path) -> None:
    script = ACL.parent / "add-device.sh"
    env = {"PATH": "/usr/bin:/bin", "DEVICE_PASSWORD": "pw"}
    subprocess.run(["sh", str(script), "m001", str(tmp_path / "passwd")], env=env, check=True, capture_output=True)
    assert (tmp_path / "passwd").read_text().startswith("m001:")
    bad = subprocess.run(["sh", str(script), "a/b", str(tmp_path / "passwd")], env=env, capture_output=True)
    assert bad.returncode == 2
