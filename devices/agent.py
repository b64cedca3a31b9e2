"""Raspberry Pi device agent: read real sensors, publish by the same wire contract as the simulator.

Sensors (each optional; paths configurable so tests can use a fake sysfs tree):

* every thermal zone under ``/sys/class/thermal`` (millidegrees): the ``cpu-thermal`` zone (else the
  first) → ``cpu_temp_c``, others → ``<type>_temp_c``
* load averages from ``/proc/loadavg`` → ``load_1m``, ``load_5m``, ``load_15m``
* 1-Wire DS18B20 probes under ``/sys/bus/w1/devices/28-*`` → ``ds18b20_<serial>_c`` (or a name from
  ``[sensors] w1_names``)
* ``[sensors.bme280]``: a BME280/BMP280 over I²C (smbus2) → ``<prefix>temp_c``, ``<prefix>pressure_hpa``,
  ``<prefix>humidity_pct``
* ``[counter]``: a part counter on GPIO (gpiozero) → ``count`` messages with cumulative ``total``/``good``

A sensor that is missing or failing is logged (once, or rate-limited when it keeps failing) and skipped;
the others carry on. Machine state is simple: ``RUNNING`` (``agent_started``) when the agent starts,
``PLANNED_STOP`` (``agent_stopped``) on a clean shutdown and ``DOWN`` (``agent_lost``) as the MQTT last
will; after a reconnect ``RUNNING`` (``agent_reconnected``) again, because the broker may have sent the
will meanwhile (mosquitto does when it shuts down). Every message goes to the disk buffer (``[buffer]``,
:mod:`devices.diskqueue`) first and out in order once the broker is reachable.

>>> cfg = AgentConfig.model_validate({"device": {"site": "s", "area": "a", "line": "l", "machine": "pi"}})
>>> cfg.mqtt.client_id or f"factory-agent-{cfg.device.machine}"
'factory-agent-pi'
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
import tomllib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from devices.bme280 import ADDRESSES, FILTER, OVERSAMPLING, STANDBY_MS, Bme280, SMBusLike
from devices.diskqueue import BufferedPublisher, DiskQueue, DiskQueueError
from devices.fleet import BrokerAddress, MqttPublisher, password_from_env
from devices.machine import encode_payload
from devices.sensors import (
    RateLimitedLog,
    W1CrcError,
    ds18b20_probes,
    read_ds18b20,
    read_loadavg,
    read_millidegrees,
    thermal_zones,
)
from gateway.schema import CountMessage, MachineState, StateMessage, TelemetrySample

if TYPE_CHECKING:
    from devices.partcounter import PartCounter

__all__ = [
    "AgentConfig",
    "AgentConfigError",
    "AgentMqttPublisher",
    "DeviceAgent",
    "SensorReader",
    "load_config",
    "run_agent",
]

log = logging.getLogger(__name__)

PI_EXTRA = "pip install 'factory-gateway[pi]'"
IN_FLIGHT = 100  # messages sent but not yet acknowledged
_RETRY_COUNTER_S = 60.0
_OFFLINE_WARN_S = 10.0  # paho retries silently; say so once the broker has been away this long


class AgentConfigError(Exception):
    """The agent's TOML file is missing, unreadable or invalid."""


def _topic_level(value: str) -> str:
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"{value!r} is not a valid MQTT topic level (non-empty, no '/', '+', '#')")
    return value


def _metric(name: str) -> str:
    """``name`` if the wire schema accepts it as a metric name, else a ValueError saying why."""
    try:
        TelemetrySample(values={name: 0.0})
    except ValidationError as exc:
        raise ValueError(_message(exc.errors()[0])) from None
    return name


def _requires(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"needs the {module} package, which is not installed: {PI_EXTRA}") from None


def _message(err: Any) -> str:
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return str(err["msg"])


class DeviceSection(BaseModel):
    """``[device]``: where the Pi sits in the plant and how often it samples."""

    model_config = ConfigDict(extra="forbid")

    site: str
    area: str
    line: str
    machine: str
    interval_s: float = Field(default=5.0, gt=0)

    _levels = field_validator("site", "area", "line", "machine")(classmethod(lambda cls, v: _topic_level(v)))


class MqttSection(BaseModel):
    """``[mqtt]``: broker and credentials (password may come from ``FGW_DEVICES_PASSWORD``)."""

    model_config = ConfigDict(extra="forbid")

    broker: str = "127.0.0.1:1883"
    root: str = "factory"
    qos: int = Field(default=1, ge=1, le=2)  # the disk buffer deletes a message on its acknowledgement
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        BrokerAddress.parse(v)
        return v

    _root = field_validator("root")(classmethod(lambda cls, v: _topic_level(v)))


_CHOICES: dict[str, Collection[float]] = {"oversampling": OVERSAMPLING, "filter": FILTER, "standby_ms": STANDBY_MS}


class Bme280Section(BaseModel):
    """``[sensors.bme280]``: a BME280 (or BMP280) on the Pi's I²C bus."""

    model_config = ConfigDict(extra="forbid")

    bus: int = Field(default=1, ge=0)
    address: int = 0x76
    mode: Literal["forced", "normal"] = "forced"
    oversampling: int = 1
    filter: int = 0
    standby_ms: float = 1000.0
    prefix: str = "bme280_"

    @field_validator("address")
    @classmethod
    def _address(cls, v: int) -> int:
        if v not in ADDRESSES:
            raise ValueError(f"must be 0x76 (SDO to GND) or 0x77 (SDO to 3V3), got {v:#04x}")
        return v

    @field_validator("oversampling", "filter", "standby_ms")
    @classmethod
    def _choice(cls, v: float, info: Any) -> float:
        allowed = _CHOICES[info.field_name]
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(f'{a:g}' for a in allowed)}, got {v:g}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        _metric(f"{v}pressure_hpa")
        return v

    @model_validator(mode="after")
    def _smbus2(self) -> Bme280Section:
        _requires("smbus2")
        return self


# Keys of earlier versions, so an old config gets a pointer instead of "unknown key".
_RENAMED = {
    "cpu_temp": "thermal",
    "cpu_temp_path": "thermal_dir (the directory holding thermal_zone*/)",
    "w1_glob": "w1_dir (the directory holding the 28-* probes)",
}


class SensorsSection(BaseModel):
    """``[sensors]``: which sensors to read and where their files are."""

    model_config = ConfigDict(extra="forbid")

    thermal: bool = True
    thermal_dir: Path = Path("/sys/class/thermal")
    loadavg: bool = True
    loadavg_path: Path = Path("/proc/loadavg")
    w1: bool = True
    w1_dir: Path = Path("/sys/bus/w1/devices")
    w1_names: dict[str, str] = Field(default_factory=dict)  # "28-0123456789ab" → "coolant_temp_c"
    bme280: Bme280Section | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in _RENAMED if k in data]
            if old:
                raise ValueError("; ".join(f"{k} is now called {_RENAMED[k]}" for k in old))
        return data

    @field_validator("w1_names")
    @classmethod
    def _w1_names(cls, v: dict[str, str]) -> dict[str, str]:
        for serial, name in v.items():
            if not serial.startswith("28-"):
                raise ValueError(f"{serial!r} is not a DS18B20 id (they start with '28-')")
            try:
                _metric(name)
            except ValueError as exc:
                raise ValueError(f"{serial}: {exc}") from None
        return v


class CounterSection(BaseModel):
    """``[counter]``: a part counter on GPIO (BCM numbers)."""

    model_config = ConfigDict(extra="forbid")

    pin: int = Field(ge=0, le=27)
    reject_pin: int | None = Field(default=None, ge=0, le=27)
    pull_up: bool = True
    bounce_s: float = Field(default=0.01, ge=0, le=1)
    interval_s: float | None = Field(default=None, gt=0)

    @field_validator("reject_pin")
    @classmethod
    def _distinct(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v == info.data.get("pin"):
            raise ValueError(f"must differ from counter.pin (both GPIO{v})")
        return v

    @model_validator(mode="after")
    def _gpiozero(self) -> CounterSection:
        _requires("gpiozero")
        return self


class BufferSection(BaseModel):
    """``[buffer]``: the disk queue every message passes through."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Path("/var/lib/factory-agent/queue.sqlite3")
    max_mb: float = Field(default=512.0, gt=0)
    drain_timeout_s: float = Field(default=5.0, ge=0)


class AgentConfig(BaseModel):
    """The whole agent TOML file."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceSection
    mqtt: MqttSection = Field(default_factory=MqttSection)
    sensors: SensorsSection = Field(default_factory=SensorsSection)
    counter: CounterSection | None = None
    buffer: BufferSection = Field(default_factory=BufferSection)


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent's TOML file; errors name the file and the offending key."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise AgentConfigError(f"cannot read agent config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {_message(err)}" for err in exc.errors()
        )
        raise AgentConfigError(f"invalid agent config {path}: {problems}") from exc


# -- sensors --------------------------------------------------------------------------------------


def _open_smbus(bus: int) -> SMBusLike:
    from smbus2 import SMBus

    return SMBus(bus)


class SensorReader:
    """Reads the configured sensors; one that is absent or failing is logged and skipped, never fatal.

    A missing sensor is logged once; one that keeps failing (CRC errors, I²C errors) is logged at most
    every five minutes with a count of the failures in between. The BME280 is set up again at the next
    sample after an error, so a re-plugged or reset sensor comes back by itself.
    """

    def __init__(self, cfg: SensorsSection, *, open_i2c: Callable[[int], SMBusLike] | None = None) -> None:
        self.cfg = cfg
        self._warned: set[str] = set()
        self._limited = RateLimitedLog(log)
        self._open_i2c = open_i2c or _open_smbus
        self._bus: SMBusLike | None = None
        self._bme: Bme280 | None = None

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def read(self) -> dict[str, float]:
        """One reading of every available sensor as ``{metric: value}``."""
        values: dict[str, float] = {}
        cfg = self.cfg
        if cfg.thermal:
            self._read_thermal(values)
        if cfg.loadavg:
            try:
                values["load_1m"], values["load_5m"], values["load_15m"] = read_loadavg(cfg.loadavg_path)
            except (OSError, ValueError, IndexError) as exc:
                self._warn_once(str(cfg.loadavg_path), "load average unavailable (%s); skipping it", exc)
        if cfg.w1:
            self._read_w1(values)
        if cfg.bme280 is not None:
            self._read_bme280(cfg.bme280, values)
        return values

    def _read_thermal(self, values: dict[str, float]) -> None:
        zones = thermal_zones(self.cfg.thermal_dir)
        if not zones:
            self._warn_once("thermal", "no thermal zones under %s; skipping them", self.cfg.thermal_dir)
        for zone in zones:
            try:
                values[zone.metric] = read_millidegrees(zone.temp_path)
            except (OSError, ValueError) as exc:
                self._limited.warning(
                    str(zone.temp_path), "thermal zone %d (%s) unreadable (%s); skipping it", zone.number, zone.type,
                    exc,
                )

    def _read_w1(self, values: dict[str, float]) -> None:
        cfg = self.cfg
        probes = ds18b20_probes(cfg.w1_dir)
        if not probes:
            self._warn_once("w1", "no 1-Wire DS18B20 probes under %s; skipping them", cfg.w1_dir)
        for probe in probes:
            serial = probe.name
            try:
                temp = read_ds18b20(probe)
            except W1CrcError:
                self._limited.warning("crc:" + serial, "DS18B20 %s: CRC check failed, reading skipped", serial)
                continue
            except (OSError, ValueError) as exc:
                self._limited.warning("w1:" + serial, "DS18B20 %s unreadable (%s); skipping it", serial, exc)
                continue
            if temp is None:
                log.debug("DS18B20 %s: power-on value 85 °C, skipping this reading", serial)
                continue
            values[cfg.w1_names.get(serial) or f"ds18b20_{serial.removeprefix('28-')}_c"] = temp

    def _read_bme280(self, b: Bme280Section, values: dict[str, float]) -> None:
        try:
            if self._bme is None:
                self._bus = self._open_i2c(b.bus)
                self._bme = Bme280(
                    self._bus,
                    b.address,
                    mode=b.mode,
                    oversampling=b.oversampling,
                    filter_coefficient=b.filter,
                    standby_ms=b.standby_ms,
                )
                log.info("%s at %#04x on /dev/i2c-%d ready (%s mode)", self._bme.model, b.address, b.bus, b.mode)
                if not self._bme.has_humidity:
                    self._warn_once("bmp280", "a BMP280 has no humidity sensor: no %shumidity_pct", b.prefix)
            reading = self._bme.read()
        except Exception as exc:  # smbus2 raises OSError; whatever it is, the other sensors carry on
            self._limited.warning(
                "bme280",
                "sensors.bme280 (%#04x on /dev/i2c-%d) failed: %s; skipping it, retrying at the next sample",
                b.address,
                b.bus,
                exc,
            )
            self._close_bme280()
            return
        values[f"{b.prefix}temp_c"] = round(reading.temp_c, 3)
        values[f"{b.prefix}pressure_hpa"] = round(reading.pressure_pa / 100.0, 4)
        if reading.humidity_pct is not None:
            values[f"{b.prefix}humidity_pct"] = round(reading.humidity_pct, 3)

    def _close_bme280(self) -> None:
        self._bme = None
        bus, self._bus = self._bus, None
        close = getattr(bus, "close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()

    def close(self) -> None:
        self._close_bme280()


# -- the daemon -----------------------------------------------------------------------------------


class DeviceAgent:
    """Builds the agent's messages; :func:`run_agent` publishes them on a schedule."""

    def __init__(self, cfg: AgentConfig, *, open_i2c: Callable[[int], SMBusLike] | None = None) -> None:
        self.cfg = cfg
        self.reader = SensorReader(cfg.sensors, open_i2c=open_i2c)
        self.seq = 0
        d = cfg.device
        self.prefix = f"{cfg.mqtt.root}/{d.site}/{d.area}/{d.line}/{d.machine}"
        self.counter: PartCounter | None = None
        self._counter_retry_at = 0.0
        self._last_count: tuple[int, int] | None = None
        self._last_count_ts = -math.inf
        if cfg.counter is not None:
            self._open_counter(cfg.counter)

    def topic(self, channel: str) -> str:
        """Full topic for ``channel``."""
        return f"{self.prefix}/{channel}"

    def sample(self, now_s: float) -> TelemetrySample | None:
        """One telemetry sample, or ``None`` when no sensor gave a value."""
        values = self.reader.read()
        if not values:
            return None
        self.seq += 1
        return TelemetrySample(ts=now_s, seq=self.seq, values=values)

    def state(self, now_s: float | None, state: MachineState, reason: str) -> StateMessage:
        """A state message (``now_s=None`` for the last will, which the broker sends later)."""
        return StateMessage(ts=now_s, state=state, reason=reason)

    def count(self, now_s: float) -> CountMessage | None:
        """A count message when the counter changed or ``counter.interval_s`` passed, else ``None``."""
        c = self.cfg.counter
        if c is None:
            return None
        if self.counter is None:
            if time.monotonic() < self._counter_retry_at:
                return None
            self._open_counter(c)
            if self.counter is None:
                return None
        total, good = self.counter.read()
        interval = c.interval_s or self.cfg.device.interval_s
        # A tenth of a sample interval of slack, so "every interval" does not slip a tick on clock jitter.
        due = now_s - self._last_count_ts >= interval - 0.1 * self.cfg.device.interval_s
        if (total, good) == self._last_count and not due:
            return None
        self._last_count, self._last_count_ts = (total, good), now_s
        return CountMessage(ts=now_s, total=total, good=good)

    def _open_counter(self, c: CounterSection) -> None:
        try:
            from devices.partcounter import PartCounter

            self.counter = PartCounter(c.pin, c.reject_pin, pull_up=c.pull_up, bounce_s=c.bounce_s)
        except Exception as exc:  # gpiozero: no pin factory, pin busy, no permission (group gpio)...
            self._counter_retry_at = time.monotonic() + _RETRY_COUNTER_S
            log.error(
                "counter: cannot watch GPIO%d%s: %s; no count messages until it works (retrying every %.0f s)",
                c.pin,
                "" if c.reject_pin is None else f"/GPIO{c.reject_pin}",
                exc,
                _RETRY_COUNTER_S,
            )
            return
        rejects = "" if c.reject_pin is None else f", rejects on GPIO{c.reject_pin}"
        log.info("counting parts on GPIO%d%s", c.pin, rejects)

    def close(self) -> None:
        """Release the I²C bus and GPIO pins."""
        self.reader.close()
        if self.counter is not None:
            self.counter.close()
            self.counter = None


class AgentMqttPublisher(MqttPublisher):
    """The fleet's :class:`MqttPublisher`, made to fit :class:`~devices.diskqueue.BufferedPublisher`.

    Entering starts connecting in the background instead of failing when the broker is unreachable (the
    Pi keeps sampling into the disk buffer meanwhile); every acknowledgement is reported by message id.
    """

    def __init__(self, *args: Any, reconnect_max_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_connected: Callable[[], None] = lambda: None
        self.session = 0
        self._up = threading.Event()
        self._client.reconnect_delay_set(min(1.0, reconnect_max_s), reconnect_max_s)  # type: ignore[arg-type]

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        super()._on_connect(client, userdata, flags, reason_code, properties)
        if not reason_code.is_failure:
            self.session += 1
            self._up.set()
            self.on_connected()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._up.clear()
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        self.on_ack(mid)

    def __enter__(self) -> AgentMqttPublisher:
        if self._entered:
            raise RuntimeError("AgentMqttPublisher is already connected")
        self._entered = True
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()
        log.info("connecting to %s in the background", self.broker)
        return self

    def send(self, topic: str, payload: bytes, channel: str) -> int | None:
        """Hand one message to paho (sent now, or when connected); its message id, ``None`` if refused."""
        return self.publish(topic, payload, channel)  # the agent's QoS is 1 or 2: queued while disconnected


def run_agent(
    cfg: AgentConfig,
    stop: threading.Event,
    *,
    max_samples: int | None = None,
    open_i2c: Callable[[int], SMBusLike] | None = None,
) -> int:
    """Publish ``RUNNING``, sample every ``interval_s`` until ``stop``, publish ``PLANNED_STOP``.

    Every message goes through the disk buffer. Returns the number of telemetry samples taken.
    Raises :class:`AgentConfigError` when the buffer file cannot be opened.
    """
    try:
        queue = DiskQueue(cfg.buffer.path, max_bytes=int(cfg.buffer.max_mb * 1e6))
    except DiskQueueError as exc:
        raise AgentConfigError(f"buffer.path: {exc}") from exc
    m = cfg.mqtt
    sent = 0
    with contextlib.ExitStack() as stack:
        stack.callback(queue.close)
        agent = DeviceAgent(cfg, open_i2c=open_i2c)
        stack.callback(agent.close)
        will = (agent.topic("state"), encode_payload(agent.state(None, MachineState.DOWN, "agent_lost")))
        transport = AgentMqttPublisher(
            BrokerAddress.parse(m.broker),
            m.client_id or f"factory-agent-{cfg.device.machine}",
            qos=m.qos,
            username=m.username,
            password=password_from_env(m.password),
            tls_ca=m.tls_ca,
            will=will,
            max_inflight=IN_FLIGHT,
            drain_timeout=0.5,
            reconnect_max_s=m.reconnect_max_s,
        )
        stack.enter_context(transport)
        sender = stack.enter_context(
            BufferedPublisher(queue, transport, window=IN_FLIGHT, drain_timeout=cfg.buffer.drain_timeout_s)
        )

        def emit(channel: str, msg: BaseModel) -> None:
            sender.publish(agent.topic(channel), encode_payload(msg))

        emit("state", agent.state(time.time(), MachineState.RUNNING, "agent_started"))
        interval = cfg.device.interval_s
        next_at = time.monotonic()
        empty_warned = False
        announced = 1
        offline_since: float | None = None
        limited = RateLimitedLog(log, every_s=60.0)
        while not stop.is_set():
            now_s = time.time()
            if transport.session > announced:  # a reconnect: the broker may have sent our will (DOWN) meanwhile
                announced = transport.session
                emit("state", agent.state(now_s, MachineState.RUNNING, "agent_reconnected"))
            if transport.connected:
                offline_since = None
            elif offline_since is None:
                offline_since = time.monotonic()
            elif time.monotonic() - offline_since > _OFFLINE_WARN_S:
                limited.warning(
                    "offline",
                    "broker %s unreachable for %.0f s; %d message(s) wait in the disk buffer %s",
                    m.broker,
                    time.monotonic() - offline_since,
                    len(queue),
                    queue.path,
                )
            sample = agent.sample(now_s)
            if sample is None:
                if not empty_warned:
                    log.warning("no sensor produced a value; nothing to publish until one does")
                    empty_warned = True
            else:
                emit("telemetry", sample)
                sent += 1
            count = agent.count(now_s)
            if count is not None:
                emit("count", count)
            if max_samples is not None and sent >= max_samples:
                break
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # fell behind (slow 1-Wire bus, suspend): skip, don't burst
                next_at = now
            stop.wait(next_at - now)
        emit("state", agent.state(time.time(), MachineState.PLANNED_STOP, "agent_stopped"))
    return sent
