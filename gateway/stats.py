"""One registry of the gateway's own numbers: each stage gives a typed snapshot (assembled by
:func:`gateway.pipeline.collect`).

Prometheus (:class:`gateway.http.GatewayCollector`), the ``gateway_stats`` points, the status line and the
JSON API all read a :class:`GatewayStats`, so a number is computed in one place and named once. Snapshots are
plain frozen values taken at call time (no locks needed: everything runs in the gateway's one event loop).

>>> s = OutputSnapshot(writes=2, points_written=10, write_errors=1, retries=1, rejected_lines=0,
...                    failing_for_s=None, last_error="timeout")
>>> s.failing
False
>>> WalSnapshot(bytes_pending=512, records_pending=3, max_bytes=1024, oldest_pending_age_s=2.0).fill
0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DeadLetterSnapshot",
    "GatewayStats",
    "MqttSnapshot",
    "OutputSnapshot",
    "PipelineSnapshot",
    "WalSnapshot",
]


@dataclass(frozen=True, slots=True)
class PipelineSnapshot:
    """Counters of :class:`gateway.pipeline.Pipeline` since start."""

    messages_in: int
    points_in: int
    decode_errors: int
    batches: int
    points_out: int
    acks: int
    anomalies: int
    oee_windows: int
    batch_latency_ms: float
    series: int
    max_series: int
    pending_messages: int
    backpressure_waits: int
    accepting: bool
    rejected: Mapping[str, int]  # by reject reason, every reason of gateway.errors.REJECT_REASONS present
    anomalies_by_detector: Mapping[str, int]  # every configured detector present (0 until it fires)


@dataclass(frozen=True, slots=True)
class OutputSnapshot:
    """The database output: writes, retries, and whether writing fails right now."""

    writes: int
    points_written: int
    write_errors: int
    retries: int
    rejected_lines: int
    failing_for_s: float | None  # seconds the current write has been failing; None while writes succeed
    last_error: str | None

    @property
    def failing(self) -> bool:
        return self.failing_for_s is not None


@dataclass(frozen=True, slots=True)
class WalSnapshot:
    """The write-ahead log's backlog."""

    bytes_pending: int
    records_pending: int
    max_bytes: int
    oldest_pending_age_s: float | None  # None when nothing is pending

    @property
    def fill(self) -> float:
        """Fraction of ``max_bytes`` in use."""
        return self.bytes_pending / self.max_bytes if self.max_bytes else 0.0


@dataclass(frozen=True, slots=True)
class DeadLetterSnapshot:
    """The dead-letter file."""

    records_written: int
    rotations: int
    path: str


@dataclass(frozen=True, slots=True)
class MqttSnapshot:
    """The MQTT source's connection."""

    host: str
    port: int
    connected: bool
    messages: int
    reconnects: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """Everything at one instant; ``wal``/``deadletter``/``mqtt`` are None when that stage is not there."""

    version: str
    instance: str
    pipeline: PipelineSnapshot
    output: OutputSnapshot
    wal: WalSnapshot | None
    deadletter: DeadLetterSnapshot | None
    mqtt: MqttSnapshot | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the mappings become plain dicts)."""
        return asdict(self)
