"""Validated settings: one TOML file, overridable from the environment as ``FGW_<SECTION>__<KEY>``.

Every problem is reported with the dotted key it belongs to (``influx.url: ...``), all at once, before
anything starts. Secrets (``token``, ``password``) come from the environment or from a file
(``token_file``, ``password_file``) and are redacted wherever settings are shown.

>>> cfg = GatewayConfig.model_validate({"influx": {"database": "plant"}})
>>> cfg.influx.database, cfg.mqtt.subscriptions()[0].topic
('plant', 'factory/+/+/+/+/+')
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.deadletter import DeadLetterConfig
from gateway.detect.config import DetectionConfig
from gateway.errors import ConfigError
from gateway.features import FeaturesConfig
from gateway.oee import MachineConfig, OeeConfig
from gateway.wal import BufferConfig
from gateway.webauth import WebConfig, WebConfigError, is_loopback, load_web_config

__all__ = [
    "GatewayConfig",
    "GatewaySection",
    "HttpConfig",
    "InfluxConfig",
    "MqttConfig",
    "SparkplugConfig",
    "Subscription",
    "TlsConfig",
    "load_config",
]

TOPIC_FIELDS = ("site", "area", "line", "machine", "channel")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _read_secret(value: SecretStr | None, path: Path | None, key: str) -> SecretStr | None:
    if path is None:
        return value
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror}") from exc


class TlsConfig(_Section):
    """TLS to the broker or the database."""

    ca_file: Path | None = Field(None, description="CA bundle that signed the server certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS).")
    insecure: bool = Field(False, description="Skip hostname verification (testing only).")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        for name in ("ca_file", "cert_file", "key_file"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{name}: file {p} does not exist")
        return self


class Subscription(_Section):
    """One MQTT subscription: a topic filter, its QoS and how its payloads are encoded."""

    topic: str
    qos: Literal[0, 1, 2] | None = None
    format: Literal["json", "line", "auto", "sparkplug"] = "auto"

    @field_validator("topic")
    @classmethod
    def _filter(cls, v: str) -> str:
        if not v:
            raise ValueError("topic filter is empty")
        parts = v.split("/")
        for i, part in enumerate(parts):
            if "#" in part and (part != "#" or i != len(parts) - 1):
                raise ValueError(f"'#' must be a whole last level in {v!r}")
            if "+" in part and part != "+":
                raise ValueError(f"'+' must be a whole level in {v!r}")
        return v


class MqttConfig(_Section):
    """``[mqtt]``: the broker connection and what to subscribe to."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field("factory-gateway", min_length=1, description="Fixed id: the broker keeps our session.")
    topics: list[Subscription] = Field(default_factory=lambda: [Subscription(topic="factory/+/+/+/+/+")])
    qos: Literal[0, 1, 2] = 1
    topic_template: str = "factory/{site}/{area}/{line}/{machine}/{channel}"
    protocol: Literal["3.1.1", "5"] = "5"
    clean_session: bool = Field(False, description="False keeps the session (and queued messages) across restarts.")
    session_expiry_s: int = Field(7 * 86400, ge=0, description="MQTT 5 session expiry.")
    receive_maximum: int = Field(20000, ge=1, le=65535, description="MQTT 5: unacked messages in flight to us.")
    keepalive_s: int = Field(30, ge=5)
    reconnect_max_s: float = Field(30.0, gt=0, le=300)
    stall_timeout_s: float = Field(120.0, gt=0, description="Reconnect when nothing arrives and pings fail.")
    fast_receive: bool = Field(True, description="Read whole socket chunks and frame PUBLISH packets in one loop "
                               "once subscribed (paho keeps connect, TLS, auth, subscribe, pings); false: paho reads.")
    read_coalesce_ms: float = Field(2.0, ge=0, le=50, description="Fast receive: after a read of less than 64 KiB "
                                    "(messages trickling in) wait this long before the next, so one wake-up takes "
                                    "many messages (interrupt coalescing; adds at most this to a message's latency). "
                                    "0: read as soon as bytes arrive.")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None

    @field_validator("topics", mode="before")
    @classmethod
    def _topic_strings(cls, v: Any) -> Any:
        # A plain string is shorthand for {topic = "..."}.
        if isinstance(v, list):
            return [{"topic": t} if isinstance(t, str) else t for t in v]
        return v

    @field_validator("topic_template")
    @classmethod
    def _template(cls, v: str) -> str:
        names = [p[1:-1] for p in v.split("/") if p.startswith("{") and p.endswith("}")]
        missing = [f for f in TOPIC_FIELDS if f not in names]
        if missing:
            raise ValueError(f"template must contain {{{'}, {'.join(missing)}}}")
        unknown = [n for n in names if n not in TOPIC_FIELDS]
        if unknown:
            raise ValueError(f"unknown placeholder(s) {unknown}; allowed: {list(TOPIC_FIELDS)}")
        return v

    @model_validator(mode="after")
    def _secret(self) -> MqttConfig:
        self.password = _read_secret(self.password, self.password_file, "password_file")
        return self

    def subscriptions(self) -> list[Subscription]:
        return [s if s.qos is not None else s.model_copy(update={"qos": self.qos}) for s in self.topics]


class InfluxConfig(_Section):
    """``[influx]``: where points go and how they are batched."""

    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2"] = "v1"
    database: str = Field("factory", min_length=1, description="v1: database name.")
    retention_policy: str | None = Field(None, description="v1: retention policy (default: the database's).")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    bucket: str = Field("factory", min_length=1, description="v2: bucket.")
    org: str = Field("factory", description="v2: organisation.")
    token: SecretStr | None = None
    token_file: Path | None = None
    batch_size: int = Field(5000, ge=1, le=1_000_000, description="Points per write.")
    flush_interval_ms: int = Field(200, ge=1, description="Longest a point waits before it is written.")
    gzip: bool = False
    timeout_s: float = Field(10.0, gt=0)
    ca_file: Path | None = None
    create_database: bool = Field(True, description="v1: CREATE DATABASE on start if missing.")
    max_retry_s: float = Field(30.0, gt=0, description="Cap of the exponential retry backoff.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _secrets(self) -> InfluxConfig:
        self.password = _read_secret(self.password, self.password_file, "password_file")
        self.token = _read_secret(self.token, self.token_file, "token_file")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file: file {self.ca_file} does not exist")
        return self


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?$")
_DOTTED_NUMBERS = re.compile(r"^[0-9.]+$")


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (an IPv6 address in brackets) into ``(host, port)``; raise ValueError.

    >>> parse_listen("0.0.0.0:9273"), parse_listen("[::1]:9273"), parse_listen("gw.local:80")
    (('0.0.0.0', 9273), ('::1', 9273), ('gw.local', 80))
    """
    expected = f"expected host:port (IPv6 as [::1]:9273), got {value!r}"
    if "://" in value or "/" in value:
        raise ValueError(f"{expected}: no scheme or path")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(expected)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address (in {value!r})") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(expected)
        if ":" in host or "[" in host or "]" in host:
            raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:9273; got {value!r}")
        if _DOTTED_NUMBERS.match(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address (in {value!r})") from None
        elif not _HOSTNAME.match(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name or IP address (in {value!r})")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port!r} (in {value!r})")
    return host, int(port)


class HttpConfig(_Section):
    """``[http]``: where ``/healthz``, ``/readyz`` and ``/metrics`` are served (:mod:`gateway.http`).

    >>> HttpConfig(listen="[::1]:9273").address
    ('::1', 9273)
    """

    enabled: bool = True
    listen: str = Field("127.0.0.1:9273", description="host:port to listen on; IPv6 in brackets: [::1]:9273.")
    ring_size: int = Field(120, ge=2, le=100_000, description="Slots kept per series for the page's charts.")
    ring_interval_s: float = Field(30.0, ge=0.1, le=86400, description="One chart slot per this many seconds.")
    event_ring: int = Field(100, ge=1, le=100_000, description="State changes / anomalies / OEE records kept "
                            "per machine for the page.")
    stale_after_s: float = Field(60.0, gt=0, description="A machine silent this long shows as stale.")
    web_config_file: Path | None = Field(None, description="Prometheus web-config file (basic_auth_users, "
                                         "tls_server_config); required to listen beyond loopback.")

    @model_validator(mode="after")
    def _auth(self) -> HttpConfig:
        host, _ = parse_listen(self.listen)
        if self.web_config_file is None:
            if self.enabled and not is_loopback(host):
                raise ValueError(f"web_config_file: required to listen on {self.listen} (not a loopback address): "
                                 "a Prometheus web-config file with basic_auth_users")
            return self
        try:
            load_web_config(self.web_config_file)
        except WebConfigError as exc:
            raise ValueError(f"web_config_file: {exc}") from exc
        return self

    def web_config(self) -> WebConfig | None:
        """The parsed ``web_config_file`` (read again: a reload may have changed it); None without one."""
        return None if self.web_config_file is None else load_web_config(self.web_config_file)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


class GatewaySection(_Section):
    """``[gateway]``: the daemon itself and the limits applied to every message."""

    instance: str = Field(default_factory=socket.gethostname, min_length=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout_s: float = Field(15.0, gt=0)
    stats_interval_s: float = Field(10.0, gt=0, description="Period of gateway_stats points and the log summary.")
    max_payload_bytes: int = Field(1_048_576, ge=64)
    max_series: int = Field(100_000, ge=1, description="Cardinality cap: machine x metric series, and machines.")
    max_past_s: float = Field(30 * 86400, gt=0, description="Reject samples older than this.")
    max_future_s: float = Field(300, gt=0, description="Reject samples further ahead than this.")
    store_waveforms: bool = Field(True, description="Write every sample of fixed-rate blocks to telemetry.")


_SPARKPLUG_FIELDS = ("group_id", "edge_node_id", "device_id")
_PLACEHOLDER = re.compile(r"{([^{}]*)}")


class SparkplugConfig(_Section):
    """``[sparkplug]``: the Sparkplug B host application (subscriptions with ``format = "sparkplug"``).

    Tags are templates over ``{group_id}``, ``{edge_node_id}`` and ``{device_id}`` (an edge node's own
    metrics have ``device_id = edge_node_id``).

    >>> SparkplugConfig(machine="{edge_node_id}.{device_id}").machine
    '{edge_node_id}.{device_id}'
    """

    host_id: str | None = Field(None, description="Primary host id: Will and retained STATE on spBv1.0/STATE/<id>.")
    site: str = Field("{group_id}", min_length=1)
    area: str = Field("sparkplug", min_length=1)
    line: str = Field("{edge_node_id}", min_length=1)
    machine: str = Field("{device_id}", min_length=1)
    reorder_timeout_s: float = Field(2.0, ge=0, le=60, description="How long a seq gap may wait to be filled.")
    rebirth_interval_s: float = Field(5.0, ge=0, description="At most one rebirth request per edge node this often.")
    state_metric: str | None = Field(None, description="Metric holding the machine state (OEE).")
    total_metric: str | None = Field(None, description="Metric counting all parts (OEE).")
    good_metric: str | None = Field(None, description="Metric counting good parts (OEE; default: total).")

    @field_validator("site", "area", "line", "machine")
    @classmethod
    def _tag_template(cls, v: str) -> str:
        unknown = [n for n in _PLACEHOLDER.findall(v) if n not in _SPARKPLUG_FIELDS]
        if unknown:
            raise ValueError(f"unknown placeholder(s) {unknown}; allowed: {list(_SPARKPLUG_FIELDS)}")
        return v

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#")):
            raise ValueError(f"must be one non-empty topic level without '/', '+' or '#', got {v!r}")
        return v


class GatewayConfig(BaseSettings):
    """The whole configuration (one TOML file)."""

    model_config = SettingsConfigDict(
        env_prefix="FGW_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    influx: InfluxConfig = Field(default_factory=InfluxConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    deadletter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    detect: DetectionConfig = Field(default_factory=DetectionConfig)
    oee: OeeConfig = Field(default_factory=OeeConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig)
    machines: dict[str, MachineConfig] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: that is how secrets and per-host overrides arrive.
        return env_settings, init_settings

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced by ``***``."""
        data: dict[str, Any] = self.model_dump(mode="json")
        for section in ("mqtt", "influx"):
            for key in ("password", "token"):
                if data.get(section, {}).get(key):
                    data[section][key] = "***"
        return data


def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``dotted.key: message`` line per problem."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        # Model validators name the key in their message ("token_file: ..."): move it into the dotted key.
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier() and err["type"] == "value_error":
            loc, msg = f"{loc}.{head}" if loc else head, rest
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see configs/gateway.example.toml)"
        lines.append(f"{loc or '(root)'}: {msg}")
    return lines


def load_config(path: Path | None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (TOML), apply ``FGW_*`` environment overrides, validate; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError([f"(file): {path} does not exist"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"(file): {path} is not valid TOML: {exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"(file): {path} is not UTF-8 text: byte {exc.start}: {exc.reason}"]) from exc
        except OSError as exc:
            raise ConfigError([f"(file): cannot read {path}: {exc.strerror or exc}"]) from exc
    http = data.get("http")
    if path is not None and isinstance(http, dict) and isinstance(http.get("web_config_file"), str):
        http["web_config_file"] = str(Path(path).parent / http["web_config_file"])  # relative to this file
    saved = None
    if env is not None:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
    try:
        return GatewayConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    finally:
        if saved is not None:
            os.environ.clear()
            os.environ.update(saved)
