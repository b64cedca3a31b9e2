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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.checkpoint import State
from gateway.errors import CardinalityError
from gateway.schema import MachineState

__all__ = [
    "AckToken",
    "CountEvent",
    "MachineKey",
    "NewerSamples",
    "SeriesRegistry",
    "StateEvent",
    "StatusEvent",
    "TelemetryBatch",
    "WaveformBlock",
    "room_for",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
_A = TypeVar("_A", bound=npt.NDArray[Any])


def room_for(buf: _A, used: int, needed: int, fill: float = 0) -> _A:
    """``buf`` (its first ``used`` rows in use) with room for ``needed`` rows: itself if it has it, else a
    buffer of double the capacity holding the used rows, its other rows ``fill``. Per-series state grows
    this way, not by ``np.concatenate`` per batch of new series (a copy each time, and heap slack); zero
    rows are never written, so their pages stay unmapped until used.

    >>> b = room_for(np.zeros(0, np.int64), 0, 3, fill=-1)
    >>> b.shape, b[:3].tolist(), room_for(b, 3, 10) is b
    ((64,), [-1, -1, -1], True)
    """
    if buf.shape[0] >= needed:
        return buf
    shape = (max(needed, 2 * buf.shape[0], 64), *buf.shape[1:])
    grown = np.zeros(shape, buf.dtype) if fill == 0 else np.full(shape, fill, buf.dtype)
    grown[:used] = buf[:used]
    return grown  # type: ignore[return-value]


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
        # machine -> metric -> series id (a dict per machine: no (machine, metric) tuple per series)
        self._ids: dict[MachineKey, dict[str, int]] = {}
        self._machines: list[MachineKey] = []
        self._metrics: list[str] = []
        self._machine_ids: dict[MachineKey, int] = {}
        self._machine_list: list[MachineKey] = []
        # machine id per series id, int64 with room to grow (capacity doubles): what the encoder and the
        # plant view gather from, one shared copy instead of one each grown by np.concatenate per batch
        self._series_machine_arr: I64 = np.zeros(0, np.int64)
        # series whose values are float32 at the source (a Sparkplug Float): written with 9 significant
        # digits, which identify a float32 exactly (see gateway.encode); ``float32_epoch`` counts changes
        self._float32: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)
        self.float32_epoch = 0

    def _append_series_machine(self, mid: int) -> None:
        n = len(self._metrics) - 1  # the series just appended
        self._series_machine_arr = room_for(self._series_machine_arr, n, n + 1)
        self._series_machine_arr[n] = mid
        self._float32 = room_for(self._float32, n, n + 1)

    def set_float32(self, sid: int, on: bool) -> None:
        """Declare whether series ``sid``'s values are float32 at the source (default: not).

        >>> reg = SeriesRegistry()
        >>> sid = reg.series_id(MachineKey("s", "a", "l", "m"), "temp")
        >>> reg.set_float32(sid, True)
        >>> reg.float32_mask().tolist(), reg.float32_epoch
        ([True], 1)
        """
        if bool(self._float32[sid]) != on:
            self._float32[sid] = on
            self.float32_epoch += 1

    def float32_mask(self) -> npt.NDArray[np.bool_]:
        """Per series id: float32 at the source (a read-only view: valid until more series are added)."""
        view = self._float32[: len(self._metrics)]
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._metrics)

    def series_id(self, machine: MachineKey, metric: str) -> int:
        """Return the id of ``machine × metric``, creating it; raise CardinalityError past the cap."""
        ids = self._ids.get(machine)
        sid = ids.get(metric) if ids is not None else None
        if sid is not None:
            return sid
        if len(self._metrics) >= self.max_series:
            raise CardinalityError(
                f"series {machine.machine}/{metric} would exceed max_series={self.max_series}"
            )
        sid = len(self._metrics)
        if ids is None:
            ids = self._ids[machine] = {}
        ids[metric] = sid
        self._machines.append(machine)
        self._metrics.append(metric)
        self._append_series_machine(self.machine_id(machine))
        return sid

    def lookup(self, machine: MachineKey, metric: str) -> int | None:
        ids = self._ids.get(machine)
        return ids.get(metric) if ids is not None else None

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

    def machine_index(self, machine: MachineKey) -> int:
        """The id of a known machine (KeyError if it was never registered)."""
        return self._machine_ids[machine]

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
        """Machine id per series id, as an array (a read-only view: valid until more series are added)."""
        view = self._series_machine_arr[: len(self._metrics)]
        view.flags.writeable = False
        return view

    @property
    def series_machine(self) -> list[int]:
        """Machine id per series id (index = series id; a new list: :meth:`series_machine_ids` is the array)."""
        return self.series_machine_ids().tolist()  # type: ignore[no-any-return]

    @property
    def machine_list(self) -> list[MachineKey]:
        """Machine per machine id (index = machine id)."""
        return self._machine_list

    def machine_count(self) -> int:
        return len(self._machine_list)

    def add(self, machines: Sequence[MachineKey], series: Sequence[tuple[int, str]]) -> None:
        """Register machines (next ids, in order), then series ``(machine id, metric)`` (next ids, in order).

        How a restore or a replay rebuilds the same numbering; the cap does not apply (it was checked then).
        """
        for key in machines:
            self._machine_ids[key] = len(self._machine_list)
            self._machine_list.append(key)
        for mid, metric in series:
            machine = self._machine_list[mid]
            self._ids.setdefault(machine, {})[metric] = len(self._metrics)
            self._machines.append(machine)
            self._metrics.append(metric)
            self._append_series_machine(mid)

    def snapshot(self) -> State:
        """Series and machine numbering (see :mod:`gateway.checkpoint`)."""
        return State({"machines": [list(_key_tuple(k)) for k in self._machine_list]},
                     {"series_machine": self.series_machine_ids().copy(),
                      "metric": np.asarray(self._metrics, dtype=np.str_)})

    def restore(self, state: State) -> None:
        """Replace the numbering with a saved one."""
        machines = [MachineKey(*k) for k in state.meta["machines"]]
        sm = state.array("series_machine").tolist()
        metrics = state.array("metric").tolist()
        if len(sm) != len(metrics) or any(not 0 <= m < len(machines) for m in sm):
            raise ValueError("series registry: series and machines do not match")
        self.__init__(self.max_series)  # type: ignore[misc]
        self.add(machines, list(zip(sm, metrics, strict=True)))


def _key_tuple(k: MachineKey) -> tuple[str, str, str, str]:
    return (k.site, k.area, k.line, k.machine)


class NewerSamples:
    """Per series, the newest sample time learned from: a series learns only from samples newer than that.

    A message that was made durable but not acknowledged before a crash is in the state rebuilt from the
    WAL *and* redelivered by the broker; this keeps its second copy out of the detectors. A sample is kept
    only if it is newer than every sample of its series that arrived before it, in this batch too, so
    what is kept does not depend on where batches are cut (a gather, a stable sort by series and one
    ``maximum.at`` per batch; a running maximum only when a series goes back in time within the batch).

    >>> g = NewerSamples()
    >>> g.keep(np.array([0, 1, 0]), np.array([5, 5, 6])).tolist()
    [True, True, True]
    >>> g.keep(np.array([0, 1, 1]), np.array([6, 5, 7])).tolist()  # 0@6 and 1@5 were learned already
    [False, False, True]
    >>> g.keep(np.array([2, 2, 2, 1]), np.array([9, 8, 10, 7])).tolist()  # 2@8 is older than 2@9 before it
    [True, False, True, False]
    """

    def __init__(self) -> None:
        self.last_ns: I64 = np.full(0, np.iinfo(np.int64).min, np.int64)
        self.dropped = 0

    def keep(self, series: I64, ts_ns: I64) -> npt.NDArray[np.bool_]:
        """Which samples are newer than every earlier one of their series; then learn their times."""
        n = series.shape[0]
        if n == 0:
            return np.ones(0, np.bool_)
        need = int(series.max()) + 1
        if need > self.last_ns.shape[0]:
            grown = np.full(max(need, 2 * self.last_ns.shape[0], 64), np.iinfo(np.int64).min, np.int64)
            grown[: self.last_ns.shape[0]] = self.last_ns
            self.last_ns = grown
        ok: npt.NDArray[np.bool_] = ts_ns > self.last_ns[series]
        np.maximum.at(self.last_ns, series, ts_ns)
        if n > 1:
            o = np.argsort(series, kind="stable")  # by series, arrival order within each
            ss, tt = series[o], ts_ns[o]
            same = ss[1:] == ss[:-1]
            if same.any() and (tt[1:][same] <= tt[:-1][same]).any():
                # a series goes back in time in this batch: each sample against the running maximum of its
                # series' earlier ones (segment-offset ranks, so one accumulate covers every series)
                start = np.r_[True, ~same]
                rank = np.unique(tt, return_inverse=True)[1].reshape(-1)
                key = (np.cumsum(start) - 1) * n + rank
                prev = np.r_[-1, np.maximum.accumulate(key)[:-1]]
                ok[o[~start & (key <= prev)]] = False
        self.dropped += int(ok.shape[0] - np.count_nonzero(ok))
        return ok

    def snapshot(self) -> State:
        return State({"dropped": self.dropped}, {"last_ns": self.last_ns.copy()})

    def restore(self, state: State) -> None:
        self.last_ns = np.array(state.array("last_ns"), np.int64)
        self.dropped = int(state.meta["dropped"])


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
    # Where each state arrived: detect rows before it (empty: unknown, before them all), and the messages
    # of the batch before each state / count (empty: unknown, then OEE merges them by time).
    state_rows: list[int] = field(default_factory=list)
    state_seq: list[int] = field(default_factory=list)
    count_seq: list[int] = field(default_factory=list)
    # Detect rows where a message starts at the timestamp of the row before it (a group of one machine's
    # samples at one timestamp never spans two messages: a batch may be cut between them).
    group_breaks: list[int] = field(default_factory=list)
