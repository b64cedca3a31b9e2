"""Raspberry Pi device agent: read real sensors, publish by the same wire contract as the simulator.

Sensors (each optional, paths configurable so tests can use temp files):

* CPU temperature from ``/sys/class/thermal/thermal_zone0/temp`` (millidegrees) → ``cpu_temp_c``
* load averages from ``/proc/loadavg`` → ``load_1m``, ``load_5m``, ``load_15m``
* 1-Wire DS18B20 probes from ``/sys/bus/w1/devices/28-*/w1_slave`` → ``ds18b20_<serial>_c``
  (or a name from ``[sensors.w1_names]``)

A missing sensor file is logged once and skipped. The agent has no GPIO input, so machine state is
simple: ``RUNNING`` (reason ``agent_started``) when the agent starts, ``PLANNED_STOP``
(``agent_stopped``) on a clean shutdown, and ``DOWN`` (``agent_lost``) as the MQTT last will
when the Pi drops off the network. No ``count`` messages are sent.

>>> cfg = AgentConfig.model_validate({"device": {"site": "s", "area": "a", "line": "l", "machine": "pi"}})
>>> cfg.mqtt.client_id or f"factory-agent-{cfg.device.machine}"
'factory-agent-pi'
"""

from __future__ import annotations

import glob
import logging
import threading
import time
import tomllib
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from devices.fleet import BrokerAddress, MqttPublisher, password_from_env
from devices.machine import encode_payload
from gateway.schema import MachineState, StateMessage, TelemetrySample

__all__ = [
    "AgentConfig",
    "AgentConfigError",
    "DeviceAgent",
    "SensorReader",
    "load_config",
    "read_cpu_temp",
    "read_ds18b20",
    "read_loadavg",
    "run_agent",
]

log = logging.getLogger(__name__)

# DS18B20 reports 85 °C after a power-on reset before the first conversion: treat it as no reading.
_DS18B20_RESET_MILLI = 85000


class AgentConfigError(Exception):
    """The agent's TOML file is missing, unreadable or invalid."""


def _topic_level(value: str) -> str:
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"{value!r} is not a valid MQTT topic level (non-empty, no '/', '+', '#')")
    return value


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
    qos: int = Field(default=1, ge=0, le=2)
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        BrokerAddress.parse(v)
        return v

    _root = field_validator("root")(classmethod(lambda cls, v: _topic_level(v)))


class SensorsSection(BaseModel):
    """``[sensors]``: which sensors to read and where their files are."""

    model_config = ConfigDict(extra="forbid")

    cpu_temp: bool = True
    cpu_temp_path: Path = Path("/sys/class/thermal/thermal_zone0/temp")
    loadavg: bool = True
    loadavg_path: Path = Path("/proc/loadavg")
    w1: bool = True
    w1_glob: str = "/sys/bus/w1/devices/28-*/w1_slave"
    w1_names: dict[str, str] = Field(default_factory=dict)  # "28-0123456789ab" → "coolant_temp_c"


class AgentConfig(BaseModel):
    """The whole agent TOML file."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceSection
    mqtt: MqttSection = Field(default_factory=MqttSection)
    sensors: SensorsSection = Field(default_factory=SensorsSection)


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
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise AgentConfigError(f"invalid agent config {path}: {problems}") from exc


# -- sensor files ---------------------------------------------------------------------------------


def read_cpu_temp(path: Path) -> float:
    """Degrees Celsius from a sysfs thermal zone file holding millidegrees (``"48312\\n"``)."""
    return int(path.read_text().strip()) / 1000.0


def read_loadavg(path: Path) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages from ``/proc/loadavg``."""
    parts = path.read_text().split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def read_ds18b20(path: Path) -> float | None:
    """Degrees Celsius from a DS18B20 ``w1_slave`` file; ``None`` on a CRC failure or reset value.

    The file has two lines; the first ends in ``YES`` when the CRC matched, the second ends ``t=23125``.
    """
    lines = path.read_text().strip().splitlines()
    if len(lines) < 2 or not lines[0].strip().endswith("YES"):
        return None
    _, sep, milli = lines[1].rpartition("t=")
    if not sep:
        return None
    value = int(milli.strip())
    if value == _DS18B20_RESET_MILLI:
        return None
    return value / 1000.0


class SensorReader:
    """Reads the configured sensors; a sensor that is absent or unreadable is logged once and skipped."""

    def __init__(self, cfg: SensorsSection) -> None:
        self.cfg = cfg
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def read(self) -> dict[str, float]:
        """One reading of every available sensor as ``{metric: value}``."""
        values: dict[str, float] = {}
        cfg = self.cfg
        if cfg.cpu_temp:
            try:
                values["cpu_temp_c"] = read_cpu_temp(cfg.cpu_temp_path)
            except (OSError, ValueError) as exc:
                self._warn_once(str(cfg.cpu_temp_path), "CPU temperature unavailable (%s); skipping it", exc)
        if cfg.loadavg:
            try:
                values["load_1m"], values["load_5m"], values["load_15m"] = read_loadavg(cfg.loadavg_path)
            except (OSError, ValueError, IndexError) as exc:
                self._warn_once(str(cfg.loadavg_path), "load average unavailable (%s); skipping it", exc)
        if cfg.w1:
            paths = sorted(glob.glob(cfg.w1_glob))
            if not paths:
                self._warn_once("w1:" + cfg.w1_glob, "no 1-Wire DS18B20 sensors match %s; skipping them", cfg.w1_glob)
            for p in paths:
                serial = Path(p).parent.name
                name = cfg.w1_names.get(serial) or f"ds18b20_{serial.removeprefix('28-')}_c"
                try:
                    temp = read_ds18b20(Path(p))
                except (OSError, ValueError) as exc:
                    self._warn_once(p, "DS18B20 %s unreadable (%s); skipping it", serial, exc)
                    continue
                if temp is None:
                    log.debug("DS18B20 %s: CRC failure or reset value, skipping this reading", serial)
                    continue
                values[name] = temp
        return values


# -- the daemon -----------------------------------------------------------------------------------


class DeviceAgent:
    """Builds the agent's messages; :func:`run_agent` publishes them on a schedule."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.reader = SensorReader(cfg.sensors)
        self.seq = 0
        d = cfg.device
        self.prefix = f"{cfg.mqtt.root}/{d.site}/{d.area}/{d.line}/{d.machine}"

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


def run_agent(cfg: AgentConfig, stop: threading.Event, *, max_samples: int | None = None) -> int:
    """Connect, publish ``RUNNING``, sample every ``interval_s`` until ``stop``; return samples sent."""
    agent = DeviceAgent(cfg)
    m = cfg.mqtt
    will = (agent.topic("state"), encode_payload(agent.state(None, MachineState.DOWN, "agent_lost")))
    publisher = MqttPublisher(
        BrokerAddress.parse(m.broker),
        m.client_id or f"factory-agent-{cfg.device.machine}",
        qos=m.qos,
        username=m.username,
        password=password_from_env(m.password),
        tls_ca=m.tls_ca,
        will=will,
    )
    sent = 0
    interval = cfg.device.interval_s
    with publisher:
        msg = agent.state(time.time(), MachineState.RUNNING, "agent_started")
        publisher.publish(agent.topic("state"), encode_payload(msg), "state")
        next_at = time.monotonic()
        empty_warned = False
        while not stop.is_set():
            sample = agent.sample(time.time())
            if sample is None:
                if not empty_warned:
                    log.warning("no sensor produced a value; nothing to publish until one does")
                    empty_warned = True
            else:
                publisher.publish(agent.topic("telemetry"), encode_payload(sample), "telemetry")
                sent += 1
                log.debug("published %s", orjson.dumps(sample.values).decode())
            if max_samples is not None and sent >= max_samples:
                break
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # fell behind (suspend, slow SD card): skip, don't burst
                next_at = now
            stop.wait(next_at - now)
        msg = agent.state(time.time(), MachineState.PLANNED_STOP, "agent_stopped")
        publisher.publish(agent.topic("state"), encode_payload(msg), "state")
    return sent
