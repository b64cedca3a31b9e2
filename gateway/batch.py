"""Columnar batches: what the decode stage produces and every later stage consumes.

Telemetry is held as three parallel numpy arrays (series id, timestamp ns, value); a series is one
machine × metric and is numbered once by the :class:`SeriesRegistry`, so detectors can keep their
per-series state in flat arrays indexed by series id.

>>> reg = SeriesRegistry(max_series=10)
>>> m = MachineKey("s1", "a1", "l1", "m1")
>>> reg.series_id(m, "temp_c"), reg.series_id(m, "vib"), reg.series_id(m, "temp_c")
(0, 1, 0)
>>> reg.metric(1), reg.machine_of(1).machine
('vib', 'm1')
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gateway.errors import CardinalityError
from gateway.schema import MachineState

__all__ = [
    "AckToken",
    "CountEvent",
    "MachineKey",
    "SeriesRegistry",
    "StateEvent",
    "StatusEvent",
    "TelemetryBatch",
    "WaveformBlock",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(slots=True)
class AckToken:
    """What the source needs to acknowledge one message once its points are durable."""

    mid: int
    qos: int
    generation: int


@dataclass(frozen=True, slots=True)
class MachineKey:
    """Where a machine sits in the ISA-95 hierarchy (the topic's tag segments)."""

    site: str
    area: str
    line: str
    machine: str


class SeriesRegistry:
    """Numbers series (machine × metric) densely from 0 and caps how many may exist."""

    def __init__(self, max_series: int = 100_000) -> None:
        self.max_series = max_series
        self._ids: dict[tuple[MachineKey, str], int] = {}
        self._machines: list[MachineKey] = []
        self._metrics: list[str] = []
        self._machine_ids: dict[MachineKey, int] = {}
        self._machine_list: list[MachineKey] = []
        self._series_machine: list[int] = []

    def __len__(self) -> int:
        return len(self._metrics)

    def series_id(self, machine: MachineKey, metric: str) -> int:
        """Return the id of ``machine × metric``, creating it; raise CardinalityError past the cap."""
        key = (machine, metric)
        sid = self._ids.get(key)
        if sid is not None:
            return sid
        if len(self._metrics) >= self.max_series:
            raise CardinalityError(
                f"series {machine.machine}/{metric} would exceed max_series={self.max_series}"
            )
        sid = len(self._metrics)
        self._ids[key] = sid
        self._machines.append(machine)
        self._metrics.append(metric)
        self._series_machine.append(self.machine_id(machine))
        return sid

    def lookup(self, machine: MachineKey, metric: str) -> int | None:
        return self._ids.get((machine, metric))

    def machine_id(self, machine: MachineKey) -> int:
        """Return the id of ``machine``, creating it; raise CardinalityError past ``max_series`` machines.

        State and count messages name machines too (OEE keeps state per machine): the cap bounds them.
        """
        mid = self._machine_ids.get(machine)
        if mid is None:
            if len(self._machine_list) >= self.max_series:
                raise CardinalityError(
                    f"machine {machine.machine} would exceed max_series={self.max_series} machines"
                )
            mid = len(self._machine_list)
            self._machine_ids[machine] = mid
            self._machine_list.append(machine)
        return mid

    def machine_of(self, sid: int) -> MachineKey:
        return self._machines[sid]

    def metric(self, sid: int) -> str:
        return self._metrics[sid]

    @property
    def metrics(self) -> list[str]:
        """Metric name per series id (index = series id)."""
        return self._metrics

    @property
    def machines(self) -> list[MachineKey]:
        """Machine per series id (index = series id)."""
        return self._machines

    def series_machine_ids(self) -> I64:
        """Machine id per series id, as an array."""
        return np.asarray(self._series_machine, dtype=np.int64)


@dataclass(slots=True)
class TelemetryBatch:
    """Scalar telemetry samples, one row per (series, timestamp), in arrival order."""

    series: I64
    ts_ns: I64
    value: F64

    def __len__(self) -> int:
        return int(self.series.shape[0])

    @classmethod
    def empty(cls) -> TelemetryBatch:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))


@dataclass(slots=True)
class WaveformBlock:
    """A fixed-rate block of one metric (e.g. 1 kHz vibration) kept whole for window features."""

    series: int
    t0_ns: int
    dt_ns: int
    values: F64


@dataclass(frozen=True, slots=True)
class StateEvent:
    machine: MachineKey
    ts_ns: int
    state: MachineState
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class CountEvent:
    machine: MachineKey
    ts_ns: int
    total: int
    good: int


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A device or edge node came online (birth) or went offline (death); ``bdseq`` names the session."""

    machine: MachineKey
    ts_ns: int
    online: bool
    bdseq: int | None = None


@dataclass(slots=True)
class DecodedBatch:
    """Everything one flush of the pipeline carries from decode to compute."""

    telemetry: TelemetryBatch = field(default_factory=TelemetryBatch.empty)
    waveforms: list[WaveformBlock] = field(default_factory=list)
    states: list[StateEvent] = field(default_factory=list)
    counts: list[CountEvent] = field(default_factory=list)
    raw_lines: list[bytes] = field(default_factory=list)
    statuses: list[StatusEvent] = field(default_factory=list)
    detect_rows: int = 0  # telemetry[:detect_rows] are scalar samples for the detectors; the rest is waveform
