"""Many simulated machines published over one MQTT client.

:class:`Fleet` turns a wall-clock tick into ``(topic, channel, payload)`` triples; :func:`run_fleet`
paces ticks with a monotonic scheduler and hands them to a :class:`MqttPublisher` (paho-mqtt 2.x).

>>> fleet = Fleet(fleet_layout(2), seed=1)
>>> [topic for topic, _, _ in fleet.tick(1763900000.0) if topic.endswith("/state")]
['factory/plant1/assembly/line1/m001/state', 'factory/plant1/assembly/line1/m002/state']
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devices.machine import Channel, FaultPlan, FaultRecord, Machine, MachineSpec

__all__ = [
    "AREAS",
    "BrokerAddress",
    "Fleet",
    "FleetSummary",
    "MqttPublisher",
    "PublishError",
    "fleet_layout",
    "password_from_env",
    "run_fleet",
]

log = logging.getLogger(__name__)

AREAS = ("assembly", "machining", "packaging")
MACHINES_PER_LINE = 5
LINES_PER_AREA = 2


class PublishError(Exception):
    """The MQTT connection could not be made or was refused."""


def fleet_layout(n: int) -> list[MachineSpec]:
    """Deterministic plant layout: 5 machines a line, 2 lines an area, 3 areas a site.

    >>> [f"{s.site}/{s.area}/{s.line}/{s.name}" for s in fleet_layout(12)[4:7]]
    ['plant1/assembly/line1/m005', 'plant1/assembly/line2/m006', 'plant1/assembly/line2/m007']
    """
    if n < 1:
        raise ValueError(f"need at least one machine, got {n}")
    width = max(3, len(str(n)))
    specs = []
    for i in range(n):
        line_idx = i // MACHINES_PER_LINE
        area_idx = line_idx // LINES_PER_AREA
        specs.append(
            MachineSpec(
                name=f"m{i + 1:0{width}d}",
                site=f"plant{area_idx // len(AREAS) + 1}",
                area=AREAS[area_idx % len(AREAS)],
                line=f"line{line_idx % LINES_PER_AREA + 1}",
                index=i,
            )
        )
    return specs


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6; the port defaults to 1883)."""

    host: str
    port: int = 1883

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        """Parse ``host``, ``host:port`` or ``[v6]:port``.

        >>> BrokerAddress.parse("[::1]:1884")
        BrokerAddress(host='::1', port=1884)
        """
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad broker address {text!r}, expected [v6addr]:PORT")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        else:
            host, port_text = text, ""
        if not host:
            raise ValueError(f"bad broker address {text!r}: empty host")
        if not port_text:
            return cls(host)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad broker port {port_text!r} in {text!r}, expected 1..65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class MqttPublisher:
    """One paho-mqtt 2.x client with per-channel counters and a draining close.

    Use as a context manager: entering connects (and waits for the CONNACK), leaving waits for
    outstanding QoS 1/2 acknowledgements (``drain_timeout``) and disconnects cleanly.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        *,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        tls_ca: Path | None = None,
        will: tuple[str, bytes] | None = None,
        commands: tuple[str, Callable[[str, bytes], None]] | None = None,
        max_inflight: int = 1000,
        max_queued: int = 100_000,
        connect_timeout: float = 10.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        self.broker = broker
        self.qos = qos
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self.sent: Counter[str] = Counter()
        self.dropped = 0
        self._acked = 0
        self._expected = 0  # publishes that will produce an on_publish callback
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._entered = False

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(max_queued)
        client.reconnect_delay_set(1, 30)
        if username is not None:
            client.username_pw_set(username, password)
        if tls_ca is not None:
            client.tls_set(ca_certs=str(tls_ca))
        if will is not None:
            client.will_set(will[0], will[1], qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._commands = commands  # (filter, handler): subscribed on every connect (e.g. Sparkplug NCMD)
        if commands is not None:
            client.on_message = lambda _c, _u, msg: commands[1](msg.topic, bytes(msg.payload))
        self._client = client

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            log.error("broker %s refused the connection: %s", self.broker, reason_code)
        else:
            self._connect_error = None
            log.info("connected to %s", self.broker)
            if self._commands is not None:
                client.subscribe(self._commands[0], qos=1)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("disconnected from %s: %s (paho reconnects)", self.broker, reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self._acked += 1

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> MqttPublisher:
        if self._entered:
            raise RuntimeError("MqttPublisher is already connected")
        self._entered = True
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=30)
        except (OSError, ValueError) as exc:
            self._entered = False
            raise PublishError(f"cannot connect to MQTT broker {self.broker}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(self.connect_timeout) or self._connect_error is not None:
            why = self._connect_error or f"no CONNACK within {self.connect_timeout:g} s"
            self._client.loop_stop()
            self._entered = False
            raise PublishError(f"cannot connect to MQTT broker {self.broker}: {why}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, topic: str, payload: bytes, channel: str) -> int | None:
        """Queue one message (paho sends it from its network thread); its message id, None if dropped.

        At QoS 1/2 a message queued while disconnected counts as queued: paho sends it on reconnect.
        """
        info = self._client.publish(topic, payload, qos=self.qos)
        rc = info.rc
        queued = rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos > 0)
        if not queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("dropped %d message(s) so far (%s)", self.dropped, mqtt.error_string(rc))
            return None
        with self._lock:
            self._expected += 1
        self.sent[channel] += 1
        return int(info.mid)

    @property
    def outstanding(self) -> int:
        """Messages handed to paho but not yet acknowledged (QoS 1/2) or written (QoS 0)."""
        with self._lock:
            return self._expected - self._acked

    def close(self) -> int:
        """Wait up to ``drain_timeout`` for outstanding messages, disconnect; return how many were lost."""
        if not self._entered:
            return 0
        deadline = time.monotonic() + self.drain_timeout
        while (self.outstanding > 0 or self._client.want_write()) and time.monotonic() < deadline:
            time.sleep(0.01)
        lost = self.outstanding
        if lost:
            log.warning("%d message(s) still unacknowledged after %.1f s", lost, self.drain_timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._entered = False
        return lost


class Fleet:
    """The simulated machines of a plant, ticked together."""

    def __init__(
        self,
        specs: list[MachineSpec],
        seed: int,
        *,
        root: str = "factory",
        time_scale: float = 1.0,
        faults: dict[str, FaultPlan] | FaultPlan | None = None,
        count_every_s: float = 5.0,
    ) -> None:
        self.root = root
        self.seed = seed
        self.machines: list[Machine] = []
        for spec in specs:
            plan = faults.get(spec.name) if isinstance(faults, dict) else faults
            self.machines.append(Machine(spec, seed, time_scale=time_scale, faults=plan, count_every_s=count_every_s))

    def tick(self, now_s: float) -> Iterator[tuple[str, Channel, bytes]]:
        """Step every machine to ``now_s``; yield ``(topic, channel, payload)``."""
        for m in self.machines:
            for em in m.step(now_s):
                yield m.spec.topic(self.root, em.channel), em.channel, em.payload()

    def waveforms(self, now_s: float, hz: float) -> Iterator[tuple[str, Channel, bytes]]:
        """A one-second fixed-rate ``accel_g`` block per machine, on the telemetry channel."""
        for m in self.machines:
            em = m.waveform(now_s, hz)
            yield m.spec.topic(self.root, em.channel), em.channel, em.payload()

    def finished_faults(self, *, closing: bool = False) -> list[FaultRecord]:
        """Fault ground truth that ended since the last call (all open ones too when ``closing``)."""
        out: list[FaultRecord] = []
        for m in self.machines:
            out.extend(m.close_faults() if closing else m.pop_finished_faults())
        return out


@dataclass(slots=True)
class FleetSummary:
    """What a run published."""

    elapsed_s: float = 0.0
    ticks: int = 0
    late_ticks: int = 0
    per_channel: Counter[str] = field(default_factory=Counter)
    waveforms: int = 0
    faults: int = 0
    dropped: int = 0
    unacked: int = 0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        total = sum(self.per_channel.values())
        chans = ", ".join(f"{c}={self.per_channel.get(c, 0)}" for c in ("telemetry", "state", "count"))
        wf = f" incl. {self.waveforms} waveform blocks" if self.waveforms else ""
        return (
            f"published {total} messages in {self.elapsed_s:.1f} s ({chans}){wf}; "
            f"{self.ticks} ticks ({self.late_ticks} late), {self.faults} faults injected, "
            f"{self.dropped} dropped, {self.unacked} unacknowledged"
        )


Publish = Callable[[str, bytes, str], None]


def run_fleet(
    fleet: Fleet,
    publish: Publish,
    *,
    rate_hz: float,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    waveform_hz: float | None = None,
    waveform_every_s: float = 10.0,
    fault_log: IO[bytes] | None = None,
    clock: Callable[[], float] = time.time,
) -> FleetSummary:
    """Publish every machine's messages ``rate_hz`` times a second until ``duration_s`` or ``stop``.

    Ticks are scheduled on the monotonic clock; payload timestamps come from ``clock`` (wall time).
    A tick more than one period late is run at once; the schedule restarts after falling behind by
    more than a second instead of bursting to catch up.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate must be > 0 Hz, got {rate_hz}")
    stop = stop or threading.Event()
    period = 1.0 / rate_hz
    summary = FleetSummary()
    start = time.monotonic()
    next_tick = start
    next_wave = start + waveform_every_s if waveform_hz else math.inf

    def emit(items: Iterator[tuple[str, Channel, bytes]]) -> None:
        for topic, channel, payload in items:
            publish(topic, payload, channel)
            summary.per_channel[channel] += 1

    def write_faults(records: list[FaultRecord]) -> None:
        summary.faults += len(records)
        if fault_log is not None and records:
            for rec in records:
                fault_log.write(rec.to_json() + b"\n")
            fault_log.flush()

    while not stop.is_set():
        mono = time.monotonic()
        if duration_s is not None and mono - start >= duration_s:
            break
        emit(fleet.tick(clock()))
        summary.ticks += 1
        if mono >= next_wave and waveform_hz:
            before = summary.per_channel["telemetry"]
            emit(fleet.waveforms(clock(), waveform_hz))
            summary.waveforms += summary.per_channel["telemetry"] - before
            next_wave += waveform_every_s
        write_faults(fleet.finished_faults())
        next_tick += period
        now = time.monotonic()
        if now - next_tick > 1.0:
            summary.late_ticks += 1
            log.warning("fell %.1f s behind schedule; restarting the tick clock", now - next_tick)
            next_tick = now
        elif now - next_tick > period:
            summary.late_ticks += 1
        wait = next_tick - now
        if duration_s is not None:
            wait = min(wait, start + duration_s - now)
        if wait > 0:
            stop.wait(wait)
    write_faults(fleet.finished_faults(closing=True))
    summary.elapsed_s = time.monotonic() - start
    return summary


def password_from_env(value: str | None) -> str | None:
    """The explicit password, else ``FGW_DEVICES_PASSWORD`` from the environment."""
    return value if value is not None else os.environ.get("FGW_DEVICES_PASSWORD")
