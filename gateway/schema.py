"""The wire contract between devices and the gateway, defined once.

Devices (``devices/``) build these models to publish; the gateway validates incoming payloads against
them. Topic layout: ``<root>/<site>/<area>/<line>/<machine>/<channel>``.

>>> msg = TelemetrySample.model_validate_json(b'{"ts": 1763900000.25, "values": {"temp_c": 61.2}}')
>>> msg.values["temp_c"], ts_to_ns(msg.ts)
(61.2, 1763900000250000000)
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CHANNELS",
    "CountMessage",
    "MachineState",
    "StateMessage",
    "TelemetryColumnar",
    "TelemetryFixedRate",
    "TelemetrySample",
    "Timestamp",
    "parse_rfc3339_ns",
    "ts_to_ns",
]

CHANNELS = ("telemetry", "state", "count")

# Metric names become InfluxDB field keys: no empty names, no leading "_" (reserved), no control chars.
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_METRIC_NAME = 128
MAX_EPOCH_S = 1e11  # year 5138: anything larger is not seconds (and would overflow int64 nanoseconds)


class MachineState(StrEnum):
    RUNNING = "RUNNING"
    IDLE = "IDLE"
    DOWN = "DOWN"
    SETUP = "SETUP"
    PLANNED_STOP = "PLANNED_STOP"


# Unix epoch seconds (taken to microsecond precision) or an RFC 3339 string (nanosecond precision).
Timestamp = Annotated[float | str, Field(union_mode="left_to_right")]

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339_ns(text: str) -> int:
    """Parse an RFC 3339 timestamp into integer nanoseconds since the epoch.

    >>> parse_rfc3339_ns("2025-11-23T12:00:00.000000001Z")
    1763899200000000001
    """
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    day, clock, frac, tz = m.groups()
    tz = "+00:00" if tz in ("Z", "z") else tz
    whole = datetime.fromisoformat(f"{day}T{clock}{tz}")
    return int(whole.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def ts_to_ns(ts: float | str) -> int:
    """Convert a wire timestamp to integer nanoseconds (floats are rounded to the microsecond)."""
    if isinstance(ts, str):
        return parse_rfc3339_ns(ts)
    return int(round(ts * 1e6)) * 1000


def _check_ts(value: Any) -> Any:
    if isinstance(value, str):
        parse_rfc3339_ns(value)
    elif isinstance(value, bool):
        raise ValueError("timestamp must be a number or an RFC 3339 string, not a boolean")
    elif isinstance(value, int | float) and not 0 <= value < MAX_EPOCH_S:
        raise ValueError(f"timestamp {value!r} is out of range (Unix epoch seconds, 0 to {MAX_EPOCH_S:.0e})")
    return value


def _check_metric_names(values: dict[str, Any]) -> None:
    for name in values:
        if not name:
            raise ValueError("metric name is empty")
        if name.startswith("_"):
            raise ValueError(f"metric name {name!r} starts with '_' (reserved by InfluxDB)")
        if _BAD_NAME.search(name):
            raise ValueError(f"metric name {name!r} holds a backslash or control character")
        if len(name) > MAX_METRIC_NAME:
            raise ValueError(f"metric name {name[:20]!r}... is longer than {MAX_METRIC_NAME} characters")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True, strict=True)


class TelemetrySample(_Wire):
    """One sample: ``{"ts": 1763900000.25, "seq": 42, "values": {"spindle_temp_c": 61.2}}``."""

    ts: Timestamp | None = None
    seq: int | None = None
    values: dict[str, float] = Field(min_length=1)

    _ts = field_validator("ts", mode="before")(classmethod(lambda cls, v: _check_ts(v)))

    @field_validator("values")
    @classmethod
    def _names(cls, v: dict[str, float]) -> dict[str, float]:
        _check_metric_names(v)
        return v


class TelemetryColumnar(_Wire):
    """A columnar batch: ``{"ts": [t0, t1], "values": {"m": [v0, v1]}}`` with equal lengths."""

    ts: list[Timestamp] = Field(min_length=1)
    seq: list[int] | None = None
    values: dict[str, list[float]] = Field(min_length=1)

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_items(cls, v: Any) -> Any:
        if isinstance(v, list):
            for item in v:
                _check_ts(item)
        return v

    @model_validator(mode="after")
    def _lengths(self) -> TelemetryColumnar:
        _check_metric_names(self.values)
        n = len(self.ts)
        for name, col in self.values.items():
            if len(col) != n:
                raise ValueError(f"values.{name} has {len(col)} items but ts has {n}")
        if self.seq is not None and len(self.seq) != n:
            raise ValueError(f"seq has {len(self.seq)} items but ts has {n}")
        return self


class TelemetryFixedRate(_Wire):
    """Fixed-rate samples: ``{"t0": 1763900000.0, "dt": 0.001, "values": {"accel_g": [...]}}``."""

    t0: Timestamp
    dt: float = Field(gt=0, le=3600, description="Sample interval in seconds.")
    values: dict[str, list[float]] = Field(min_length=1)

    _t0 = field_validator("t0", mode="before")(classmethod(lambda cls, v: _check_ts(v)))

    @model_validator(mode="after")
    def _lengths(self) -> TelemetryFixedRate:
        _check_metric_names(self.values)
        lengths = {len(c) for c in self.values.values()}
        if len(lengths) != 1:
            raise ValueError(f"values columns have unequal lengths {sorted(lengths)}")
        if 0 in lengths:
            raise ValueError("values columns are empty")
        return self


class StateMessage(_Wire):
    """``{"ts": ..., "state": "RUNNING", "reason": "optional"}``; holds until the next state message."""

    ts: Timestamp | None = None
    state: MachineState = Field(strict=False)
    reason: str | None = Field(default=None, max_length=256)

    _ts = field_validator("ts", mode="before")(classmethod(lambda cls, v: _check_ts(v)))

    @field_validator("reason")
    @classmethod
    def _reason_text(cls, v: str | None) -> str | None:
        if v is not None and _CONTROL.search(v):
            raise ValueError("holds a control character")
        return v


class CountMessage(_Wire):
    """``{"ts": ..., "total": 19271, "good": 18848}``: cumulative counters since the device started."""

    ts: Timestamp | None = None
    total: int = Field(ge=0, le=2**63 - 1)
    good: int = Field(ge=0, le=2**63 - 1)

    _ts = field_validator("ts", mode="before")(classmethod(lambda cls, v: _check_ts(v)))

    @model_validator(mode="after")
    def _good_le_total(self) -> CountMessage:
        if self.good > self.total:
            raise ValueError(f"good ({self.good}) is greater than total ({self.total})")
        return self


TelemetryKind = Literal["sample", "columnar", "fixed_rate"]
