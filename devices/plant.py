"""A plant as it is: shift calendars, regimes, physics and labelled faults, generated with numpy.

The generator is the specification of the fault-detection benchmark (``bench/faults.py``). Each
machine follows its own shift calendar (3-shift, 2-shift or 1-shift, cycling over machines) with
breaks, a meal and a cleaning stop in every shift, every planned time jittered per day; inside a shift
it mostly runs, with random waits (IDLE), changeovers (SETUP) and unplanned stops (DOWN). Power and
vibration follow the spindle load at once; the spindle temperature follows it through a first-order
thermal lag on top of its hall's ambient temperature. Every machine gets exactly one labelled fault,
sized in multiples of the series' in-control noise σ in the regime at the onset.

The whole series of a machine is built at once (numpy over samples; Python loops only over machines,
days and shift events), and the same configuration always gives the same plant.

>>> plant = generate_plant(PlantConfig(machines=2, days=1.5, interval_s=60.0, seed=3))
>>> plant.values.shape
(2, 3, 2160)
>>> [(f.machine, f.kind, f.metric) for f in plant.faults]
[('m001', 'step', 'spindle_temp_c'), ('m002', 'drift', 'vibration_mm_s')]
>>> plant.states[0][0][1:]
(<MachineState.PLANNED_STOP: 'PLANNED_STOP'>, 'shift_change')
>>> first = next(replay_records(plant, state_channel=True))
>>> first["topic"], first["payload"]["state"]
('factory/plant1/hall1/line1/m001/state', 'PLANNED_STOP')
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from devices.machine import METRICS, SENSORS, MachineSpec
from gateway.schema import MachineState

__all__ = [
    "FAULT_DURATION_S",
    "FAULT_KINDS",
    "FAULT_WINDOW_S",
    "REGIMES",
    "SENSORS",
    "SHIFT_PATTERNS",
    "WARMUP_S",
    "MachinePhysics",
    "Plant",
    "PlantConfig",
    "PlantFault",
    "ShiftWindow",
    "fault_plan",
    "generate_plant",
    "lowpass",
    "replay_records",
    "write_replay",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DAY_S = 86_400.0
H = 3_600.0
MIN = 60.0
WARMUP_S = DAY_S  # faults start after the first day: the detectors learn the plant first

# Nominal shifts as (start, end) seconds after the midnight of the day the shift starts.
SHIFT_PATTERNS: dict[str, tuple[tuple[float, float], ...]] = {
    "3-shift": ((6 * H, 14 * H), (14 * H, 22 * H), (22 * H, 30 * H)),
    "2-shift": ((6 * H, 14 * H), (14 * H, 22 * H)),
    "1-shift": ((7 * H, 15.5 * H),),
}
BREAK_AT_S, BREAK_S = 2 * H, 15 * MIN  # after the shift start
MEAL_AT_S, MEAL_S = 4 * H, 30 * MIN
CLEANING_S = 15 * MIN  # before the shift end
JITTER_SD_S, JITTER_MAX_S = 3 * MIN, 8 * MIN
WORKDAYS = frozenset(range(5))  # Monday..Friday (a shift belongs to the day it starts)

# Regimes, indexed by the int8 codes of the generated state arrays.
REGIMES = (MachineState.RUNNING, MachineState.IDLE, MachineState.SETUP, MachineState.DOWN, MachineState.PLANNED_STOP)
RUN, IDLE, SETUP, DOWN, STOP = range(5)
REASONS: tuple[str | None, ...] = (
    None, "shift_change", "break", "meal", "cleaning", "starved", "blocked", "changeover", "jam", "tool_break",
)
_REASON = {r: i for i, r in enumerate(REASONS)}

# Random events inside a shift: (regime, reasons, count range [lo, hi) or Poisson mean, duration range s).
IDLE_COUNT, IDLE_S = (2, 5), (2 * MIN, 10 * MIN)
SETUP_COUNT, SETUP_S = (1, 3), (10 * MIN, 30 * MIN)
DOWN_MEAN, DOWN_S = 1.0, (5 * MIN, 30 * MIN)

# Physics constants per regime (RUNNING, IDLE, SETUP, DOWN, PLANNED_STOP); RUNNING's load is per machine.
LOAD = (np.nan, 0.08, 0.15, 0.0, 0.0)
POWER_SD_KW = (0.1, 0.03, 0.05, 0.01, 0.01)
VIB_LEVEL_MM_S = (np.nan, 0.35, 0.5, 0.05, 0.05)  # RUNNING: the machine's base x load
VIB_REL_SD = 0.06
PRODUCT_CHANGE = 0.05  # running load changes by up to ±5 % at each changeover
AMBIENT_TAU_S, AMBIENT_SD_C, AMBIENT_PEAK_H = 6 * H, 0.4, 15.0

FAULT_KINDS = ("step", "drift", "spike", "stuck", "variance", "dropout")
FAULT_DURATION_S = {"step": 60 * MIN, "drift": 6 * H, "spike": 0.0, "stuck": 2 * H, "variance": 3 * H,
                    "dropout": 20 * MIN}
FAULT_WINDOW_S = {"step": 30 * MIN, "drift": 6 * H, "spike": 1 * MIN, "stuck": 2 * H, "variance": 3 * H,
                  "dropout": 20 * MIN}


@dataclass(frozen=True, slots=True)
class PlantConfig:
    """What to generate. ``start_s`` must be a midnight UTC; the default is Monday 2025-12-01.

    ``inject_faults=False`` gives the same plant, the same fault labels and the values without the
    faults (a reference: the difference of the two is exactly the injected fault). ``resolution`` maps a
    metric to its sensor's step (readings are multiples of it; default: 3 decimals), as a coarse sensor
    reads: a quiet level then is a constant that flips by one step now and then. ``clock_jitter_s``: each
    machine's telemetry timestamps deviate from the nominal grid by up to ± this, uniformly, per machine
    and sample (a device's clock and scheduling; the readings are the nominal instant's), less than half
    the interval so they stay in order.

    >>> PlantConfig(resolution={"vibration_mm_s": 0.01}).resolution["vibration_mm_s"]
    0.01
    >>> PlantConfig(resolution={"rpm": 1.0})
    Traceback (most recent call last):
    ...
    ValueError: resolution: rpm is not a metric (spindle_temp_c, vibration_mm_s, power_kw)
    """

    machines: int = 24
    days: float = 3.0
    interval_s: float = 10.0
    seed: int = 1
    start_s: float = 1_764_547_200.0
    site: str = "plant1"
    machines_per_area: int = 8
    metrics: tuple[str, ...] = METRICS
    inject_faults: bool = True
    resolution: Mapping[str, float] = field(default_factory=dict)
    clock_jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if self.machines < 1:
            raise ValueError(f"machines must be >= 1, got {self.machines}")
        if not self.days > 0:
            raise ValueError(f"days must be > 0, got {self.days}")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.start_s % DAY_S:
            raise ValueError(f"start_s must be a midnight UTC (a multiple of 86400), got {self.start_s}")
        if set(self.metrics) != set(METRICS) or len(self.metrics) != len(METRICS):
            raise ValueError(f"metrics must be an ordering of {', '.join(METRICS)}, got {self.metrics}")
        if not 0.0 <= self.clock_jitter_s < self.interval_s / 2:
            raise ValueError(f"clock_jitter_s must be in [0, interval_s / 2), got {self.clock_jitter_s}")
        for metric, step in self.resolution.items():
            if metric not in METRICS:
                raise ValueError(f"resolution: {metric} is not a metric ({', '.join(METRICS)})")
            if not step > 0:
                raise ValueError(f"resolution: {metric} must be > 0, got {step}")

    @property
    def samples(self) -> int:
        return int(round(self.days * DAY_S / self.interval_s))


@dataclass(frozen=True, slots=True)
class MachinePhysics:
    """A machine's drawn physical parameters (the ground truth behind its series)."""

    rated_kw: float  # power at full load, on top of the base
    base_stop_kw: float  # when stopped (DOWN, PLANNED_STOP)
    base_on_kw: float  # when on (RUNNING, IDLE, SETUP)
    run_load: float  # load fraction when RUNNING, before the product-to-product change
    vib_base_mm_s: float  # vibration at full load
    gain_c: float  # spindle temperature rise at full load, over ambient
    tau_s: float  # thermal time constant
    temp_sd_c: float  # temperature sensor noise


@dataclass(frozen=True, slots=True)
class ShiftWindow:
    """One worked shift of a machine: jittered ``start``/``end`` and its planned stops inside it."""

    start: float
    end: float
    stops: tuple[tuple[float, float, str], ...]  # (start, end, reason): break, meal, cleaning


@dataclass(frozen=True, slots=True)
class PlantFault:
    """The ground truth of one injected fault.

    Samples with ``start_ts <= t < end_ts`` are affected (a spike: only ``t == start_ts``, and
    ``end_ts == start_ts``). ``sigma`` is the series' in-control noise std in the regime at the onset;
    ``magnitude`` is the offset in the series' units (step, spike; drift: the offset reached at the
    end), the noise factor (variance), the held value (stuck) or 0 (dropout). A fault counts as caught
    when an anomaly point for its machine and metric falls in ``[start_ts, start_ts + window_s]``.
    """

    machine: str
    site: str
    area: str
    line: str
    metric: str
    kind: str
    start_ts: float
    end_ts: float
    window_s: float
    sigma: float
    magnitude: float

    def to_json(self) -> str:
        """One JSON line (no trailing newline)."""
        return orjson.dumps(asdict(self)).decode()


@dataclass(slots=True)
class Plant:
    """A generated plant: ``values[m, k, t]`` is metric ``metrics[k]`` of machine ``specs[m]`` at ``ts_s[t]``.

    ``states[m]`` lists the machine's state changes ``(ts, state, reason)``, starting at ``ts_s[0]``;
    a state holds until the next change. ``shifts[m]`` are its worked shifts, ``shift_kinds[m]`` its
    calendar (a key of :data:`SHIFT_PATTERNS`), ``physics[m]`` its drawn parameters.
    """

    config: PlantConfig
    specs: list[MachineSpec]
    metrics: tuple[str, ...]
    ts_s: FloatArray
    values: FloatArray
    states: list[list[tuple[float, MachineState, str | None]]]
    faults: list[PlantFault]
    shifts: list[list[ShiftWindow]] = field(default_factory=list)
    shift_kinds: list[str] = field(default_factory=list)
    physics: list[MachinePhysics] = field(default_factory=list)

    def faults_jsonl(self) -> str:
        """The fault labels, one JSON object a line."""
        return "".join(f.to_json() + "\n" for f in self.faults)


def fault_plan(index: int) -> tuple[str, int]:
    """Fault kind and metric index of machine ``index``: kinds cycle, metrics shift every 6 machines.

    Across 18 consecutive machines every kind hits every metric once.

    >>> [fault_plan(i) for i in (0, 1, 6, 12)]
    [('step', 0), ('drift', 1), ('step', 1), ('step', 2)]
    """
    return FAULT_KINDS[index % len(FAULT_KINDS)], (index // len(FAULT_KINDS) + index) % len(METRICS)


def lowpass(u: FloatArray, interval_s: float, tau_s: float, y0: float = 0.0) -> FloatArray:
    """First-order lag of a sampled input held between samples: ``y[n] = a·y[n-1] + (1-a)·u[n-1]``.

    ``a = exp(-interval/τ)`` is exact for a zero-order-hold input, so a unit step reaches 1 - 1/e
    (63.2 %) τ after it. ``y[0] = y0``.

    >>> y = lowpass(np.r_[0.0, np.ones(100)], 10.0, 300.0)
    >>> round(float(y[1 + 30]), 4)  # 30 samples x 10 s = τ after the step
    0.6321
    """
    a = math.exp(-interval_s / tau_s)
    drive = np.empty(len(u))
    if len(u):
        drive[0] = y0
        drive[1:] = (1.0 - a) * u[:-1]
    return _ar1(a, drive)


def _ar1(a: float, drive: FloatArray, x0: float = 0.0) -> FloatArray:
    """``x[n] = a·x[n-1] + drive[n]`` with ``x[-1] = x0``, without a Python loop over samples.

    In closed form ``x[j] = a^(j+1)·(x0 + Σ_{i<=j} a^-(i+1)·drive[i])``; done in chunks short enough
    that ``a^-L`` stays below 1e8, carrying the state from chunk to chunk (few iterations).
    """
    n = len(drive)
    out = np.empty(n)
    if n == 0:
        return out
    if a <= 0.0:
        out[:] = drive
        return out
    chunk = max(1, int(math.log(1e8) / -math.log(a))) if a < 1.0 else n
    x = x0
    for s in range(0, n, chunk):
        d = drive[s : s + chunk]
        p = a ** np.arange(1, len(d) + 1, dtype=np.float64)
        out[s : s + len(d)] = p * (x + np.cumsum(d / p))
        x = float(out[s + len(d) - 1])
    return out


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _jitter(rng: np.random.Generator, n: int) -> FloatArray:
    return np.clip(rng.normal(0.0, JITTER_SD_S, n), -JITTER_MAX_S, JITTER_MAX_S)


def _layout(cfg: PlantConfig) -> list[MachineSpec]:
    width = max(3, len(str(cfg.machines)))
    return [
        MachineSpec(f"m{i + 1:0{width}d}", cfg.site, f"hall{i // cfg.machines_per_area + 1}",
                    f"line{i // cfg.machines_per_area + 1}", i)
        for i in range(cfg.machines)
    ]


def _calendar(cfg: PlantConfig, kind: str, rng: np.random.Generator, t_end: float) -> list[ShiftWindow]:
    """The machine's worked shifts, each planned time jittered per day; overlaps clipped to the earlier shift."""
    shifts: list[ShiftWindow] = []
    first_day = int(cfg.start_s // DAY_S) - 1  # a night shift of the day before reaches into the range
    for day in range(first_day, int(t_end // DAY_S) + 1):
        midnight = day * DAY_S
        weekday = (day + 3) % 7  # 1970-01-01 was a Thursday
        for nominal_start, nominal_end in SHIFT_PATTERNS[kind]:
            j = _jitter(rng, 5)  # drawn on every day, worked or not: a calendar change keeps the other days
            if weekday not in WORKDAYS:
                continue
            start = midnight + nominal_start + j[0]
            end = midnight + nominal_end + j[1]
            if shifts and start < shifts[-1].end:
                start = shifts[-1].end
            brk = midnight + nominal_start + BREAK_AT_S + j[2]
            meal = midnight + nominal_start + MEAL_AT_S + j[3]
            cleaning = min(midnight + nominal_end - CLEANING_S + j[4], end - 5 * MIN)
            stops = ((brk, brk + BREAK_S, "break"), (meal, meal + MEAL_S, "meal"), (cleaning, end, "cleaning"))
            if end > cfg.start_s and start < t_end:
                planned = tuple((float(a), float(b), r) for a, b, r in stops)
                shifts.append(ShiftWindow(float(start), float(end), planned))
    return shifts


def _index(ts: FloatArray, t: float) -> int:
    """First sample at or after ``t``."""
    return int(np.searchsorted(ts, t - 1e-6))


def _regimes(
    ts: FloatArray, shifts: list[ShiftWindow], rng: np.random.Generator
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8], IntArray]:
    """State code, reason code and shift number (-1 outside shifts) of every sample."""
    n = len(ts)
    code = np.full(n, STOP, np.int8)
    reason = np.full(n, _REASON["shift_change"], np.int8)
    shift_no = np.full(n, -1, np.int64)

    def paint(a: float, b: float, c: int, r: str | None) -> None:
        i0, i1 = _index(ts, a), _index(ts, b)
        code[i0:i1] = c
        reason[i0:i1] = _REASON[r]

    for k, sh in enumerate(shifts):
        paint(sh.start, sh.end, RUN, None)
        shift_no[_index(ts, sh.start) : _index(ts, sh.end)] = k
        length = sh.end - sh.start
        events: list[tuple[int, tuple[str, ...], tuple[float, float]]] = []
        events += [(SETUP, ("changeover",), SETUP_S)] * int(rng.integers(*SETUP_COUNT))
        events += [(IDLE, ("starved", "blocked"), IDLE_S)] * int(rng.integers(*IDLE_COUNT))
        events += [(DOWN, ("jam", "tool_break"), DOWN_S)] * int(rng.poisson(DOWN_MEAN))
        for c, reasons, (lo, hi) in events:  # later events (DOWN) interrupt earlier ones
            at = sh.start + rng.uniform(0.0, length)
            dur = rng.uniform(lo, hi)
            paint(at, min(at + dur, sh.end), c, reasons[int(rng.integers(len(reasons)))])
        for a, b, r in sh.stops:  # planned stops win over everything
            paint(a, b, STOP, r)
    return code, reason, shift_no


def _state_changes(
    ts: FloatArray, code: npt.NDArray[np.int8], reason: npt.NDArray[np.int8]
) -> list[tuple[float, MachineState, str | None]]:
    key = code.astype(np.int64) * 64 + reason
    at = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return [(float(ts[i]), REGIMES[code[i]], REASONS[reason[i]]) for i in at.tolist()]


def _ambient(cfg: PlantConfig, area: int, ts: FloatArray) -> FloatArray:
    """Hall temperature: base + daily sinusoid peaking mid-afternoon + Ornstein-Uhlenbeck wander."""
    rng = _rng(cfg.seed, 5, area)
    base = rng.uniform(18.0, 24.0)
    amp = rng.uniform(0.5, 2.0)
    phi = math.exp(-cfg.interval_s / AMBIENT_TAU_S)
    shocks = rng.normal(0.0, AMBIENT_SD_C * math.sqrt(1.0 - phi * phi), len(ts))
    wander = _ar1(phi, shocks, rng.normal(0.0, AMBIENT_SD_C))
    hour = (ts % DAY_S) / H
    return base + amp * np.cos(2 * np.pi * (hour - AMBIENT_PEAK_H) / 24.0) + wander


def _onset(
    cfg: PlantConfig, ts: FloatArray, code: npt.NDArray[np.int8], shift_end: FloatArray, kind: str,
    rng: np.random.Generator,
) -> int:
    """A RUNNING sample after the warm-up that leaves room in its shift for the fault (where possible)."""
    need = max(FAULT_DURATION_S[kind], FAULT_WINDOW_S[kind])
    t_end = ts[-1] + cfg.interval_s
    after = ts >= ts[0] + min(WARMUP_S, (t_end - ts[0]) / 2)
    fits = ts + need <= t_end
    running = code == RUN
    for mask in (
        after & fits & running & (shift_end - ts >= need),
        after & fits & running & (shift_end - ts >= need / 2),
        after & fits & running,
        after & running,
        after,
    ):
        candidates = np.flatnonzero(mask)
        if len(candidates):
            return int(candidates[int(rng.integers(len(candidates)))])
    return len(ts) - 1


def generate_plant(cfg: PlantConfig | None = None) -> Plant:
    """Generate the plant described by ``cfg`` (deterministic per configuration).

    Parameters
    ----------
    cfg
        The plant; the default is 24 machines x 3 days at 10 s from Monday 2025-12-01, seed 1.

    Returns
    -------
    Plant
        Values (rounded to 3 decimals like real sensors), state changes, shifts and fault labels.

    Examples
    --------
    >>> p = generate_plant(PlantConfig(machines=1, days=2.0, interval_s=30.0, seed=5))
    >>> f = p.faults[0]
    >>> f.kind, f.metric, f.start_ts >= float(p.ts_s[0]) + 86400
    ('step', 'spindle_temp_c', True)
    >>> 2.0 <= abs(f.magnitude) / f.sigma <= 3.0
    True
    """
    cfg = cfg or PlantConfig()
    specs = _layout(cfg)
    n = cfg.samples
    ts = cfg.start_s + np.arange(n, dtype=np.float64) * cfg.interval_s
    t_end = cfg.start_s + n * cfg.interval_s
    kinds = list(SHIFT_PATTERNS)
    metric_pos = {m: k for k, m in enumerate(cfg.metrics)}
    temp_k, vib_k, power_k = (metric_pos[m] for m in METRICS)
    values = np.empty((cfg.machines, len(cfg.metrics), n))
    ambient: dict[str, FloatArray] = {}
    states: list[list[tuple[float, MachineState, str | None]]] = []
    shifts_all: list[list[ShiftWindow]] = []
    faults: list[PlantFault] = []
    physics: list[MachinePhysics] = []
    for i, spec in enumerate(specs):
        kind = kinds[i % len(kinds)]
        shifts = _calendar(cfg, kind, _rng(cfg.seed, 1, i), t_end)
        code, reason, shift_no = _regimes(ts, shifts, _rng(cfg.seed, 2, i))

        prm = _rng(cfg.seed, 3, i)
        phys = MachinePhysics(
            rated_kw=prm.uniform(6.0, 12.0), base_stop_kw=prm.uniform(0.3, 0.5), base_on_kw=prm.uniform(0.8, 1.5),
            run_load=prm.uniform(0.6, 0.9), vib_base_mm_s=prm.uniform(1.2, 2.8), gain_c=prm.uniform(30.0, 45.0),
            tau_s=prm.uniform(15 * MIN, 30 * MIN), temp_sd_c=prm.uniform(0.1, 0.3),
        )
        physics.append(phys)
        rated_kw, base_stop_kw, base_on_kw = phys.rated_kw, phys.base_stop_kw, phys.base_on_kw
        run_load, vib_base, gain_c, tau_s, temp_sd = (
            phys.run_load, phys.vib_base_mm_s, phys.gain_c, phys.tau_s, phys.temp_sd_c
        )

        setup_starts = (code == SETUP) & np.r_[True, code[1:] != code[:-1]]
        product = np.cumsum(setup_starts)
        factor = 1.0 + prm.uniform(-PRODUCT_CHANGE, PRODUCT_CHANGE, int(product[-1]) + 1)
        load = np.asarray(LOAD)[code]
        running = code == RUN
        load[running] = run_load * factor[product[running]]
        on = (code == RUN) | (code == IDLE) | (code == SETUP)
        vib_level = np.asarray(VIB_LEVEL_MM_S)[code]
        vib_level[running] = vib_base * load[running]

        noise = _rng(cfg.seed, 4, i)
        sd = np.empty((len(METRICS), n))
        sd[temp_k] = temp_sd
        sd[vib_k] = VIB_REL_SD * vib_level
        sd[power_k] = np.asarray(POWER_SD_KW)[code]
        eps = noise.standard_normal((len(METRICS), n))
        if spec.area not in ambient:
            ambient[spec.area] = _ambient(cfg, i // cfg.machines_per_area, ts)
        clean = np.empty((len(METRICS), n))
        clean[temp_k] = ambient[spec.area] + gain_c * lowpass(load, cfg.interval_s, tau_s)
        clean[vib_k] = vib_level
        clean[power_k] = np.where(on, base_on_kw, base_stop_kw) + rated_kw * load
        noise_part = sd * eps
        v = clean + noise_part

        shift_end = np.full(n, -np.inf)
        inside = shift_no >= 0
        shift_end[inside] = np.asarray([s.end for s in shifts])[shift_no[inside]]
        fkind, k = fault_plan(i)
        frng = _rng(cfg.seed, 6, i)
        i0 = _onset(cfg, ts, code, shift_end, fkind, frng)
        t0 = float(ts[i0])
        sigma = float(sd[k, i0])
        duration = FAULT_DURATION_S[fkind]
        i1 = i0 + 1 if duration == 0 else _index(ts, t0 + duration)
        seg = slice(i0, i1)
        if fkind == "step":
            magnitude = float(frng.choice((-1.0, 1.0)) * frng.uniform(2.0, 3.0) * sigma)
            delta = np.full(i1 - i0, magnitude)
        elif fkind == "drift":
            magnitude = 4.0 * sigma
            delta = magnitude * (ts[seg] - t0) / duration
        elif fkind == "spike":
            magnitude = float(frng.choice((-1.0, 1.0)) * 8.0 * sigma)
            delta = np.full(1, magnitude)
        elif fkind == "stuck":
            magnitude = float(np.round(v[k, i0], 3))
            delta = magnitude - v[k, seg]
        elif fkind == "variance":
            magnitude = 3.0
            delta = (magnitude - 1.0) * noise_part[k, seg]
        else:  # dropout
            magnitude = 0.0
            delta = -v[k, seg]
        if cfg.inject_faults:
            v[k, seg] += delta
            if fkind in ("stuck", "dropout"):
                v[k, seg] = magnitude  # exact, not a sum that rounds differently
        values[i] = np.round(v, 3)
        for metric, step in cfg.resolution.items():
            q = cfg.metrics.index(metric)
            values[i, q] = np.round(np.round(values[i, q] / step) * step, 9)
        faults.append(PlantFault(
            spec.name, spec.site, spec.area, spec.line, cfg.metrics[k], fkind, t0, t0 + duration,
            FAULT_WINDOW_S[fkind], sigma, magnitude,
        ))
        states.append(_state_changes(ts, code, reason))
        shifts_all.append(shifts)
    return Plant(cfg, specs, cfg.metrics, ts, values, states, faults, shifts_all,
                 [kinds[i % len(kinds)] for i in range(cfg.machines)], physics)


def replay_records(plant: Plant, *, state_channel: bool, span_s: float = 600.0,
                   sensors: str = "all") -> Iterator[dict[str, Any]]:
    """The plant as broker messages in time order: ``{"topic": ..., "payload": {...}}`` dicts.

    Per machine and ``span_s`` span, its state changes in that span (when ``state_channel``), then one
    columnar telemetry message; all machines' span k come before span k+1, as a broker would deliver
    devices that publish a state change at once and their telemetry in blocks. ``sensors="faulty"``:
    each machine sends only the metric its fault is on (machines with a single sensor: every series
    alone on its machine, no sibling to model it by).

    Parameters
    ----------
    plant
        A generated plant.
    state_channel
        Also yield the ``.../state`` messages (``{"ts", "state", "reason"}``).
    span_s
        Seconds of telemetry per columnar message.
    sensors
        ``"all"`` (every metric) or ``"faulty"`` (only the one with the machine's fault).

    Yields
    ------
    dict
        ``{"topic": "factory/<site>/<area>/<line>/<machine>/<telemetry|state>", "payload": {...}}``.

    Examples
    --------
    >>> p = generate_plant(PlantConfig(machines=2, days=1.25, interval_s=60.0))
    >>> recs = list(replay_records(p, state_channel=False, span_s=3600.0))
    >>> len(recs), len(recs[0]["payload"]["ts"]), sorted(recs[0]["payload"]["values"])
    (60, 60, ['power_kw', 'spindle_temp_c', 'vibration_mm_s'])
    >>> [sorted(r["payload"]["values"]) for r in replay_records(p, state_channel=False, sensors="faulty")][:2]
    [['spindle_temp_c'], ['vibration_mm_s']]
    """
    if sensors not in SENSORS:
        raise ValueError(f"sensors must be {' or '.join(map(repr, SENSORS))}, got {sensors!r}")
    faulty = {f.machine: f.metric for f in plant.faults}
    sent = [[k for k, name in enumerate(plant.metrics) if sensors == "all" or faulty.get(s.name) == name]
            for s in plant.specs]
    ts = plant.ts_s
    bounds = np.arange(ts[0], ts[-1] + span_s, span_s)
    edges = [*np.searchsorted(ts, bounds - 1e-6).tolist(), len(ts)]
    ts_list = ts.tolist()
    jitter = plant.config.clock_jitter_s
    stamps = [ts_list if not jitter else
              np.round(ts + _rng(plant.config.seed, 7, m).uniform(-jitter, jitter, len(ts)), 6).tolist()
              for m in range(len(plant.specs))]
    columns = [[plant.values[m, k].tolist() for k in range(len(plant.metrics))] for m in range(len(plant.specs))]
    state_ts = [np.asarray([s[0] for s in st]) for st in plant.states]
    state_edges = [[*np.searchsorted(st, bounds - 1e-6).tolist(), len(st)] for st in state_ts]
    topics = [(s.topic("factory", "telemetry"), s.topic("factory", "state")) for s in plant.specs]
    for span in range(len(bounds)):
        a, b = edges[span], edges[span + 1]
        for m in range(len(plant.specs)):
            if state_channel:
                for t, state, reason in plant.states[m][state_edges[m][span] : state_edges[m][span + 1]]:
                    payload: dict[str, Any] = {"ts": t, "state": state.value}
                    if reason is not None:
                        payload["reason"] = reason
                    yield {"topic": topics[m][1], "payload": payload}
            if b > a:
                yield {"topic": topics[m][0], "payload": {
                    "ts": stamps[m][a:b],
                    "values": {plant.metrics[k]: columns[m][k][a:b] for k in sent[m]},
                }}


def write_replay(plant: Plant, path: Path, *, state_channel: bool, span_s: float = 600.0,
                 sensors: str = "all") -> int:
    """Write :func:`replay_records` as JSON lines (what ``factory-gateway replay --input`` reads)."""
    n = 0
    with open(path, "wb") as fh:
        for rec in replay_records(plant, state_channel=state_channel, span_s=span_s, sensors=sensors):
            fh.write(orjson.dumps(rec) + b"\n")
            n += 1
    return n
