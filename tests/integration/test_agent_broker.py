"""The Pi agent against a real mosquitto: a fake sysfs tree and mock GPIO in, wire-schema payloads out, and
nothing lost or reordered while the broker is down or the agent restarts (the disk buffer)."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory
from paho.mqtt.enums import CallbackAPIVersion

from devices.agent import AgentConfig, run_agent
from gateway.schema import CountMessage, MachineState, StateMessage, TelemetrySample
from tests.servers import Mosquitto

W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
W1_BAD_CRC = "72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
METRICS = {
    "cpu_temp_c": 48.312,
    "gpu_thermal_temp_c": 45.0,
    "load_1m": 0.52,
    "load_5m": 0.58,
    "load_15m": 0.59,
    "coolant_temp_c": 23.125,
    "ds18b20_0000000f00d1_c": -2.5,
}


def fake_sysfs(root: Path) -> dict[str, Any]:
    """Thermal zones, 1-Wire probes (good, bad CRC, newer kernel ``temperature``) and a load average."""
    for n, (zone_type, milli) in enumerate([("cpu-thermal", "48312"), ("gpu-thermal", "45000")]):
        zone = root / "thermal" / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(zone_type + "\n")
        (zone / "temp").write_text(milli + "\n")
    for serial, name, text in [
        ("28-00000a1b2c3d", "w1_slave", W1_OK),
        ("28-00000bad0000", "w1_slave", W1_BAD_CRC),
        ("28-0000000f00d1", "temperature", "-2500\n"),
    ]:
        (root / "w1" / serial).mkdir(parents=True)
        (root / "w1" / serial / name).write_text(text)
    (root / "loadavg").write_text("0.52 0.58 0.59 1/123 4567\n")
    return {
        "thermal_dir": str(root / "thermal"),
        "loadavg_path": str(root / "loadavg"),
        "w1_dir": str(root / "w1"),
        "w1_names": {"28-00000a1b2c3d": "coolant_temp_c"},
    }


def agent_config(tmp_path: Path, port: int, root: str, **sections: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device": {"site": "plant1", "area": "lab", "line": "bench", "machine": "pi01", "interval_s": 0.1},
            "mqtt": {"broker": f"127.0.0.1:{port}", "root": root, "reconnect_max_s": 0.2},
            "sensors": fake_sysfs(tmp_path / "sys"),
            "buffer": {"path": str(tmp_path / "state" / "queue.sqlite3"), "drain_timeout_s": 5.0},
            **sections,
        }
    )


class Subscriber:
    """A paho subscriber on ``<root>/#`` collecting ``(topic, payload)``; optionally a persistent session,
    so the broker keeps its messages for it across a broker restart."""

    def __init__(self, port: int, root: str, *, persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}", clean_session=not persistent
        )
        client.reconnect_delay_set(0.1, 0.2)  # type: ignore[arg-type]
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{root}/#", qos=1)
        client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        self.client = client
        assert self._subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def got(self, channel: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [orjson.loads(p) for t, p in self.messages if channel is None or t.endswith("/" + channel)]

    def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0, what: str = "messages") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages")
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentRun:
    """``run_agent`` in a thread, as the CLI runs it in the main thread."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.stop = threading.Event()
        self._result: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()

    def _run(self, cfg: AgentConfig) -> None:
        try:
            self._result = run_agent(cfg, self.stop)
        except BaseException as exc:
            self._error = exc

    def finish(self, timeout: float = 15.0) -> int:
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "agent did not stop"
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def queued(cfg: AgentConfig, topic: str = "%") -> int:
    """Messages in the agent's disk buffer, optionally only those whose topic is ``LIKE topic``."""
    with sqlite3.connect(cfg.buffer.path) as db:
        return int(db.execute("SELECT COUNT(*) FROM queue WHERE topic LIKE ?", (topic,)).fetchone()[0])


def first_occurrences(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop QoS 1 re-deliveries (identical payloads), keeping the first of each."""
    seen: set[bytes] = set()
    out = []
    for item in items:
        key = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    factory.close()
    Device.pin_factory = None


def test_agent_publishes_the_wire_contract(mosquitto: Mosquitto, tmp_path: Path, pins: MockFactory) -> None:
    root = f"it{uuid.uuid4().hex[:8]}"
    cfg = agent_config(tmp_path, mosquitto.port, root, counter={"pin": 17, "reject_pin": 27, "bounce_s": 0})
    sub = Subscriber(mosquitto.port, root)
    try:
        run = AgentRun(cfg)
        sub.wait_for(lambda: len(sub.got("telemetry")) >= 3, what="telemetry")
        for pin, n in ((17, 5), (27, 1)):
            for _ in range(n):
                pins.pin(pin).drive_low()
                pins.pin(pin).drive_high()
        sub.wait_for(lambda: any(c["total"] == 5 for c in sub.got("count")), what="count total=5")
        samples = run.finish()
        sub.wait_for(lambda: sub.got("state")[-1]["state"] == "PLANNED_STOP", what="PLANNED_STOP")
    finally:
        sub.close()

    models = {"telemetry": TelemetrySample, "state": StateMessage, "count": CountMessage}
    for topic, payload in sub.messages:
        prefix, _, channel = topic.rpartition("/")
        assert prefix == f"{root}/plant1/lab/bench/pi01"
        models[channel].model_validate_json(payload)  # every payload validates against the wire contract
    telemetry = sub.got("telemetry")
    assert [t["seq"] for t in telemetry] == list(range(1, samples + 1))
    assert all(t["values"] == METRICS for t in telemetry), "bad-CRC probe must be skipped, all others present"
    states = sub.got("state")
    assert [(s["state"], s["reason"]) for s in states] == [
        ("RUNNING", "agent_started"),
        ("PLANNED_STOP", "agent_stopped"),
    ]
    counts = sub.got("count")
    assert counts[0]["total"] == 0
    assert counts[-1] == {"ts": counts[-1]["ts"], "total": 5, "good": 4}
    assert all(a["total"] <= b["total"] and a["ts"] <= b["ts"] for a, b in itertools.pairwise(counts))
    assert queued(cfg) == 0, "everything acknowledged is deleted from the disk buffer"


def test_broker_outage_is_buffered_and_delivered_in_order(tmp_path: Path) -> None:
    root = "outage"
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = agent_config(tmp_path, broker.port, root)
        sub = Subscriber(broker.port, root, persistent=True)
        try:
            run = AgentRun(cfg)
            sub.wait_for(lambda: len(sub.got("telemetry")) >= 5, what="telemetry before the outage")
            broker.stop()
            t_down = time.time()
            deadline = time.monotonic() + 20
            # The agent keeps sampling into the disk buffer (a count, never a sleep: the machine may be loaded).
            while queued(cfg, "%/telemetry") < 11:
                assert time.monotonic() < deadline, f"only {queued(cfg)} messages buffered while the broker was down"
                time.sleep(0.05)
            t_up = time.time()
            broker.restart()
            sub.wait_for(lambda: any(t["ts"] > t_up + 0.3 for t in sub.got("telemetry")), what="live telemetry")
            samples = run.finish()
            sub.wait_for(lambda: sub.got("state")[-1]["state"] == "PLANNED_STOP", what="PLANNED_STOP")
        finally:
            sub.close()

    telemetry = first_occurrences(sub.got("telemetry"))
    assert [t["seq"] for t in telemetry] == list(range(1, samples + 1)), "missing or out of order"
    ts = [t["ts"] for t in telemetry]
    assert ts == sorted(ts)
    during = [t for t in ts if t_down < t < t_up]
    assert len(during) >= 10, f"only {len(during)} samples taken during the outage arrived"
    for t in telemetry:
        TelemetrySample.model_validate(t)
        assert t["values"] == METRICS
    states = [(s["state"], s.get("reason")) for s in first_occurrences(sub.got("state"))]
    assert states[0] == ("RUNNING", "agent_started")
    assert states[-1] == ("PLANNED_STOP", "agent_stopped")
    # mosquitto publishes the agent's will when it shuts down; the agent says RUNNING again on reconnect.
    middle = states[1:-1]
    assert middle in ([("RUNNING", "agent_reconnected")], [("DOWN", "agent_lost"), ("RUNNING", "agent_reconnected")])
    assert queued(cfg) == 0


def test_buffer_survives_an_agent_restart_without_broker(tmp_path: Path) -> None:
    root = "restart"
    broker = Mosquitto(tmp_path / "broker")  # port chosen, not started yet: unreachable
    cfg = agent_config(tmp_path, broker.port, root)
    first = AgentRun(cfg)
    time.sleep(0.6)
    n1 = first.finish()
    assert n1 >= 3
    assert queued(cfg) == n1 + 2  # RUNNING, the samples, PLANNED_STOP: all kept on disk
    with broker:
        sub = Subscriber(broker.port, root)
        try:
            second = AgentRun(cfg)
            sub.wait_for(lambda: len(sub.got("telemetry")) >= n1 + 3, what="old and new telemetry")
            n2 = second.finish()
            sub.wait_for(lambda: len(sub.got("state")) >= 4, what="four state messages")
        finally:
            sub.close()

    stream = first_occurrences(sub.got())
    got = [(m["state"] if "state" in m else m["seq"]) for m in stream]
    expected = ["RUNNING", *range(1, n1 + 1), "PLANNED_STOP", "RUNNING", *range(1, n2 + 1), "PLANNED_STOP"]
    assert got == expected
    ts = [m["ts"] for m in stream]
    assert ts == sorted(ts), "sent in the order taken"
    assert StateMessage.model_validate(stream[0]).state is MachineState.RUNNING
    assert queued(cfg) == 0
