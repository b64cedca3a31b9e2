"""Machine context for anomaly events: what the state channel says about the telemetry.

A machine that starts, stops or goes down changes every signal at once (temperature, power,
vibration), which statistical detectors rightly find surprising and an operator rightly finds normal.
:class:`StateChangeFilter` drops the events of a machine for ``holdoff_s`` seconds (event time) after
each of its state changes; detectors keep scoring and learning. Sensor-health events (``flatline``: a
stuck sensor is wrong whatever the machine does) are exempt.

>>> import numpy as np
>>> from gateway.batch import MachineKey, StateEvent
>>> from gateway.detect.fusion import AnomalyEvents
>>> from gateway.schema import MachineState
>>> m = MachineKey("s", "a", "l", "m1")
>>> f = StateChangeFilter(holdoff_s=60)
>>> f.observe([StateEvent(m, 0, MachineState.IDLE), StateEvent(m, 100 * 10**9, MachineState.RUNNING)])
>>> ev = AnomalyEvents(np.array([0, 0]), np.array([130, 200]) * 10**9, np.array([6, 6]),
...                    np.ones(2), np.ones(2), np.ones(2), np.ones(2))
>>> f.keep(ev, [m]).ts_ns.tolist()  # 30 s after the change: dropped; 100 s after: kept
[200000000000]
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from gateway.batch import I64, MachineKey, StateEvent
from gateway.checkpoint import State
from gateway.detect.config import DETECTOR_NAMES
from gateway.detect.fusion import AnomalyEvents
from gateway.schema import MachineState

__all__ = ["StateChangeFilter"]


class StateChangeFilter:
    """Drops anomaly events that follow a state change of their machine too closely."""

    def __init__(self, holdoff_s: float, exempt: Sequence[str] = ("flatline", "stuck")) -> None:
        self.holdoff_ns = int(holdoff_s * 1e9)
        self._always = np.array([DETECTOR_NAMES.index(d) for d in exempt], np.int64)
        self._state: dict[MachineKey, str] = {}
        self._changed: dict[MachineKey, list[int]] = {}  # change times of earlier batches, ascending
        # this batch's changes: (time, samples of the batch that arrived before it), merged at the next one
        self._late: dict[MachineKey, list[tuple[int, int]]] = {}
        self.dropped = 0

    @property
    def has_new_changes(self) -> bool:
        """Whether the current batch changed a machine's state (its events then need their sample rows)."""
        return bool(self._late)

    def _merge(self) -> None:
        for machine, late in self._late.items():
            times = self._changed.setdefault(machine, [])
            times.extend(t for t, _ in late)
            times.sort()
        self._late = {}

    def observe(self, states: Sequence[StateEvent], rows: Sequence[int] | None = None) -> None:
        """Note the state changes (a repeated state is not a change) of a batch of state events, in arrival
        order; ``rows[k]``: the batch's samples that arrived before ``states[k]`` (default: none)."""
        self._merge()
        horizon = 2 * self.holdoff_ns + 3_600_000_000_000
        for machine in {e.machine for e in states} & self._changed.keys():
            # before this batch's changes go in: a change of this batch never pushes out one its own
            # events need, so where a batch is cut does not matter (only samples over an hour late do)
            times = self._changed[machine]
            while len(times) > 1 and times[0] < times[-1] - horizon:
                times.pop(0)  # older than any event still to come could be held off by
        for k, e in enumerate(states):
            previous = self._state.get(e.machine)
            self._state[e.machine] = e.state
            if previous is not None and previous != e.state:
                # every change of a batch counts, not only its last: a block of telemetry may span several;
                # each holds off only the samples that arrived after it
                self._late.setdefault(e.machine, []).append((e.ts_ns, rows[k] if rows is not None else 0))

    def snapshot(self) -> State:
        """Each machine's last state and recent change times (see :mod:`gateway.checkpoint`)."""
        # copies of the change lists: the file is written in a thread while batches go on
        self._merge()  # between two batches: every change arrived before the next batch's samples
        rows = [[k.site, k.area, k.line, k.machine, str(s), list(self._changed.get(k, ()))]
                for k, s in self._state.items()]
        return State({"machines": rows, "dropped": self.dropped})

    def restore(self, state: State) -> None:
        self._state, self._changed, self._late = {}, {}, {}
        for site, area, line, machine, st, times in state.meta["machines"]:
            key = MachineKey(site, area, line, machine)
            self._state[key] = MachineState(st)
            if times:
                self._changed[key] = [int(t) for t in times]
        self.dropped = int(state.meta["dropped"])

    def keep(self, events: AnomalyEvents, machine_of_series: Sequence[MachineKey],
             rows: Sequence[int] | I64 | None = None) -> AnomalyEvents:
        """The events that are not within ``holdoff_s`` after their machine's last state change that arrived
        before their sample (``rows``: each event's sample row in the batch; default: after every change)."""
        if len(events) == 0 or self.holdoff_ns == 0 or not (self._changed or self._late):
            return events
        keep = np.ones(len(events), np.bool_)
        row_list = rows.tolist() if isinstance(rows, np.ndarray) else rows
        for i, (s, t) in enumerate(zip(events.series.tolist(), events.ts_ns.tolist(), strict=True)):
            machine = machine_of_series[s]
            times = self._changed.get(machine)
            best = None
            if times:  # the latest change at or before the event
                j = bisect.bisect_right(times, t) - 1
                if j >= 0:
                    best = times[j]
            late = self._late.get(machine)
            if late:  # and this batch's that arrived before its sample
                r = row_list[i] if row_list is not None else 1 << 62
                for tc, pc in late:
                    if pc <= r and tc <= t and (best is None or tc > best):
                        best = tc
            keep[i] = not (best is not None and t - best < self.holdoff_ns)
        if self._always.size:
            keep |= np.isin(events.code, self._always)
        if keep.all():
            return events
        self.dropped += int((~keep).sum())
        return AnomalyEvents(
            events.series[keep], events.ts_ns[keep], events.code[keep], events.score[keep],
            events.value[keep], events.expected[keep], events.zscore[keep], events.names,
        )
