"""OEE (ISO 22400) per machine, in event time, over tumbling windows and a shift calendar.

The engine follows each machine's state and cumulative counters and closes one :class:`OeeRecord` per
machine and window. Everything is driven by the events' own timestamps (``ts_ns``), so replaying a
recorded day yields the same records as living through it; the only wall-clock input is the idle close.

Definitions (ISO 22400-2; one window of one machine)
----------------------------------------------------
* A state holds from its message until the machine's next state message. Time before a machine's
  first state message is unknown and is counted nowhere.
* planned busy time = known time except ``PLANNED_STOP``; run time = ``RUNNING``; down time = ``DOWN``
  (``IDLE`` and ``SETUP`` are planned but not running, so they too lower availability).
* availability = run / planned; performance = ideal_cycle_s × total / run (not capped at 1);
  quality = good / total; OEE = ideal_cycle_s × good / planned, which equals A × P × Q whenever all three
  are defined and stays defined (0) when a machine ran but produced nothing.
* failures = transitions from a known non-``DOWN`` state into ``DOWN``, counted in the window that holds
  the first second of that ``DOWN`` (a repeated ``DOWN`` message is not a new failure; a machine whose
  first message is ``DOWN`` failed at an unknown time and does not count). MTBF = run / failures,
  MTTR = down / failures; both are None when the window holds no failure.
* throughput_per_h = total / planned hours.
* A ratio whose denominator is zero is None.

Counters and windows
--------------------
* Counters are cumulative since device start: a machine's first count message sets the baseline (delta
  0); a later decrease of ``total`` or ``good`` means the device restarted its counters, and the new
  values are themselves the delta. A count message reports production up to its timestamp, so it belongs
  to the window with ``start < ts <= end`` (a count sent exactly at 14:00 belongs to the shift ending at
  14:00).
* Windows are half-open ``[start, end)``: tumbling windows aligned to the UTC epoch, and shift windows
  from the local start to the local end of each day (crossing midnight when ``end <= start``, so
  ``"00:00"``–``"00:00"`` is a local calendar day; a DST change makes a shift an hour shorter or longer).
* A window closes when the machine's event time *passes* its end (any later state or count message), or
  when the wall clock says its end passed ``idle_close_s`` ago and the machine stayed silent:
  ``now - last_arrival >= (end - last_event_ts) + idle_close_s``; the current state is then extended to
  the window's end (so a machine that reports only state changes still gets its windows, each
  ``idle_close_s`` late). A window without planned time and without production (unknown time or
  ``PLANNED_STOP`` only) emits nothing, so idle machines cost nothing downstream.
* Repeats: a state message older than the machine's last state message (or as old and with the same
  state), and a count message older than its last count message (or as old with the same counters), is
  a repeat — a broker redelivery after a crash, or a device resending — and is dropped whole
  (``repeated_events``), so no redelivery moves a baseline or a state twice.
* Late events: an event is late when it falls into time already accounted for some window (a state
  older than the last count, or a count whose window has closed). Its contribution to the closed window
  is dropped and ``late_events`` is incremented; it still counts where its window is open, a late state
  still becomes the current state from then on, and a late count still moves the baseline.
* :meth:`OeeEngine.flush` ends the stream: it emits every open window as a *partial* record whose
  ``end_ns`` is the last accounted event time (``end_ns`` < the nominal end marks it partial) and
  forgets all machines.

>>> from gateway.batch import CountEvent, MachineKey, StateEvent
>>> from gateway.schema import MachineState
>>> press = MachineKey("plant1", "assembly", "line1", "press1")
>>> engine = OeeEngine(OeeConfig(windows=["1h"]), {"press1": MachineConfig(ideal_cycle_s=2.0)})
>>> H = 3_600_000_000_000
>>> states = [StateEvent(press, 0, MachineState.RUNNING),
...           StateEvent(press, H // 2, MachineState.DOWN),
...           StateEvent(press, H * 3 // 4, MachineState.RUNNING)]
>>> counts = [CountEvent(press, 0, 100, 100), CountEvent(press, H, 1000, 980)]
>>> engine.update(states, counts, now_wall_ns=0)
[]
>>> (rec,) = engine.update([StateEvent(press, H + 1, MachineState.IDLE)], [], now_wall_ns=0)
>>> rec.window, rec.run_s, rec.down_s, rec.total_count, rec.good_count
('1h', 2700.0, 900.0, 900, 880)
>>> round(rec.availability, 4), round(rec.performance, 4), round(rec.quality, 4), round(rec.oee, 4)
(0.75, 0.6667, 0.9778, 0.4889)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from operator import attrgetter
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.batch import CountEvent, MachineKey, StateEvent
from gateway.checkpoint import State
from gateway.schema import MachineState

log = logging.getLogger("gateway.oee")

__all__ = [
    "MachineConfig",
    "OeeConfig",
    "OeeEngine",
    "OeeRecord",
    "ShiftConfig",
    "parse_duration_ns",
]

NS_PER_S = 1_000_000_000
_UNIT_NS = {"s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S, "d": 86_400 * NS_PER_S}
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_NEVER = int(np.iinfo(np.int64).max)
_LONG_AGO = -(2**62)

_RUNNING = MachineState.RUNNING
_DOWN = MachineState.DOWN
_PLANNED_STOP = MachineState.PLANNED_STOP
_STATES = list(MachineState)
# one saved track: cursor, gap_until, closed_end, pending_failure, has_window, then the window's fields
_TRACK_FIELDS = 5 + 9


def parse_duration_ns(text: str) -> int:
    """Parse a window length such as ``"30s"``, ``"15m"``, ``"8h"`` or ``"1d"`` into nanoseconds.

    >>> parse_duration_ns("15m")
    900000000000
    """
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(
            f"bad duration {text!r}: expected a whole number and a unit s, m, h or d, e.g. '30s', '15m', '8h'"
        )
    n = int(m.group(1))
    if n == 0:
        raise ValueError(f"bad duration {text!r}: must be longer than zero")
    return n * _UNIT_NS[m.group(2)]


def _parse_hhmm(text: str) -> time:
    m = _HHMM.match(text)
    if m is None:
        raise ValueError(f"bad time of day {text!r}: expected 24-hour 'HH:MM', e.g. '06:00' or '22:30'")
    return time(int(m.group(1)), int(m.group(2)))


class ShiftConfig(BaseModel):
    """One shift of the calendar: ``{name = "early", start = "06:00", end = "14:00"}`` in local time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        _parse_hhmm(v)
        return v

    @property
    def start_time(self) -> time:
        return _parse_hhmm(self.start)

    @property
    def end_time(self) -> time:
        return _parse_hhmm(self.end)


class OeeConfig(BaseModel):
    """The ``[oee]`` section.

    >>> OeeConfig(windows=["1m", "1h"], timezone="Europe/Berlin").idle_close_s
    120.0
    >>> OeeConfig(windows=["90x"])
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for OeeConfig
    windows
      Value error, bad duration '90x': expected a whole number and a unit s, m, h or d, ...
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    windows: list[str] = Field(default_factory=lambda: ["1m", "1h"])
    shifts: list[ShiftConfig] = Field(default_factory=list)
    timezone: str = "UTC"
    default_ideal_cycle_s: float = Field(default=1.0, gt=0)
    idle_close_s: float = Field(default=120.0, gt=0)

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        seen: dict[int, str] = {}
        for text in v:
            ns = parse_duration_ns(text)
            if ns in seen:
                raise ValueError(f"windows {seen[ns]!r} and {text!r} have the same length")
            seen[ns] = text
        return [text.strip() for text in v]

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown timezone {v!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'"
            ) from exc
        return v

    @model_validator(mode="after")
    def _unique_shifts(self) -> OeeConfig:
        names = [s.name for s in self.shifts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"shifts: names must be unique, repeated: {', '.join(dupes)}")
        return self


class MachineConfig(BaseModel):
    """One ``[machines."<machine>"]`` entry, keyed by the machine segment of the topic.

    ``ideal_cycle_s`` None falls back to ``[oee] default_ideal_cycle_s``; ``vibration_class`` None falls
    back to ``[features] default_vibration_class``.

    >>> MachineConfig(ideal_cycle_s=1.5, vibration_class="III").vibration_class
    'III'
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ideal_cycle_s: float | None = Field(default=None, gt=0)
    vibration_class: Literal["I", "II", "III", "IV"] | None = None


@dataclass(frozen=True, slots=True)
class OeeRecord:
    """One closed window of one machine; measurement ``oee``, timestamp = ``start_ns``."""

    machine: MachineKey
    window: str
    shift: str | None
    start_ns: int
    end_ns: int
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None
    planned_s: float
    run_s: float
    down_s: float
    total_count: int
    good_count: int
    mtbf_s: float | None
    mttr_s: float | None
    throughput_per_h: float | None


# --- window calendars -------------------------------------------------------------------------------


class _Tumbling:
    __slots__ = ("_last", "label", "length_ns")

    shift: str | None = None

    def __init__(self, label: str, length_ns: int) -> None:
        self.label = label
        self.length_ns = length_ns
        self._last = (0, length_ns)

    def window_from(self, t: int) -> tuple[int, int]:
        """The earliest window whose end is after ``t`` (the same tuple as the last call's when it is the
        same window: every machine's open window shares its bounds' int objects)."""
        start = t - t % self.length_ns
        if start != self._last[0]:
            self._last = (start, start + self.length_ns)
        return self._last


class _Shift:
    __slots__ = ("_cache", "_end", "_last", "_start", "_tz", "_valid_from", "shift")

    label = "shift"

    def __init__(self, shift: ShiftConfig, tz: ZoneInfo) -> None:
        self.shift: str | None = shift.name
        self._start = shift.start_time
        self._end = shift.end_time
        self._tz = tz
        self._cache: dict[date, tuple[int, int]] = {}
        self._last = (0, 0)
        self._valid_from = 0

    def _occurrence(self, day: date) -> tuple[int, int]:
        hit = self._cache.get(day)
        if hit is None:
            start = datetime.combine(day, self._start, self._tz)
            end_day = day if self._end > self._start else day + timedelta(days=1)
            end = datetime.combine(end_day, self._end, self._tz)
            hit = (int(start.timestamp()) * NS_PER_S, int(end.timestamp()) * NS_PER_S)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[day] = hit
        return hit

    def window_from(self, t: int) -> tuple[int, int]:
        """The earliest occurrence whose end is after ``t`` (it may start after ``t``)."""
        if self._valid_from <= t < self._last[1]:  # one answer serves [previous end, this end)
            return self._last
        day = datetime.fromtimestamp(t // NS_PER_S, self._tz).date()
        previous = self._occurrence(day - timedelta(days=2))
        for d in (day - timedelta(days=1), day, day + timedelta(days=1), day + timedelta(days=2)):
            occ = self._occurrence(d)
            if occ[1] > t:
                self._last, self._valid_from = occ, previous[1]
                return occ
            previous = occ
        raise AssertionError("unreachable: a shift lasts at most 25 hours")  # pragma: no cover


_Calendar = _Tumbling | _Shift


# --- per-machine state ------------------------------------------------------------------------------


class _Window:
    """Accumulators of one open window (all durations in ns)."""

    __slots__ = ("down", "end", "failures", "good", "known", "run", "start", "stopped", "total")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.known = 0
        self.stopped = 0
        self.run = 0
        self.down = 0
        self.failures = 0
        self.total = 0
        self.good = 0


class _Track:
    """One machine × one calendar: the open window and how far time has been accounted."""

    __slots__ = ("acc", "closed_end", "cursor", "gap_until", "pending_failure")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.gap_until = _LONG_AGO  # while acc is None and cursor < t <= gap_until, t opens no window
        self.acc: _Window | None = None
        self.closed_end = _LONG_AGO
        self.pending_failure = False


class _Machine:
    __slots__ = ("clock", "count_ns", "ideal", "index", "key", "last_good", "last_total", "last_wall", "state",
                 "state_ns", "tracks")

    def __init__(self, key: MachineKey, index: int, ideal: float, t: int, n_tracks: int) -> None:
        self.key = key
        self.index = index
        self.ideal = ideal
        self.state: MachineState | None = None
        self.clock = t
        self.last_total = -1
        self.last_good = -1
        self.last_wall = 0
        self.state_ns = _LONG_AGO  # time of the last state message taken (repeats are older)
        self.count_ns = _LONG_AGO  # time of the last count message taken
        self.tracks = [_Track(t) for _ in range(n_tracks)]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class OeeEngine:
    """Per-machine OEE over tumbling windows and shifts, in event time.

    Parameters
    ----------
    config
        The ``[oee]`` section.
    machines
        ``[machines."<name>"]`` entries keyed by the machine segment of the topic (for ``ideal_cycle_s``).

    Attributes
    ----------
    late_events
        Events dropped from at least one window because that window had already closed.

    Examples
    --------
    A press runs 45 of 60 minutes at an ideal 1 s cycle and makes 2400 parts, 2376 good:

    >>> from gateway.batch import CountEvent, MachineKey, StateEvent
    >>> from gateway.schema import MachineState
    >>> m = MachineKey("plant1", "assembly", "line1", "press1")
    >>> eng = OeeEngine(OeeConfig(windows=["1h"]), {})
    >>> MIN = 60 * 1_000_000_000
    >>> out = eng.update([StateEvent(m, 0, MachineState.RUNNING), StateEvent(m, 45 * MIN, MachineState.DOWN)],
    ...                  [CountEvent(m, 0, 0, 0), CountEvent(m, 60 * MIN, 2400, 2376)], now_wall_ns=0)
    >>> (rec,) = eng.update([StateEvent(m, 61 * MIN, MachineState.RUNNING)], [], now_wall_ns=0)
    >>> rec.availability, rec.performance, rec.quality, round(rec.oee, 2), rec.mttr_s
    (0.75, 0.8888888888888888, 0.99, 0.66, 900.0)
    """

    def __init__(self, config: OeeConfig, machines: Mapping[str, MachineConfig]) -> None:
        self.config = config
        self._machine_cfg = machines
        tz = ZoneInfo(config.timezone)
        calendars: list[_Calendar] = [_Tumbling(w, parse_duration_ns(w)) for w in config.windows]
        calendars.extend(_Shift(s, tz) for s in config.shifts)
        self._calendars = calendars
        self._idle_ns = round(config.idle_close_s * NS_PER_S)
        self._machines: dict[MachineKey, _Machine] = {}
        self._by_index: list[_Machine] = []
        self._deadline: npt.NDArray[np.int64] = np.full(1024, _NEVER, dtype=np.int64)
        self.late_events = 0
        self.repeated_events = 0
        self.idle_closes = 0  # windows the idle timeout closed (emitted or not): wall-clock state changes

    @property
    def machine_count(self) -> int:
        return len(self._by_index)

    def snapshot(self) -> State:
        """Every machine's state, counter baselines and open windows (see :mod:`gateway.checkpoint`)."""
        ms = self._by_index
        head = np.empty((len(ms), 8), np.int64)
        tracks = np.zeros((len(ms), len(self._calendars), _TRACK_FIELDS), np.int64)
        for i, m in enumerate(ms):
            head[i] = (-1 if m.state is None else _STATES.index(m.state), m.clock, m.last_total, m.last_good,
                       m.last_wall, m.state_ns, m.count_ns, 0)
            for j, tr in enumerate(m.tracks):
                row = tracks[i, j]
                row[:5] = (tr.cursor, tr.gap_until, tr.closed_end, tr.pending_failure, tr.acc is not None)
                a = tr.acc
                if a is not None:
                    row[5:] = (a.start, a.end, a.known, a.stopped, a.run, a.down, a.failures, a.total, a.good)
        keys = [[m.key.site, m.key.area, m.key.line, m.key.machine] for m in ms]
        return State({"machines": keys, "late_events": self.late_events, "repeated_events": self.repeated_events,
                      "idle_closes": self.idle_closes}, {"machine": head, "track": tracks})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot` taken with the same settings."""
        keys = [MachineKey(*k) for k in state.meta["machines"]]
        head = state.array("machine")
        tracks = state.array("track")
        n_cal = len(self._calendars)
        if head.shape != (len(keys), 8) or tracks.shape != (len(keys), n_cal, _TRACK_FIELDS):
            raise ValueError(f"OEE state arrays {head.shape} / {tracks.shape} do not fit {len(keys)} machines "
                             f"x {n_cal} windows")
        self._machines.clear()
        self._by_index.clear()
        self._deadline.fill(_NEVER)
        for key, h, trs in zip(keys, head.tolist(), tracks.tolist(), strict=True):
            m = self._add_machine(key, 0)
            m.state = None if h[0] < 0 else _STATES[h[0]]
            m.clock, m.last_total, m.last_good, m.last_wall, m.state_ns, m.count_ns = h[1:7]
            for tr, row in zip(m.tracks, trs, strict=True):
                tr.cursor, tr.gap_until, tr.closed_end = row[:3]
                tr.pending_failure = bool(row[3])
                if row[4]:
                    a = tr.acc = _Window(row[5], row[6])
                    a.known, a.stopped, a.run, a.down, a.failures, a.total, a.good = row[7:]
        for m in self._by_index:
            self._deadline[m.index] = self._next_deadline(m)
        self.late_events = int(state.meta["late_events"])
        self.repeated_events = int(state.meta["repeated_events"])
        self.idle_closes = int(state.meta["idle_closes"])

    def update(
        self, states: Sequence[StateEvent], counts: Sequence[CountEvent], now_wall_ns: int,
        arrival: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> list[OeeRecord]:
        """Apply a batch of events; return the windows they (or the idle timeout) closed.

        ``arrival``: the messages before each state and each count; events are then taken in arrival order
        (an older one than its machine's last is a repeat, as across batches), so where batches are cut
        does not matter. Without it, events may interleave machines but must be in event-time order per
        machine (states and counts are merged by ``ts_ns``; at equal timestamps their order does not matter).
        """
        out: list[OeeRecord] = []
        touched: dict[int, _Machine] = {}
        events: list[StateEvent | CountEvent] = [*counts, *states]
        if arrival is not None and len(arrival[0]) == len(states) and len(arrival[1]) == len(counts):
            # by message; within one message (never split between batches) counts, then states
            seq = [*arrival[1], *arrival[0]]
            events = [events[i] for i in sorted(range(len(events)), key=seq.__getitem__)]
        else:
            events.sort(key=attrgetter("ts_ns"))
        for ev in events:
            m = self._machines.get(ev.machine)
            if m is None:
                m = self._add_machine(ev.machine, ev.ts_ns)
            t = ev.ts_ns
            if isinstance(ev, StateEvent):
                if t < m.state_ns or (t == m.state_ns and ev.state is m.state):
                    self.repeated_events += 1
                    continue
                m.state_ns = t
                touched[m.index] = m
                self._on_state(m, ev, out)
            else:
                if t < m.count_ns or (t == m.count_ns and (ev.total, ev.good) == (m.last_total, m.last_good)):
                    self.repeated_events += 1
                    continue
                m.count_ns = t
                touched[m.index] = m
                self._on_count(m, ev, out)
        for m in touched.values():
            m.last_wall = now_wall_ns
            self._deadline[m.index] = self._next_deadline(m)
        n = len(self._by_index)
        if n:
            for i in np.flatnonzero(self._deadline[:n] <= now_wall_ns).tolist():
                m = self._by_index[i]
                self.idle_closes += 1
                self._idle_close(m, now_wall_ns, out)
                self._deadline[i] = self._next_deadline(m)
        return out

    def open_records(self, machine: MachineKey) -> list[OeeRecord]:
        """The machine's open windows so far, as partial records (``end_ns`` = last accounted time).

        Nothing is closed or forgotten: what the operator's page shows as "this shift so far".
        """
        m = self._machines.get(machine)
        out: list[OeeRecord] = []
        if m is not None:
            for cal, tr in zip(self._calendars, m.tracks, strict=True):
                acc = tr.acc
                if acc is not None:
                    self._emit(m, cal, acc, min(tr.cursor, acc.end), out)
        return out

    def flush(self) -> list[OeeRecord]:
        """Emit every open window as a partial record ending at its last accounted time; forget all."""
        out = [r for m in self._by_index for r in self.open_records(m.key)]
        self._machines.clear()
        self._by_index.clear()
        self._deadline.fill(_NEVER)
        return out

    def reconfigure(self, config: OeeConfig, machines: Mapping[str, MachineConfig]) -> list[OeeRecord]:
        """Apply new settings to the running engine (config reload); return the windows this closes.

        Windows and shifts that are in both settings keep their open windows. A removed one emits its
        open window as a partial record; an added one starts accounting now, so its first window is
        partial. New ideal cycle times apply to every window still open (they are used when a window
        closes).
        """
        def key(cal: _Calendar) -> tuple[object, ...]:
            if isinstance(cal, _Shift):
                return ("shift", cal.shift, cal._start, cal._end, str(cal._tz))
            return ("window", cal.label, cal.length_ns)

        fresh = OeeEngine(config, machines)
        old_at = {key(c): i for i, c in enumerate(self._calendars)}
        carry = [old_at.get(key(c)) for c in fresh._calendars]
        kept = {i for i in carry if i is not None}
        out: list[OeeRecord] = []
        for m in self._by_index:
            for i, (cal, tr) in enumerate(zip(self._calendars, m.tracks, strict=True)):
                if i not in kept and tr.acc is not None:
                    self._emit(m, cal, tr.acc, min(tr.cursor, tr.acc.end), out)
            m.tracks = [m.tracks[i] if i is not None else _Track(m.clock) for i in carry]
            m.ideal = fresh._ideal(m.key)
        self.config = config
        self._machine_cfg = machines
        self._calendars = [
            c if i is None else self._calendars[i] for i, c in zip(carry, fresh._calendars, strict=True)
        ]
        self._idle_ns = fresh._idle_ns
        for m in self._by_index:
            self._deadline[m.index] = self._next_deadline(m)
        return out

    # --- internals ----------------------------------------------------------------------------------

    def _ideal(self, key: MachineKey) -> float:
        cfg = self._machine_cfg.get(key.machine)
        if cfg is not None and cfg.ideal_cycle_s is not None:
            return cfg.ideal_cycle_s
        return self.config.default_ideal_cycle_s

    def _add_machine(self, key: MachineKey, t: int) -> _Machine:
        m = _Machine(key, len(self._by_index), self._ideal(key), t, len(self._calendars))
        self._machines[key] = m
        self._by_index.append(m)
        if m.index >= self._deadline.shape[0]:
            grown = np.full(self._deadline.shape[0] * 2, _NEVER, dtype=np.int64)
            grown[: self._deadline.shape[0]] = self._deadline
            self._deadline = grown
        return m

    def _on_state(self, m: _Machine, ev: StateEvent, out: list[OeeRecord]) -> None:
        t = ev.ts_ns
        for tr in m.tracks:
            if tr.cursor > t:
                self.late_events += 1
                break
        if t > m.clock:
            m.clock = t
        self._advance(m, t, out)
        new = ev.state
        old = m.state
        if new is _DOWN:
            if old is not None and old is not _DOWN:
                for tr in m.tracks:
                    tr.pending_failure = True
        else:
            for tr in m.tracks:
                tr.pending_failure = False
        m.state = new

    def _on_count(self, m: _Machine, ev: CountEvent, out: list[OeeRecord]) -> None:
        t = ev.ts_ns
        if t > m.clock:
            m.clock = t
        self._advance(m, t, out)
        if m.last_total < 0:
            d_total = d_good = 0
        elif ev.total < m.last_total or ev.good < m.last_good:
            d_total, d_good = ev.total, ev.good
        else:
            d_total, d_good = ev.total - m.last_total, ev.good - m.last_good
        m.last_total, m.last_good = ev.total, ev.good
        late = False
        for cal, tr in zip(self._calendars, m.tracks, strict=True):
            acc = tr.acc
            if acc is None or not acc.start < t <= acc.end:
                start, end = cal.window_from(t - 1)
                if start >= t:
                    continue  # between shifts: no window of this calendar holds it
                if end <= tr.closed_end or acc is not None or tr.cursor > end:
                    late = True
                    continue
                acc = tr.acc = _Window(start, end)
            acc.total += d_total
            acc.good += d_good
        if late:
            self.late_events += 1

    def _advance(self, m: _Machine, t: int, out: list[OeeRecord]) -> None:
        """Account the current state up to event time ``t``; close windows whose end ``t`` passes."""
        state = m.state
        for cal, tr in zip(self._calendars, m.tracks, strict=True):
            cursor = tr.cursor
            if t <= cursor:
                continue
            acc = tr.acc
            if acc is not None:
                if t <= acc.end:  # fast path: still inside the open window
                    if state is not None:
                        self._account(acc, tr, state, t - cursor)
                    tr.cursor = t
                    continue
            elif t <= tr.gap_until:  # fast path: still before the next window of this calendar
                if state is _DOWN:
                    tr.pending_failure = False
                tr.cursor = t
                continue
            while True:
                if acc is not None:
                    seg_end = t if t < acc.end else acc.end
                    if seg_end > cursor:
                        if state is not None:
                            self._account(acc, tr, state, seg_end - cursor)
                        cursor = seg_end
                    if t <= acc.end:
                        break
                    self._emit(m, cal, acc, acc.end, out)
                    tr.closed_end = acc.end
                    acc = None
                if cursor >= t:
                    break
                if state is None:
                    cursor = t  # unknown time opens no window
                    break
                start, end = cal.window_from(cursor)
                if start >= t:
                    if state is _DOWN:
                        tr.pending_failure = False  # a failure between shifts belongs to no shift
                    cursor = t
                    tr.gap_until = start
                    break
                if start > cursor:
                    if state is _DOWN:
                        tr.pending_failure = False
                    cursor = start
                acc = _Window(start, end)
            tr.cursor = cursor
            tr.acc = acc

    @staticmethod
    def _account(acc: _Window, tr: _Track, state: MachineState, dt: int) -> None:
        acc.known += dt
        if state is _RUNNING:
            acc.run += dt
        elif state is _DOWN:
            acc.down += dt
            if tr.pending_failure:
                acc.failures += 1
                tr.pending_failure = False
        elif state is _PLANNED_STOP:
            acc.stopped += dt

    def _next_end(self, m: _Machine, cal: _Calendar, tr: _Track) -> int | None:
        """End of the window that the machine's time goes into next (None: no time will be accounted)."""
        if tr.acc is not None:
            return tr.acc.end
        if m.state is None:
            return None
        return cal.window_from(tr.cursor)[1]

    def _next_deadline(self, m: _Machine) -> int:
        first = _NEVER
        for cal, tr in zip(self._calendars, m.tracks, strict=True):
            end = self._next_end(m, cal, tr)
            if end is not None and end < first:
                first = end
        if first == _NEVER:
            return first
        return m.last_wall + (first - m.clock) + self._idle_ns

    def _idle_close(self, m: _Machine, now_wall_ns: int, out: list[OeeRecord]) -> None:
        """Close, with the current state extended, every window whose end passed idle_close_s ago.

        "Now" in event time is estimated as the last event time plus the wall time since it arrived.
        """
        horizon = m.clock + (now_wall_ns - m.last_wall) - self._idle_ns
        state = m.state
        for cal, tr in zip(self._calendars, m.tracks, strict=True):
            while True:
                acc = tr.acc
                if acc is None:
                    if state is None:
                        break
                    start, end = cal.window_from(tr.cursor)
                    if end > horizon:
                        break
                    if start > tr.cursor:
                        if state is _DOWN:
                            tr.pending_failure = False
                        tr.cursor = start
                    acc = tr.acc = _Window(start, end)
                if acc.end > horizon:
                    break
                if state is not None and acc.end > tr.cursor:
                    self._account(acc, tr, state, acc.end - tr.cursor)
                self._emit(m, cal, acc, acc.end, out)
                tr.cursor = tr.closed_end = acc.end
                tr.acc = None

    def _emit(self, m: _Machine, cal: _Calendar, acc: _Window, end_ns: int, out: list[OeeRecord]) -> None:
        if acc.known == acc.stopped and acc.total == 0 and acc.good == 0:
            return  # no planned time and no production: unknown or planned stop only
        planned = (acc.known - acc.stopped) / NS_PER_S
        run = acc.run / NS_PER_S
        down = acc.down / NS_PER_S
        total, good, failures = acc.total, acc.good, acc.failures
        out.append(
            OeeRecord(
                machine=m.key,
                window=cal.label,
                shift=cal.shift,
                start_ns=acc.start,
                end_ns=end_ns,
                availability=_ratio(run, planned),
                performance=_ratio(m.ideal * total, run),
                quality=_ratio(good, total),
                oee=_ratio(m.ideal * good, planned),
                planned_s=planned,
                run_s=run,
                down_s=down,
                total_count=total,
                good_count=good,
                mtbf_s=run / failures if failures else None,
                mttr_s=down / failures if failures else None,
                throughput_per_h=_ratio(total * 3600.0, planned),
            )
        )
