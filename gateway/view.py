"""A bounded in-memory view of the plant for the operator's page, fed by the pipeline after compute.

Per machine: its current state and since when, the last OEE record of each window (the very records the
gateway writes as ``oee`` points), the last anomaly, the time of its last message, and two bounded rings
(state changes, anomaly events). Per series: a ring of ``ring_size`` slots of ``ring_interval_s`` each
(float32, NaN = no sample in that slot; a slot keeps the latest sample that fell in it).

Memory: 4 bytes per slot plus 16 bytes per series. At the defaults (120 slots of 30 s = the last hour),
10,000 machines x 8 metrics = 80,000 series cost 80,000 x (120 x 4 + 16) B = 39.7 MB. The machines' OEE
history and anomalies are columns of :class:`MachineRings` (82 and 29 bytes a row, no object per row):
full at the default ``events`` (100), 10,000 machines hold 82 + 29 MB; state changes ~9 bytes each.

>>> import numpy as np
>>> rings = SeriesRings(ring_size=4, ring_interval_s=10)
>>> s = 10**9
>>> rings.update(np.array([0, 0, 0]), np.array([100 * s, 105 * s, 112 * s]), np.array([1.0, 2.0, 3.0]))
>>> rings.read(0)
([80.0, 90.0, 100.0, 110.0], [nan, nan, 2.0, 3.0])
>>> rings.update(np.array([0]), np.array([131 * s]), np.array([4.0]))  # 120 s had no sample
>>> rings.read(0)
([100.0, 110.0, 120.0, 130.0], [2.0, 3.0, nan, 4.0])
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.batch import MachineKey

if TYPE_CHECKING:
    from gateway.batch import DecodedBatch, SeriesRegistry
    from gateway.detect.fusion import AnomalyEvents
    from gateway.oee import OeeRecord

__all__ = ["AnomalyMark", "MachineRings", "MachineView", "OeeMark", "PlantView", "SeriesRings", "StateChange",
           "StateRing"]

_NONE = np.iinfo(np.int64).min
_K = TypeVar("_K")


class SeriesRings:
    """One fixed-size ring of downsampled values per series id, grown as series appear."""

    def __init__(self, ring_size: int, ring_interval_s: float, *, capacity: int = 1024) -> None:
        if ring_size < 1 or not ring_interval_s > 0:
            raise ValueError("ring_size must be >= 1 and ring_interval_s > 0")
        self.ring_size = ring_size
        self.interval_ns = round(ring_interval_s * 1e9)
        # rows are NaN-filled when their series first appears (spare capacity is never written: its
        # pages are not mapped), so memory follows the series seen, not the capacity
        self.values = np.empty((capacity, ring_size), np.float32)
        self.last_slot = np.full(capacity, _NONE, np.int64)  # newest slot number written, per series

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.last_slot.nbytes)

    def _grow(self, n: int) -> None:
        cap = self.values.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        values = np.empty((new, self.ring_size), np.float32)
        values[:cap] = self.values
        last = np.full(new, _NONE, np.int64)
        last[:cap] = self.last_slot
        self.values, self.last_slot = values, last

    def update(self, series: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64],
               value: npt.NDArray[np.float64]) -> None:
        """Put samples into their slots; slots older than the ring are dropped, skipped slots become NaN."""
        if series.shape[0] == 0:
            return
        self._grow(int(series.max()) + 1)
        r = self.ring_size
        slot = ts_ns // self.interval_ns
        order = np.lexsort((ts_ns, series))  # by series, then time: the last write of a slot is its latest sample
        series, slot, value = series[order], slot[order], value[order]
        uniq, first = np.unique(series, return_index=True)
        newest = np.maximum.reduceat(slot, first)
        old = self.last_slot[uniq]
        fresh = old == _NONE
        if fresh.any():  # a new row starts all NaN
            self.values[uniq[fresh]] = np.nan
        old = np.where(fresh, newest, old)
        last = np.maximum(old, newest)
        advance = np.minimum(last - old, r)
        if advance.sum():  # NaN the slots the ring moves over, (old, last], at most one turn
            rows = np.repeat(uniq, advance)
            starts = np.repeat(last - advance + 1, advance)
            offs = np.arange(rows.shape[0]) - np.repeat(np.cumsum(advance) - advance, advance)
            self.values[rows, (starts + offs) % r] = np.nan
        self.last_slot[uniq] = last
        keep = slot > self.last_slot[series] - r
        self.values[series[keep], slot[keep] % r] = value[keep]

    def read(self, sid: int) -> tuple[list[float], list[float]]:
        """(slot start times in seconds since the epoch, values) of one series, oldest first; empty if unknown."""
        if sid >= self.last_slot.shape[0] or self.last_slot[sid] == _NONE:
            return [], []
        last = int(self.last_slot[sid])
        slots = np.arange(last - self.ring_size + 1, last + 1)
        vals = self.values[sid, slots % self.ring_size]
        return (slots * (self.interval_ns / 1e9)).tolist(), [float(v) for v in vals.tolist()]


@dataclass(frozen=True, slots=True)
class StateChange:
    ts: float  # seconds since the epoch
    state: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class AnomalyMark:
    ts: float
    metric: str
    detector: str
    value: float
    score: float


@dataclass(frozen=True, slots=True)
class OeeMark:
    """One closed OEE window as the page shows it: the fields of :class:`~gateway.oee.OeeRecord` it reads."""

    window: str
    shift: str | None
    start_ns: int
    end_ns: int
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None
    total_count: int
    good_count: int
    run_s: float
    down_s: float


class MachineRings:
    """Per machine (by index), a ring of its last ``bound`` rows of a few typed columns; the oldest goes.

    One array per column for all machines, rows = slots, columns = machines: a row costs its fields' bytes
    and no Python object (an ``OeeRecord`` in a list ~500 B). Slots are added as the deepest ring fills.
    Machines are added an eighth at a time: spare machines sit in every slot's row, and numpy backs large
    arrays with 2 MB huge pages, so their memory is mapped as soon as their neighbours' is.

    >>> rings = MachineRings(3, {"t": np.float64, "code": np.uint8})
    >>> rings.push(np.array([1, 0, 1, 1, 1]), {"t": [1.0, 2.0, 3.0, 4.0, 5.0], "code": [7, 8, 9, 10, 11]})
    >>> rings.rows(1)
    {'t': [3.0, 4.0, 5.0], 'code': [9, 10, 11]}
    >>> rings.push(np.array([1]), {"t": [6.0], "code": [12]})
    >>> rings.rows(1), rings.rows(0), rings.rows(7)
    ({'t': [4.0, 5.0, 6.0], 'code': [10, 11, 12]}, {'t': [2.0], 'code': [8]}, {'t': [], 'code': []})
    """

    def __init__(self, bound: int, columns: Mapping[str, npt.DTypeLike], *, capacity: int = 64) -> None:
        if bound < 1:
            raise ValueError("bound must be >= 1")
        self.bound = bound
        self.pushed = np.zeros(capacity, np.int64)  # rows ever pushed, per machine
        self.columns = {name: np.empty((0, capacity), dt) for name, dt in columns.items()}
        self._shape = (0, capacity)
        self._used = 0  # machines 0 .. _used - 1 may hold rows: the rest of a row is never written

    @property
    def nbytes(self) -> int:
        return int(self.pushed.nbytes + sum(c.nbytes for c in self.columns.values()))

    def lengths(self) -> npt.NDArray[np.int64]:
        """Rows held, per machine index (up to the capacity)."""
        return np.minimum(self.pushed, self.bound)

    def _grow(self, slots: int, machines: int) -> None:
        rows, cap = self._shape
        new_rows = rows if slots <= rows else min(self.bound, max(slots, 2 * rows))
        new_cap = cap if machines <= cap else max(machines, cap + cap // 8)
        if (new_rows, new_cap) == (rows, cap):
            return
        if new_cap > cap:
            pushed = np.zeros(new_cap, np.int64)
            pushed[:cap] = self.pushed
            self.pushed = pushed
        used = min(cap, self._used)
        for name, col in self.columns.items():
            grown = np.empty((new_rows, new_cap), col.dtype)
            grown[:rows, :used] = col[:, :used]  # not the spare machines, never written
            self.columns[name] = grown
        self._shape = (new_rows, new_cap)

    def push(self, owners: npt.NDArray[np.int64], values: Mapping[str, npt.ArrayLike]) -> None:
        """Append rows in order to their machines' rings; ``values``: per column, one value per owner."""
        n = owners.shape[0]
        if n == 0:
            return
        order = np.argsort(owners, kind="stable")  # by machine, then in push order
        o = owners[order]
        self._grow(0, int(o[-1]) + 1)
        self._used = max(self._used, int(o[-1]) + 1)
        uniq, first, count = np.unique(o, return_index=True, return_counts=True)
        pos = self.pushed[o] + (np.arange(n) - np.repeat(first, count))  # each row's number in its ring
        self.pushed[uniq] += count
        self._grow(min(self.bound, int(self.pushed[uniq].max())), 0)
        keep = pos >= self.pushed[o] - self.bound  # more rows than the ring holds: the oldest never land
        o, slot, order = o[keep], pos[keep] % self.bound, order[keep]
        for name, col in self.columns.items():
            col[slot, o] = np.asarray(values[name], col.dtype)[order]

    def rows(self, owner: int) -> dict[str, list[Any]]:
        """One machine's rows, oldest first: column -> values."""
        n = int(self.pushed[owner]) if owner < self.pushed.shape[0] else 0
        k = min(n, self.bound)
        slots = np.arange(n - k, n) % self.bound
        return {name: col[slots, owner].tolist() if k else [] for name, col in self.columns.items()}

    def newest(self, machines: int) -> tuple[list[int], dict[str, list[Any]]]:
        """The machines among ``0 .. machines - 1`` that hold a row, and per column their newest rows."""
        idx = np.flatnonzero(self.pushed[:machines] > 0)
        slot = (self.pushed[idx] - 1) % self.bound
        return idx.tolist(), {name: col[slot, idx].tolist() for name, col in self.columns.items()}


class _Codes(Generic[_K]):
    """Small codes for the few distinct values of a column (metric names, detectors, window labels)."""

    __slots__ = ("_code", "values")

    def __init__(self) -> None:
        self.values: list[_K] = []
        self._code: dict[_K, int] = {}

    def code(self, value: _K) -> int:
        c = self._code.get(value)
        if c is None:
            c = self._code[value] = len(self.values)
            self.values.append(value)
        return c


_STATES: _Codes[str] = _Codes()  # state name by code, shared by every ring (the machine states: a handful)


class StateRing:
    """A machine's last state changes, oldest first, iterated as :class:`StateChange`: a float and a byte
    each (and the reason, only once some change had one), not an object of ~80 bytes per change.

    >>> ring = StateRing()
    >>> for t, st in [(1.5, "RUNNING"), (2.0, "DOWN"), (3.0, "IDLE")]:
    ...     ring.push(t, st, "jam" if st == "DOWN" else None, bound=2)
    >>> list(ring)
    [StateChange(ts=2.0, state='DOWN', reason='jam'), StateChange(ts=3.0, state='IDLE', reason=None)]
    """

    __slots__ = ("_code", "_reasons", "_ts")

    def __init__(self) -> None:
        self._ts = array("d")
        self._code = bytearray()
        self._reasons: list[str | None] | None = None

    def push(self, ts: float, state: str, reason: str | None, bound: int) -> None:
        self._ts.append(ts)
        self._code.append(_STATES.code(state))
        if reason is not None and self._reasons is None:
            self._reasons = [None] * (len(self._ts) - 1)
        if self._reasons is not None:
            self._reasons.append(reason)
        if len(self._ts) > bound:
            del self._ts[0]
            del self._code[0]
            if self._reasons is not None:
                del self._reasons[0]

    def __len__(self) -> int:
        return len(self._ts)

    def __iter__(self) -> Iterator[StateChange]:
        reasons = self._reasons if self._reasons is not None else [None] * len(self._ts)
        for t, c, why in zip(self._ts, self._code, reasons, strict=True):
            yield StateChange(t, _STATES.values[c], why)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _none(x: float) -> float | None:
    return None if math.isnan(x) else x  # a ratio is never NaN (its denominator is > 0): NaN is None


# a ratio that is None is stored as NaN
_OEE_COLUMNS: dict[str, npt.DTypeLike] = {
    "label": np.uint16, "start_ns": np.int64, "end_ns": np.int64, "availability": np.float64,
    "performance": np.float64, "quality": np.float64, "oee": np.float64, "total_count": np.int64,
    "good_count": np.int64, "run_s": np.float64, "down_s": np.float64,
}
_ANOMALY_COLUMNS: dict[str, npt.DTypeLike] = {
    "ts": np.float64, "metric": np.int32, "detector": np.uint8, "value": np.float64, "score": np.float64,
}


@dataclass(slots=True)
class MachineView:
    key: MachineKey
    index: int  # its column in the plant's OEE-history and anomaly rings
    state: str | None = None
    state_since: float | None = None
    online: bool | None = None  # Sparkplug birth/death; None when the source never says
    last_message: float | None = None
    oee: dict[str, OeeRecord] = field(default_factory=dict)  # latest record per window label
    oee_open: Sequence[OeeRecord] = ()  # the open shift windows so far (partial)
    states: StateRing = field(default_factory=StateRing)  # the last ``events`` changes


class PlantView:
    """What the page shows, updated once per flushed batch by :meth:`observe` (no I/O, no locks).

    Per machine, its last ``events`` closed OEE windows and anomalies are in :class:`MachineRings` (read
    with :meth:`oee_history` and :meth:`anomalies`), its last ``events`` state changes in its StateRing.
    """

    def __init__(self, registry: SeriesRegistry, *, ring_size: int = 120, ring_interval_s: float = 30.0,
                 events: int = 100) -> None:
        self.registry = registry
        self.rings = SeriesRings(ring_size, ring_interval_s)
        self.events = events
        self.machines: dict[MachineKey, MachineView] = {}
        self.oee_rings = MachineRings(events, _OEE_COLUMNS)
        self.anomaly_rings = MachineRings(events, _ANOMALY_COLUMNS)
        self._labels: _Codes[tuple[str, str | None]] = _Codes()  # (window, shift)
        self._metrics: _Codes[str] = _Codes()  # by name, not series id: a registry restore renumbers series
        self._detectors: _Codes[str] = _Codes()

    def machine(self, key: MachineKey) -> MachineView:
        m = self.machines.get(key)
        if m is None:
            m = self.machines[key] = MachineView(key, len(self.machines))
        return m

    def _seen(self, key: MachineKey, ts_ns: int) -> None:
        m = self.machine(key)
        t = ts_ns / 1e9
        if m.last_message is None or t > m.last_message:
            m.last_message = t

    def observe(self, batch: DecodedBatch, anomalies: list[AnomalyEvents], oee: list[OeeRecord]) -> None:
        """One batch after compute: its telemetry, states, counts, statuses, kept anomalies, closed OEE windows."""
        reg = self.registry
        tel = batch.telemetry
        n = batch.detect_rows
        if n:
            series, ts = tel.series[:n], tel.ts_ns[:n]
            self.rings.update(series, ts, tel.value[:n])
            mids, inverse = np.unique(reg.series_machine_ids()[series], return_inverse=True)
            newest = np.full(len(mids), _NONE, np.int64)
            np.maximum.at(newest, inverse, ts)
            machines = reg.machine_list
            for mid, newest_ns in zip(mids.tolist(), newest.tolist(), strict=True):
                self._seen(machines[mid], newest_ns)
        for st in sorted(batch.states, key=lambda e: e.ts_ns):
            m = self.machine(st.machine)
            self._seen(st.machine, st.ts_ns)
            t = st.ts_ns / 1e9
            if m.state_since is not None and t < m.state_since:
                continue  # late: the current state is newer
            if m.state != st.state.value:
                m.state, m.state_since = st.state.value, t
                m.states.push(t, st.state.value, st.reason, self.events)
        for c in batch.counts:
            self._seen(c.machine, c.ts_ns)
        for s in batch.statuses:
            self.machine(s.machine).online = s.online
        for ev in anomalies:
            if not len(ev):
                continue
            sids = ev.series.tolist()
            self.anomaly_rings.push(np.array([self.machine(reg.machines[sid]).index for sid in sids], np.int64), {
                "ts": [t / 1e9 for t in ev.ts_ns.tolist()],
                "metric": [self._metrics.code(reg.metrics[sid]) for sid in sids],
                "detector": [self._detectors.code(d) for d in ev.detector],
                "value": ev.value, "score": ev.score,
            })
        for r in oee:
            self.machine(r.machine).oee[r.window] = r
        if oee:
            self.oee_rings.push(np.array([self.machine(r.machine).index for r in oee], np.int64), {
                "label": [self._labels.code((r.window, r.shift)) for r in oee],
                "start_ns": [r.start_ns for r in oee], "end_ns": [r.end_ns for r in oee],
                "availability": [_nan(r.availability) for r in oee],
                "performance": [_nan(r.performance) for r in oee],
                "quality": [_nan(r.quality) for r in oee], "oee": [_nan(r.oee) for r in oee],
                "total_count": [r.total_count for r in oee], "good_count": [r.good_count for r in oee],
                "run_s": [r.run_s for r in oee], "down_s": [r.down_s for r in oee],
            })

    def observe_open(self, machine: MachineKey, records: list[OeeRecord]) -> None:
        """A machine's open shift windows so far (after events moved them, or a window closed)."""
        self.machine(machine).oee_open = records

    def oee_history(self, m: MachineView) -> list[OeeMark]:
        """The machine's last ``events`` closed OEE windows, oldest first."""
        c = self.oee_rings.rows(m.index)
        labels = self._labels.values
        return [OeeMark(labels[lab][0], labels[lab][1], start, end, _none(a), _none(p), _none(q), _none(o), total,
                        good, run, down)
                for lab, start, end, a, p, q, o, total, good, run, down in zip(
                    c["label"], c["start_ns"], c["end_ns"], c["availability"], c["performance"], c["quality"],
                    c["oee"], c["total_count"], c["good_count"], c["run_s"], c["down_s"], strict=True)]

    def anomalies(self, m: MachineView) -> list[AnomalyMark]:
        """The machine's last ``events`` anomalies, oldest first."""
        c = self.anomaly_rings.rows(m.index)
        metrics, detectors = self._metrics.values, self._detectors.values
        return [AnomalyMark(t, metrics[k], detectors[d], v, s)
                for t, k, d, v, s in zip(c["ts"], c["metric"], c["detector"], c["value"], c["score"], strict=True)]

    def last_anomalies(self) -> list[AnomalyMark | None]:
        """Every machine's last anomaly (None: none yet), by machine index."""
        out: list[AnomalyMark | None] = [None] * len(self.machines)
        idx, c = self.anomaly_rings.newest(len(self.machines))
        metrics, detectors = self._metrics.values, self._detectors.values
        for i, t, k, d, v, s in zip(idx, c["ts"], c["metric"], c["detector"], c["value"], c["score"], strict=True):
            out[i] = AnomalyMark(t, metrics[k], detectors[d], v, s)
        return out

    def anomalies_within(self, now: float, span_s: float) -> list[int]:
        """Per machine index, how many of its anomalies have ``now - ts <= span_s``."""
        ring = self.anomaly_rings
        held = ring.lengths()
        ts = ring.columns["ts"]
        counts = np.zeros(held.shape[0], np.int64)
        for slot in range(ts.shape[0]):  # a slot at a time: no temporary of every slot x machine
            counts += (now - ts[slot] <= span_s) & (slot < held)
        out: list[int] = counts[: len(self.machines)].tolist()
        return out + [0] * (len(self.machines) - len(out))

    def series_of(self, key: MachineKey) -> dict[str, tuple[list[float], list[float | None]]]:
        """Every metric ring of one machine: metric -> (times, values with None for empty slots)."""
        out: dict[str, tuple[list[float], list[float | None]]] = {}
        for metric in sorted(set(self.registry.metrics)):
            sid = self.registry.lookup(key, metric)
            if sid is not None:
                times, values = self.rings.read(sid)
                if times:
                    out[metric] = (times, [v if not math.isnan(v) else None for v in values])
        return out
