"""A simulated machine: state machine, physics, part counters and labelled fault injection.

The model is advanced by :meth:`Machine.step` with an explicit time, so tests drive simulated time
without sleeping, and the same seed with the same time sequence gives the same messages.

>>> m = Machine(MachineSpec("m001", "plant1", "assembly", "line1", 0), seed=7)
>>> [e.channel for e in m.step(1763900000.0)]
['state', 'count', 'telemetry']
>>> sorted(m.step(1763900001.0)[-1].message.values)
['power_kw', 'spindle_temp_c', 'vibration_mm_s']

Time scale: ``time_scale`` compresses only the state machine's dwell times (a demo with
``time_scale=60`` sees a state change every few seconds). Physics (thermal lag), part cycle
times and fault durations stay in real seconds so rates, OEE and detection windows keep their
meaning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel

from gateway.schema import (
    CountMessage,
    MachineState,
    StateMessage,
    TelemetryFixedRate,
    TelemetrySample,
)

__all__ = [
    "DEFAULT_FAULT_DURATION_S",
    "METRICS",
    "SENSORS",
    "Channel",
    "Emission",
    "FaultKind",
    "FaultPlan",
    "FaultRecord",
    "Machine",
    "MachineSpec",
    "ScheduledFault",
    "encode_payload",
]

log = logging.getLogger(__name__)

Channel = Literal["telemetry", "state", "count"]

TEMP = "spindle_temp_c"
VIB = "vibration_mm_s"
POWER = "power_kw"
METRICS = (TEMP, VIB, POWER)
SENSORS = ("all", "faulty")  # which sensors a plant recording sends: every one, or each machine's faulty one only

# Dwell times in model seconds: (distribution, mean, lognormal sigma).
_DWELL: dict[MachineState, tuple[str, float, float]] = {
    MachineState.RUNNING: ("lognormal", 1200.0, 0.6),
    MachineState.IDLE: ("exponential", 150.0, 0.0),
    MachineState.DOWN: ("lognormal", 240.0, 0.8),
    MachineState.SETUP: ("lognormal", 480.0, 0.4),
    MachineState.PLANNED_STOP: ("lognormal", 900.0, 0.3),
}

_NEXT: dict[MachineState, tuple[tuple[MachineState, ...], tuple[float, ...]]] = {
    MachineState.RUNNING: (
        (MachineState.DOWN, MachineState.IDLE, MachineState.SETUP, MachineState.PLANNED_STOP),
        (0.45, 0.35, 0.12, 0.08),
    ),
    MachineState.IDLE: ((MachineState.RUNNING, MachineState.SETUP), (0.85, 0.15)),
    MachineState.DOWN: ((MachineState.RUNNING, MachineState.SETUP), (0.85, 0.15)),
    MachineState.SETUP: ((MachineState.RUNNING,), (1.0,)),
    MachineState.PLANNED_STOP: ((MachineState.RUNNING, MachineState.SETUP), (0.6, 0.4)),
}

_REASONS: dict[MachineState, tuple[str, ...]] = {
    MachineState.RUNNING: (),
    MachineState.IDLE: ("starved", "blocked", "waiting_operator"),
    MachineState.DOWN: ("jam", "tool_break", "no_material", "electrical_fault"),
    MachineState.SETUP: ("changeover",),
    MachineState.PLANNED_STOP: ("break", "preventive_maintenance", "shift_change"),
}

# Where a machine starts (roughly the long-run state mix).
_INITIAL: tuple[tuple[MachineState, ...], tuple[float, ...]] = (
    (MachineState.RUNNING, MachineState.IDLE, MachineState.SETUP, MachineState.DOWN),
    (0.8, 0.08, 0.07, 0.05),
)

# Spindle load per state, as a fraction of the machine's running load.
_LOAD = {
    MachineState.RUNNING: 1.0,
    MachineState.IDLE: 0.08,
    MachineState.SETUP: 0.12,
    MachineState.DOWN: 0.0,
    MachineState.PLANNED_STOP: 0.0,
}


def encode_payload(message: BaseModel) -> bytes:
    """Serialise a wire model to compact JSON, leaving out unset optional fields.

    >>> encode_payload(StateMessage(ts=1.5, state=MachineState.IDLE))
    b'{"ts":1.5,"state":"IDLE"}'
    """
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True))


class FaultKind(StrEnum):
    """Injected fault kinds; each has a signature the gateway's detectors should find."""

    DRIFT = "drift"  # temperature sensor offset ramps up slowly
    SPIKE = "spike"  # one outlier sample
    STUCK = "stuck"  # the sensor repeats the exact same value
    BEARING_WEAR = "bearing_wear"  # vibration rises over time


# Default durations in real seconds (a spike is always one sample).
DEFAULT_FAULT_DURATION_S = {
    FaultKind.DRIFT: 300.0,
    FaultKind.SPIKE: 0.0,
    FaultKind.STUCK: 30.0,
    FaultKind.BEARING_WEAR: 600.0,
}

_FAULT_METRICS: dict[FaultKind, tuple[str, ...]] = {
    FaultKind.DRIFT: (TEMP,),
    FaultKind.SPIKE: METRICS,
    FaultKind.STUCK: METRICS,
    FaultKind.BEARING_WEAR: (VIB,),
}


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """Where a machine sits in the plant; ``index`` seeds its RNG together with the fleet seed."""

    name: str
    site: str
    area: str
    line: str
    index: int

    def topic(self, root: str, channel: str) -> str:
        """``<root>/<site>/<area>/<line>/<machine>/<channel>``."""
        return f"{root}/{self.site}/{self.area}/{self.line}/{self.name}/{channel}"


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    """A fault that starts ``at_s`` seconds after the machine's first step (for tests)."""

    kind: FaultKind
    at_s: float
    duration_s: float | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        allowed = _FAULT_METRICS[self.kind]
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"fault {self.kind} applies to {', '.join(allowed)}, not {self.metric!r}")
        if self.at_s < 0:
            raise ValueError(f"fault start must be >= 0 s, got {self.at_s}")
        if self.duration_s is not None and self.duration_s < 0:
            raise ValueError(f"fault duration must be >= 0 s, got {self.duration_s}")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which faults a machine gets: random ones at ``rate_per_hour`` plus a fixed schedule."""

    kinds: tuple[FaultKind, ...] = ()
    rate_per_hour: float = 0.0
    scheduled: tuple[ScheduledFault, ...] = ()
    duration_s: dict[FaultKind, float] = field(default_factory=lambda: dict(DEFAULT_FAULT_DURATION_S))


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """Ground truth for one injected fault: first and last affected sample timestamps."""

    machine: str
    site: str
    area: str
    line: str
    metric: str
    kind: FaultKind
    start_ts: float
    end_ts: float

    def to_json(self) -> bytes:
        """One JSON line for the ``--fault-log`` file."""
        return orjson.dumps(
            {
                "machine": self.machine,
                "site": self.site,
                "area": self.area,
                "line": self.line,
                "metric": self.metric,
                "kind": str(self.kind),
                "start_ts": self.start_ts,
                "end_ts": self.end_ts,
            }
        )


@dataclass(frozen=True, slots=True)
class Emission:
    """One message a machine wants published on ``channel``."""

    channel: Channel
    message: TelemetrySample | TelemetryFixedRate | StateMessage | CountMessage

    def payload(self) -> bytes:
        """The JSON bytes to publish."""
        return encode_payload(self.message)


@dataclass(slots=True)
class _ActiveFault:
    kind: FaultKind
    metric: str
    start_ts: float  # planned start (model time)
    end_ts: float  # planned end (model time)
    magnitude: float
    first_ts: float | None = None
    last_ts: float | None = None
    held: float | None = None  # the stuck value


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    return float(rng.lognormal(math.log(mean) - sigma * sigma / 2.0, sigma))


class Machine:
    """A machine tool with states, temperature, vibration, power and part counters.

    Parameters
    ----------
    spec:
        Name and plant location.
    seed:
        Fleet seed; the machine's RNG is ``np.random.default_rng([seed, spec.index])``.
    time_scale:
        Divides state dwell times (60 makes them 60x shorter).
    faults:
        Random and scheduled fault injection.
    count_every_s:
        Seconds between ``count`` messages.
    initial_state:
        Force the first state (tests); drawn at random otherwise.
    """

    def __init__(
        self,
        spec: MachineSpec,
        seed: int,
        *,
        time_scale: float = 1.0,
        faults: FaultPlan | None = None,
        count_every_s: float = 5.0,
        initial_state: MachineState | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.spec = spec
        self.time_scale = time_scale
        self.faults = faults or FaultPlan()
        self.count_every_s = count_every_s
        self._rng = np.random.default_rng([seed, spec.index])
        # Faults and waveforms draw from their own streams so enabling them leaves the main stream as is.
        self._fault_rng = np.random.default_rng([seed, spec.index, 1])
        self._wave_rng = np.random.default_rng([seed, spec.index, 2])
        rng = self._rng

        self.cycle_time_s = float(rng.uniform(1.0, 3.0))
        self.scrap_rate = float(rng.uniform(0.01, 0.04))
        self.ambient_c = float(rng.normal(22.0, 1.5))
        self.temp_gain_c = float(rng.uniform(30.0, 45.0))  # steady-state rise at full load
        self.thermal_tau_s = float(rng.uniform(120.0, 300.0))
        self.running_load = float(rng.uniform(0.6, 0.9))
        self.idle_power_kw = float(rng.uniform(0.8, 1.5))
        self.rated_power_kw = float(rng.uniform(6.0, 12.0))
        self.base_vibration = float(rng.uniform(1.2, 2.8))  # mm/s RMS when running, new bearing
        self.bearing_wear = float(rng.uniform(0.0, 0.15))  # built-in wear, raises vibration
        self.shaft_hz = float(rng.uniform(20.0, 30.0))

        if initial_state is None:
            states, probs = _INITIAL
            initial_state = states[int(rng.choice(len(states), p=probs))]
        self.state: MachineState = initial_state
        self.reason: str | None = self._draw_reason(initial_state)
        self.total = 0
        self.good = 0
        self.seq = 0

        self._t0: float | None = None
        self._t: float = 0.0
        self._state_until = 0.0
        self._cycle_left = self._draw_cycle()
        self._load = 0.0
        self._temp = 0.0
        self._last_count_ts = -math.inf
        self._last_fault_check: float | None = None
        self._active: list[_ActiveFault] = []
        self._pending = sorted(self.faults.scheduled, key=lambda f: f.at_s)
        self._finished: list[FaultRecord] = []

    # -- public API -------------------------------------------------------------------------------

    def step(self, now_s: float) -> list[Emission]:
        """Advance the model to ``now_s`` (epoch seconds) and return the messages to publish.

        Returns state transitions that happened since the last step (with their own timestamps),
        a ``count`` message when one is due, and one telemetry sample at ``now_s``.
        """
        out: list[Emission] = []
        if self._t0 is None:
            self._start(now_s, out)
        else:
            self._advance(max(now_s, self._t), out)
        self._update_faults(now_s)
        if now_s - self._last_count_ts >= self.count_every_s:
            self._last_count_ts = now_s
            out.append(Emission("count", CountMessage(ts=now_s, total=self.total, good=self.good)))
        self.seq += 1
        out.append(Emission("telemetry", TelemetrySample(ts=now_s, seq=self.seq, values=self._measure(now_s))))
        return out

    def waveform(self, now_s: float, hz: float, seconds: float = 1.0) -> Emission:
        """A fixed-rate vibration block ``accel_g`` covering ``[now_s - seconds, now_s)``."""
        n = max(1, round(hz * seconds))
        t = np.arange(n) / hz
        noise = self._wave_rng.standard_normal(n)
        running = self.state is MachineState.RUNNING
        if running:
            wear = self.bearing_wear + self._fault_level(now_s, FaultKind.BEARING_WEAR)
            f = self.shaft_hz
            sig = 0.15 * np.sin(2 * np.pi * f * t) + 0.05 * np.sin(2 * np.pi * 2 * f * t + 0.7)
            # Outer-race defect: impacts at ~3.6x shaft speed, growing with wear.
            sig += 0.3 * wear * np.sin(2 * np.pi * 3.57 * f * t) ** 8
            sig += 0.02 * noise
        else:
            sig = 0.003 * noise
        values = np.round(sig, 5).tolist()
        return Emission("telemetry", TelemetryFixedRate(t0=now_s - seconds, dt=1.0 / hz, values={"accel_g": values}))

    def pop_finished_faults(self) -> list[FaultRecord]:
        """Faults that ended since the last call (ground truth for the fault log)."""
        done, self._finished = self._finished, []
        return done

    def close_faults(self) -> list[FaultRecord]:
        """End all active faults now (simulator shutdown) and return every unreported record."""
        for fault in self._active:
            self._finish(fault)
        self._active.clear()
        return self.pop_finished_faults()

    # -- state machine ----------------------------------------------------------------------------

    def _start(self, now_s: float, out: list[Emission]) -> None:
        self._t0 = self._t = now_s
        # The machine was already in this state before we started watching: use a residual dwell.
        self._state_until = now_s + self._draw_dwell(self.state) * float(self._rng.random())
        self._load = _LOAD[self.state] * self.running_load
        self._temp = self.ambient_c + self.temp_gain_c * self._load
        out.append(Emission("state", StateMessage(ts=now_s, state=self.state, reason=self.reason)))

    def _advance(self, now_s: float, out: list[Emission]) -> None:
        while self._state_until <= now_s:
            self._run_until(self._state_until)
            states, probs = _NEXT[self.state]
            nxt = states[int(self._rng.choice(len(states), p=probs))] if len(states) > 1 else states[0]
            self.state = nxt
            self.reason = self._draw_reason(nxt)
            out.append(Emission("state", StateMessage(ts=self._t, state=nxt, reason=self.reason)))
            self._state_until = self._t + self._draw_dwell(nxt)
        self._run_until(now_s)

    def _run_until(self, t: float) -> None:
        """Integrate physics and production from ``self._t`` to ``t`` within the current state."""
        dt = t - self._t
        if dt <= 0:
            return
        target = _LOAD[self.state] * self.running_load
        self._load = target
        temp_target = self.ambient_c + self.temp_gain_c * self._load
        self._temp += (temp_target - self._temp) * (1.0 - math.exp(-dt / self.thermal_tau_s))
        if self.state is MachineState.RUNNING:
            left = dt
            while left >= self._cycle_left:
                left -= self._cycle_left
                self.total += 1
                if self._rng.random() >= self.scrap_rate:
                    self.good += 1
                self._cycle_left = self._draw_cycle()
            self._cycle_left -= left
        self._t = t

    def _draw_dwell(self, state: MachineState) -> float:
        dist, mean, sigma = _DWELL[state]
        raw = float(self._rng.exponential(mean)) if dist == "exponential" else _lognormal(self._rng, mean, sigma)
        return max(raw, 5.0) / self.time_scale

    def _draw_reason(self, state: MachineState) -> str | None:
        reasons = _REASONS[state]
        if not reasons:
            return None
        return reasons[int(self._rng.integers(len(reasons)))] if len(reasons) > 1 else reasons[0]

    def _draw_cycle(self) -> float:
        return self.cycle_time_s * float(self._rng.lognormal(0.0, 0.08))

    # -- measurement and faults -------------------------------------------------------------------

    def _measure(self, now_s: float) -> dict[str, float]:
        n_temp, n_vib, n_pow, n_load = self._rng.standard_normal(4)
        running = self.state is MachineState.RUNNING
        load = self._load * (1.0 + 0.05 * n_load) if running else self._load
        temp = self._temp + 0.25 * n_temp
        if running:
            wear = self.bearing_wear + self._fault_level(now_s, FaultKind.BEARING_WEAR)
            vib = self.base_vibration * (1.0 + 2.5 * wear) * (1.0 + 0.06 * n_vib)
        elif self.state in (MachineState.IDLE, MachineState.SETUP):
            vib = 0.35 * (1.0 + 0.1 * n_vib)
        else:
            vib = 0.05 * (1.0 + 0.2 * n_vib)
        if self.state in (MachineState.DOWN, MachineState.PLANNED_STOP):
            power = 0.3 * self.idle_power_kw + 0.02 * n_pow
        else:
            power = self.idle_power_kw + self.rated_power_kw * load + 0.1 * n_pow
        values = {TEMP: temp, VIB: max(vib, 0.0), POWER: max(power, 0.0)}
        for fault in self._active:
            if fault.start_ts <= now_s:
                # Every sample inside the fault window counts as affected, visible or not.
                if fault.first_ts is None:
                    fault.first_ts = now_s
                fault.last_ts = now_s
                values[fault.metric] = self._apply_fault(fault, now_s, values[fault.metric])
        return {k: round(v, 3) for k, v in values.items()}

    def _apply_fault(self, fault: _ActiveFault, now_s: float, value: float) -> float:
        if fault.kind is FaultKind.DRIFT:
            span = max(fault.end_ts - fault.start_ts, 1e-9)
            return value + fault.magnitude * min(1.0, (now_s - fault.start_ts) / span)
        if fault.kind is FaultKind.SPIKE:
            fault.end_ts = now_s  # one sample only
            return max(value + fault.magnitude, 0.0)
        if fault.kind is FaultKind.STUCK:
            if fault.held is None:
                fault.held = round(value, 3)
            return fault.held
        return value  # bearing wear acts on the physics, see _fault_level

    def _fault_level(self, now_s: float, kind: FaultKind) -> float:
        """Extra bearing wear from an active fault: ramps 0 → magnitude over its duration."""
        level = 0.0
        for fault in self._active:
            if fault.kind is kind and fault.start_ts <= now_s:
                span = max(fault.end_ts - fault.start_ts, 1e-9)
                level += fault.magnitude * min(1.0, (now_s - fault.start_ts) / span)
        return level

    def _update_faults(self, now_s: float) -> None:
        """End expired faults, then start scheduled and random ones due by ``now_s``."""
        still: list[_ActiveFault] = []
        for fault in self._active:
            spike_done = fault.kind is FaultKind.SPIKE and fault.last_ts is not None
            if spike_done or (fault.kind is not FaultKind.SPIKE and now_s > fault.end_ts):
                self._finish(fault)
            else:
                still.append(fault)
        self._active = still

        assert self._t0 is not None
        elapsed = now_s - self._t0
        while self._pending and self._pending[0].at_s <= elapsed:
            sched = self._pending.pop(0)
            self._inject(sched.kind, now_s, sched.duration_s, sched.metric)

        plan = self.faults
        if plan.kinds and plan.rate_per_hour > 0:
            last = now_s if self._last_fault_check is None else self._last_fault_check
            dt = max(now_s - last, 0.0)
            self._last_fault_check = now_s
            p = 1.0 - math.exp(-plan.rate_per_hour * dt / 3600.0)
            if dt > 0 and self._fault_rng.random() < p:
                kind = plan.kinds[int(self._fault_rng.integers(len(plan.kinds)))]
                self._inject(kind, now_s, None, None)

    def _inject(self, kind: FaultKind, now_s: float, duration_s: float | None, metric: str | None) -> None:
        frng = self._fault_rng
        choices = _FAULT_METRICS[kind]
        if metric is None:
            metric = choices[int(frng.integers(len(choices)))]
        if any(f.metric == metric for f in self._active):
            log.info("%s: skipping %s on %s, another fault is active there", self.spec.name, kind, metric)
            return
        if duration_s is None:
            duration_s = self.faults.duration_s.get(kind, DEFAULT_FAULT_DURATION_S[kind])
        if kind is FaultKind.DRIFT:
            magnitude = float(frng.uniform(8.0, 15.0))  # °C added by the end of the ramp
        elif kind is FaultKind.SPIKE:
            scale = {TEMP: 3.0, VIB: 1.5, POWER: 2.0}[metric]
            sign = -1.0 if metric == TEMP and frng.random() < 0.5 else 1.0
            magnitude = sign * float(frng.uniform(6.0, 10.0)) * scale
        elif kind is FaultKind.BEARING_WEAR:
            magnitude = float(frng.uniform(1.0, 2.0))  # extra wear; vibration x(1 + 2.5 x wear)
        else:
            magnitude = 0.0
        fault = _ActiveFault(kind, metric, now_s, now_s + duration_s, magnitude)
        self._active.append(fault)
        log.info("%s: fault %s on %s starts at %.3f for %.1f s", self.spec.name, kind, metric, now_s, duration_s)

    def _finish(self, fault: _ActiveFault) -> None:
        if fault.first_ts is None or fault.last_ts is None:
            return  # never reached a sample
        rec = FaultRecord(
            self.spec.name,
            self.spec.site,
            self.spec.area,
            self.spec.line,
            fault.metric,
            fault.kind,
            fault.first_ts,
            fault.last_ts,
        )
        log.info(
            "%s: fault %s on %s ended (%.3f..%.3f)",
            rec.machine,
            rec.kind,
            rec.metric,
            rec.start_ts,
            rec.end_ts,
        )
        self._finished.append(rec)

    def __repr__(self) -> str:
        return f"Machine({self.spec.name!r}, state={self.state}, total={self.total}, good={self.good})"
