"""The machine model: what normal looks like for a machine on a real shop floor.

Every series (machine × metric) is explained by two models, and the one whose recent absolute error is
lower is used (chosen per series, online):

- **Own operating levels.** A machine has a few operating levels (stopped, idle, setup, running); each
  metric that follows the load at once (power, current, vibration) sits at one level per regime with its
  own noise. The level is the state channel's regime when the machine sends one, else the nearest of up
  to six levels learned from the series itself (a sample further than ``z_join`` σ from every level
  opens a new one once ``n_new`` such samples agree). The state channel and the telemetry come from
  different clocks (a PLC, a sensor gateway) and a regime changes between two samples: a sample within
  one of its intervals of a state change (before an event already received, or after the one in force)
  takes whichever of the two regimes' levels explains it better (a regime not seen yet: if the sample is
  beyond ``z_join`` σ of the other), and a regime's level of fewer than ``n_new`` samples that a sample
  is that far from starts again at it (its first reading was not its own). A recurring start, break or
  stop moves between known levels and scores low; a step, drift, spike or noise change inside a level does not. Each
  visit of a level learns its own offset over its first ``visit_samples`` samples (a new product
  after a setup); meanwhile ``z`` carries that estimate's uncertainty (the level's spread of visit
  offsets, then ``σ²/n``) and neither the CUSUM nor the noise statistic sums. Later samples within
  ``clip`` σ keep refining it as a running mean (a fault of 2 σ or more is the CUSUM's within a few
  samples, long before a mean of the whole visit moves); after a CUSUM alarm the offset is learned anew, as a
  chart restarts after a signal (a running mean that followed a drift would otherwise hold the drift's
  return against the series for the rest of the visit). A regime switch moves every metric at once:
  when a sibling that its own levels explain jumps (more than ``z_join`` σ) to another level, a series
  that stayed in its level starts a new visit too (without a state channel, idle and setup may share
  one vibration level; the offset learned while idle must not be held against the setup).
- **Lagged load (cross-metric).** A metric that follows the load through a lag (temperature) is
  predicted by recursive least squares from a sibling metric's level mean passed through first-order
  lags of 7.5, 15, 30 and 60 min (their combination fits any thermal time constant from about 10 to 45
  min within 1 %), and its stopped indicator (the state channel's stopped regime, else the sibling's
  lowest level) through 10 and 40 min (a machine switched off drops its base load too; a fit starts anew
  when its sibling's lowest level changes); a change of the input between two samples counts from half
  way through the interval (where it fell is unknown; taken at once, the prediction led the reading by up
  to 2.7 σ at 30-second sampling), minus the peers' common mode: the robust mean error of the
  same metric on the other machines of the same site and area (the hall's ambient daily cycle and
  wander), used when the group has ``min_peers`` machines; a peer's sample its own model puts beyond
  ``clip`` σ (a dropout, a spike, a fault) counts only by a Huber weight, so one machine's fault does
  not move its peers' scores. The sibling's *level mean* is the input, not
  its raw reading, so a fault of the sibling sensor does not leak into this metric. The fit's error σ
  widens while the response to a load change is still to come: σ² = max(E2, v0 + v1·r²), ``r`` the part
  of the response still ahead (a fixed lag basis misfits a transient by a fraction of its size), ``E2``
  the day-long error variance.

The standardised error ``z`` of the model in use feeds four statistics, each a detector by name:

======================  =====================================================  ======================
detector                statistic                                              alarm (score 0.5) at
======================  =====================================================  ======================
``residual_spike``      ``|z|``, or the error against its local mean (50 s,   ``z_spike`` σ
                        at least 2 samples; anew with each visit of a level)
                        in the level's fast noise, or (one sample
                        late) an isolated excursion to another level
``residual_cusum``      two-sided CUSUM of ``z`` in its long-run σ, allowance   ``S = h`` (below)
                        ``cusum_k`` (own-level model); for a series the lag
                        model explains, the larger of the same CUSUM of the
                        error every fit agrees on and a jump CUSUM (its error
                        minus a local linear trend's forecast)
``residual_variance``   EWMA over ``variance_memory`` samples of the            ``variance_alarm``
                        difference variance ``(e_t - e_{t-1})² / 2`` of the
                        error, as a ratio to the level's day-long one
``stuck``               identical readings in a row                            ``log(stuck_p)/log(p)``
======================  =====================================================  ======================

The CUSUM's ``z`` is scaled by ``√((1-ρ)/(1+ρ))``, ``ρ`` the day-long lag-1 autocorrelation of ``z`` (at
most 0.95): what a model's slow misfit leaves behind is autocorrelated, and an autocorrelated residual sums
like an independent one of variance ``(1+ρ)/(1-ρ)``, so unscaled it would cross ``h`` with no fault. A
series the lag model explains (temperature) carries that model's slow misfit, as large as the faults sought
and as slow (a fixed lag basis fits a response to a fraction of its size; the peers' common mode fits the
hall's ambient to a fraction of a degree). Two CUSUMs watch it. The plain one sums the error that **every**
fitted lag model of the series agrees on (against each sibling input, in each fit's σ: the one nearest zero
where their signs agree, else zero), in the long-run σ above: a test per model, alarmed only when all would
be (an intersection-union test, at the level of each). A step or drift of the series' own sensor moves its
error against every model; a fault of one input (its power sensor steps while the load does not) moves it
against that input's fit only, and is left to the input's own statistics. It holds at zero while the load
input is still to move (below), where the fits' misfit is largest, and restarts when the model in use
changes. The slow misfit still widens its σ, so a step it hides is the second CUSUM's, a **jump CUSUM**: the
error minus the one-step forecast of a local linear trend (Brown's double exponential smoothing over 160 s,
which follows a misfit's level and slope), in that forecast error's own long-run σ, widened while the
response to a load change is still moving. A temperature cannot jump; a sensor fault does. It sums once the
trend has learned over its memory, and restarts when the model in use changes; while the load input is still
to move (a pending reading of the sibling, or its visit's offset still learned) its sums hold off at zero
but its trend keeps learning (one odd reading of the sibling must not cost the trend its memory); a re-fit
of the lag model moves the trend with the prediction. The memory is a time, 160 s, a third of the shortest
lag (7.5 min), so the trend follows a thermal response's curve at any sampling rate: 16 samples at 10 s,
over which a 2.5 σ step (the middle of the 2-3 σ steps to find) sums to ≈ ``h`` before the trend absorbs it;
2.7 at 60 s (16 samples there spanned 16 minutes, and the trend missed the curve of every warm-up: 2.35
false alarms per machine-day on a 60-second plant without a state channel, now 1.08; 0.42 -> 0.08 with one).
One sample counts at most ``h + k`` σ in it: alone it alarms there (a Shewhart chart at ``h + k`` inside the
CUSUM, Lucas' combined scheme), which finds an 8 σ spike of a sensor whose model's σ is twice its noise.
What neither CUSUM sees is a slow drift of a lag-modelled series smaller than the misfit.

Both CUSUMs sum one value per 10 s (``kernels.CUSUM_BLOCK_S``, the jump CUSUM's design point: 16 of them in
its trend's memory): samples closer together are averaged over a block of 10 s (weighted by the time each
covers), and ``h`` is the one of a 10-s interval. The faults they look for last half an hour and more, and a
second's samples add no evidence of a sustained shift that their 10-s mean lacks, but summed one by one they
added sums of the model's slow misfit, correlated over minutes, which neither the lag-1 ρ nor ``h`` in time
takes out: one sample a second alarmed 2.5-2.9 times per machine-day (the bench's plant), now 0.4-0.6 with a
state channel. Samples 10 s apart or more (to within half a sample: from 6.7 s) are each a block of their own,
the same statistic as without blocks.

The noise statistic uses consecutive differences, which are blind to a slow misfit or an offset (those
are the CUSUM's), in the series' units (``z``'s σ changes with the model in use), and compares them with
the current level's long-run difference variance (noise depends on the load). The reference learns
every difference, clipped at ``clip``² times itself, over the level's memory (``level_memory_s``, and at
least 100 samples: at one reading an hour a day is 24, fewer than the short ratio's own 30): tripled
noise stays an alarm for hours, and a lasting change of noise (a new tool, a noisier product mix) becomes
the level's normal within the day. (A reference that stopped learning while the short ratio was high kept
the noise of the quiet moments and alarmed for days where products differ in noise.) A lone series keeps
that rule (no machine to say what it does: its noise change stays news while it lasts; NAB's seven files
score 59.2 standard but 37.3 held out with it dropped there, 58.3 and 53.8 with it). A difference that
straddles two levels (a jump beyond ``z_join`` σ, or a level just opened by samples far from every
level) or two models is no noise and teaches nothing; after a jump the short ratio starts anew, the new
level's to learn.

No noise statistic is finer than the series' resolution, the smallest change between two readings seen:
a quiet level read by a coarse sensor (a stopped machine's vibration at 0.01 mm/s) is a constant that flips
by one step now and then, and with its learned σ far below the step every flip was a 10 σ spike (38 false
alarms per machine-day on the bench's plant read at 0.1 °C, 0.01 mm/s and 0.01 kW).

A spike may land near another known level: without a state channel a machine that makes several
products has a running level per product, a few σ apart, and an 8 σ spike on one can sit next to
another's mean, where it scores low. So a jump to another level is scored again at the next sample: back
in the level it left, the jump was an isolated excursion, and its size against its two neighbours,
``d = x_t - (x_{t-1} + x_{t+1}) / 2``, in that level's fast noise (``var(d) = 1.5 σ²``; at least the
series' typical step, since a noisy level split in two close ones underestimates both halves' noise) is
the spike statistic of that next sample. A real switch stays in its new level and is not scored. Two
levels of a machine's series whose means come within ``z_join / 2`` σ of each other (the larger σ) are
merged: one noisy level split in two close ones, its readings chattering between them, understates both
halves' noise. (Not those of a lone series: its levels are bins of whatever it measures, not regimes.)

where ``p`` is the series' own rate of identical consecutive readings in its current level (a
quantised sensor repeats itself more often; a stuck one repeats itself far longer than its rate
allows). Levels, fits and peers learn from Huber-clipped errors (``clip`` σ), and a level not from a
stuck run, so a fault is not absorbed while it lasts. ``visit_samples`` = 16: the visit offset's error
σ/√16 is a quarter of the CUSUM's allowance.

Parameters are set by principle, not fitted: ``cusum_k`` = 1 σ is half the smallest step to find
(2 σ); the CUSUMs' decision interval ``h`` gives an in-control run length of ``cusum_arl_days`` = 14 days
per side at the series' sampling interval (Siegmund's approximation, :func:`gateway.detect.kernels.cusum_h`:
5.0 σ at 10 s and faster, 4.1 at 60 s; a fixed ``h`` in samples would alarm twice as often a day at twice
the rate), and ``cusum_h`` = 5 on a lone series, whose scores are calibrated against their own
distribution (at its own rate) and for which ``h`` only restarts the sums; ``z_spike`` = 5 σ
has a Gaussian tail of 6·10⁻⁷ (0.015 false alarms per machine-day of 3 metrics at 10 s, 1/60 of a
budget of one); memories are physical (a day for levels and fits, 15 min for the
hall's common mode).

>>> import numpy as np
>>> mm = MachineModel(MachineModelParams(), grace=30)
>>> rng = np.random.default_rng(1)
>>> t = np.arange(2000)
>>> run = (t // 200) % 2 == 1                       # the machine starts and stops every 200 samples
>>> power = np.where(run, 8.0, 1.0) + rng.normal(0, 0.05, t.size)
>>> power[1500] += 1.0                              # a 20 σ spike while running
>>> res = mm.run(np.zeros(t.size, np.int64), t * 10**10, power)
>>> flagged = {d: np.flatnonzero(s >= 0.5).tolist() for d, s in res.scores.items()}
>>> flagged["residual_spike"]     # each level is new once (warm-up); later starts and stops are normal
[200, 201, 1500]
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway.batch import F64, I64, MachineKey, StateEvent, room_for
from gateway.checkpoint import State
from gateway.detect import kernels as K
from gateway.detect.base import squash
from gateway.schema import MachineState

_LONG_AGO = -(2**62)

__all__ = ["MODEL_DETECTORS", "REGIME_OF_STATE", "MachineModel", "MachineModelParams", "ModelResult", "subset_breaks",
           "warm_up"]

MODEL_DETECTORS: tuple[str, ...] = ("residual_spike", "residual_cusum", "residual_variance", "stuck")

# The state channel's regimes: the level index a sample belongs to (stopped, running, idle, setup).
REGIME_OF_STATE: dict[MachineState, int] = {
    MachineState.DOWN: 0,
    MachineState.PLANNED_STOP: 0,
    MachineState.RUNNING: 1,
    MachineState.IDLE: 2,
    MachineState.SETUP: 3,
}


class MachineModelParams(BaseModel):
    """``[detect.machine]``: the machine model shared by the four ``residual_*``/``stuck`` detectors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    z_join: float = Field(6.0, gt=0, description="A sample within this many σ of a level belongs to it.")
    n_new: int = Field(3, ge=1, description="Consecutive samples far from every level that open a new one.")
    level_memory_s: float = Field(86400.0, gt=0, description="Memory of levels, noise and fits (seconds); at least "
                                  "100 samples when readings are sparser (a day of hourly readings is 24).")
    cusum_k: float = Field(1.0, ge=0, description="CUSUM allowance in σ (half the smallest step to find).")
    cusum_h: float = Field(5.0, gt=0, description="CUSUM decision interval in σ (score 0.5 there) of a lone "
                           "series (its scores calibrated, see [detect.likelihood]); of every series if cusum_arl_days "
                           "is 0.")
    cusum_arl_days: float = Field(
        14.0, ge=0, description="In-control run length of each CUSUM side, in days, of a series with sibling metrics: "
        "its decision interval h follows the sampling interval so that a series with nothing wrong alarms once in "
        "this time per side at any rate (Siegmund's approximation: h = 5.0 σ at 10 s, 4.1 at 60 s; faster than 10 s "
        "the CUSUMs sum 10-s blocks, and h is theirs); "
        "0: cusum_h at every rate.")
    variance_memory: int = Field(30, ge=2, description="Samples of memory of the EWMA of the noise variance ratio.")
    variance_alarm: float = Field(4.0, gt=1, description="Noise variance ratio (short / long-run) alarmed at.")
    z_spike: float = Field(5.0, gt=0, description="|z| alarmed at.")
    stuck_p: float = Field(1e-6, gt=0, lt=1, description="Run of identical readings as improbable as this.")
    stuck_min: int = Field(10, ge=2, description="Never alarm a run shorter than this.")
    peer_memory_s: float = Field(900.0, gt=0, description="Memory of the peers' common mode (seconds).")
    min_peers: int = Field(3, ge=2, description="Machines of a site × area × metric needed for a common mode.")
    clip: float = Field(3.0, gt=0, description="Learning clips errors at this many σ (Huber).")
    visit_samples: int = Field(
        16, ge=0, description="Samples at the start of each visit of a level that learn the visit's own offset "
        "(a new product or load after a setup); 0 = off.")


@dataclass(slots=True)
class ModelResult:
    """Scores in [0, 1] per detector, the model's expected value and z, parallel to the input."""

    scores: dict[str, F64]
    expected: F64
    zscore: F64
    lone: npt.NDArray[np.bool_] | None = None  # per sample: no sibling metric had a sample yet


class MachineModel:
    """Per-series, per-machine and per-group state in flat arrays; :meth:`run` scores then learns a batch.

    Series ids index the series arrays; ``machines`` (the machine of each series id) groups series into
    machines (siblings) and site × area × metric peer groups. Without it every series is its own machine.
    """

    # a batch this large or larger is split between the threads (below it a thread costs more than it saves)
    parallel_min_rows = 4096
    # a large batch runs in parts of about this many rows, one after another (a plant part is never split): the
    # state of one part's series then stays in the CPU's caches (10,000 series × 100 samples: ~30 % faster)
    run_rows = 65_536

    def __init__(self, params: MachineModelParams, grace: int = 30, threads: int = 1) -> None:
        self.params = params
        self.grace = int(grace)
        self.threads = max(1, int(threads))
        p = params
        self._prm = np.array([
            float(grace), p.z_join, float(p.n_new), p.level_memory_s, p.cusum_k, p.cusum_h,
            1.0 / p.variance_memory, p.z_spike, p.stuck_p, float(p.stuck_min), p.level_memory_s,
            p.peer_memory_s, float(p.min_peers), p.variance_alarm, p.clip, float(p.visit_samples),
            p.cusum_arl_days * 86400.0,
        ], np.float64)
        self.s_state = np.zeros((0, K.N_S))
        self.s_lev = np.zeros((0, K.K_LEVELS, K.N_L))
        self.s_lag = np.zeros((0, K.N_SIB, K.N_J))
        self.s_sib = np.full((0, K.N_SIB), -1, np.int64)
        self.s_group = np.full(0, -1, np.int64)
        self.s_mach = np.zeros(0, np.int64)
        self.m_state = np.full(0, -1, np.int64)
        self.m_evt = np.full(0, _LONG_AGO, np.int64)  # per machine: time of the state event in force
        # state events no sample of their machine has reached yet: (machine, ts, regime), by machine then
        # arrival; one applies once a sample that arrived after it is at least as new
        self.pending = np.zeros((0, 3), np.int64)
        self.g_state = np.zeros((0, K.N_G))
        self.g_members = np.zeros(0, np.float64)
        self._machine_ids: dict[object, int] = {}
        self._machine_series: list[list[int]] = []  # per machine: its first K.N_SIB series (the siblings)
        self._group_ids: dict[tuple[str, str, str], int] = {}
        self._buffers: dict[str, npt.NDArray[Any]] = {}  # name -> the buffer a per-series array is a view of
        # per machine: its part of the plant, a site × area (peer groups never span two), which shares no
        # state with any other; machines without a site and area are each a part of their own
        self._part_ids: dict[object, int] = {}
        self._machine_part: list[int] = []
        self.m_part = np.zeros(0, np.int64)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def n_series(self) -> int:
        return int(self.s_state.shape[0])

    # per-series arrays: views of the used rows of a buffer with room to grow (capacity doubles), so a
    # batch of new series neither copies every array (np.concatenate per batch did: heap slack of the
    # old copies) nor touches the spare rows (np.zeros: pages are mapped when first written)
    _SERIES_FILL: tuple[tuple[str, float], ...] = (
        ("s_state", 0.0), ("s_lev", 0.0), ("s_lag", 0.0), ("s_sib", -1), ("s_group", -1), ("s_mach", 0))

    def _grow_series(self, needed: int) -> None:
        have = self.n_series
        for name, fill in self._SERIES_FILL:
            cur: npt.NDArray[Any] = getattr(self, name)
            buf = self._buffers.get(name)
            if buf is None or cur.base is not buf:  # first, or restored: grow from the array itself
                buf = cur
            grown = room_for(buf, have, needed, fill)
            if grown is buf:  # spare rows of a buffer may hold what a smaller restore left
                grown[have:needed] = fill
            self._buffers[name] = grown
            setattr(self, name, grown[:needed])

    def machine_id(self, key: object) -> int:
        mid = self._machine_ids.get(key)
        if mid is None:
            mid = len(self._machine_ids)
            self._machine_ids[key] = mid
            self._machine_series.append([])
            part = (key.site, key.area) if isinstance(key, MachineKey) else ("machine", mid)
            self._machine_part.append(self._part_ids.setdefault(part, len(self._part_ids)))
        return mid

    def _register(self, needed: int, machines: Sequence[MachineKey] | None, metrics: Sequence[str] | None) -> None:
        """Allocate state for series ids below ``needed``: machine, siblings, peer group (once per series)."""
        have = self.n_series
        if needed <= have:
            return
        self._grow_series(needed)
        groups_before = len(self._group_ids)
        for sid in range(have, needed):
            key: object = machines[sid] if machines is not None and sid < len(machines) else ("series", sid)
            mid = self.machine_id(key)
            self.s_mach[sid] = mid
            members = self._machine_series[mid]
            for other in members[: K.N_SIB]:  # siblings: the machine's first metrics, both ways
                for a, b in ((sid, other), (other, sid)):
                    row = self.s_sib[a]
                    free = np.flatnonzero(row < 0)
                    if free.shape[0] and b not in row:
                        row[free[0]] = b
            if len(members) < K.N_SIB:  # only the first are ever siblings: no list of every series
                members.append(sid)
            if isinstance(key, MachineKey) and metrics is not None and sid < len(metrics):
                gk = (key.site, key.area, metrics[sid])
                g = self._group_ids.setdefault(gk, len(self._group_ids))
                self.s_group[sid] = g
        ng = len(self._group_ids)
        if ng > groups_before:
            self.g_state = np.concatenate((self.g_state, np.zeros((ng - groups_before, K.N_G))))
        counts = np.zeros(ng, np.float64)  # members are counted by the kernel at their first sample
        counts[: self.g_members.shape[0]] = self.g_members
        self.g_members = counts
        self._grow_machines()

    def _grow_machines(self) -> None:
        """One regime slot per known machine (-1: no state channel seen)."""
        add = len(self._machine_ids) - self.m_state.shape[0]
        if add > 0:
            self.m_state = np.concatenate((self.m_state, np.full(add, -1, np.int64)))
            self.m_evt = np.concatenate((self.m_evt, np.full(add, _LONG_AGO, np.int64)))

    def prepare(self, series: I64, machines: Sequence[MachineKey] | None = None, metrics: Sequence[str] | None = None,
                machine_list: Sequence[MachineKey] | None = None) -> I64:
        """Number the machines of ``machine_list`` and allocate the series below ``series.max()`` (what
        :meth:`run` does first); return the machine of each sample."""
        if machine_list is not None and len(machine_list) > len(self._machine_ids):
            for key in machine_list[len(self._machine_ids):]:
                self.machine_id(key)
            self._grow_machines()
        if series.shape[0]:
            self._register(int(series.max()) + 1, machines, metrics)
        return self.s_mach[series]

    def run(
        self, series: I64, ts_ns: I64, values: F64, *, machines: Sequence[MachineKey] | None = None,
        metrics: Sequence[str] | None = None, states: Sequence[StateEvent] = (),
        state_rows: Sequence[int] | I64 | None = None, machine_list: Sequence[MachineKey] | None = None,
        group_breaks: Sequence[int] | I64 | None = None,
    ) -> ModelResult:
        """Score every sample against the state before it, then learn it (in the order given: arrival).

        ``states`` are the batch's state-channel events; a machine that sent one is modelled by regime.
        ``state_rows[k]`` is the number of samples that arrived before ``states[k]`` (default: 0, before
        them all): an event applies to its machine's samples that arrived after it and are at least as
        new as it; one older than the machine's current event is stale. ``machine_list`` (the series
        registry's machines by id): machines are numbered as there, not in the order this model meets them,
        so the numbering does not depend on where batches are cut either. ``group_breaks``: rows where a
        message starts at the timestamp of the row before it (one machine's samples at one timestamp are
        modelled together, but never across two messages: a batch may be cut between them).
        """
        series = np.ascontiguousarray(series, np.int64)
        ts_ns = np.ascontiguousarray(ts_ns, np.int64)
        values = np.ascontiguousarray(values, np.float64)
        n = int(series.shape[0])
        self.prepare(series, machines, metrics, machine_list)
        ev = self.pending
        pos = np.full(ev.shape[0], -1, np.int64)  # the pending events arrived before this batch
        if states:
            new = np.array([(self.machine_id(e.machine), e.ts_ns, REGIME_OF_STATE.get(e.state, 0)) for e in states],
                           np.int64)
            ev = np.concatenate((ev, new))
            rows = np.zeros(len(states), np.int64) if state_rows is None else np.asarray(state_rows, np.int64)
            pos = np.concatenate((pos, rows))
            self._grow_machines()
        raw = np.zeros((n, len(K.CHANNELS)))
        expected = np.zeros(n)
        z = np.zeros(n)
        lone = np.ones(n, np.bool_)
        if n or ev.shape[0]:
            o = np.lexsort((pos, ev[:, 0]))  # by machine, then arrival (stable: the pending ones first)
            ev, pos = ev[o], pos[o]
            done = np.ones(ev.shape[0], np.int64)
            mach = self.s_mach[series]
            brk = np.empty(0, np.int64) if group_breaks is None else np.asarray(group_breaks, np.int64)

            def step(rows: I64, e: I64, e_pos: I64, e_done: I64) -> None:
                K.step_batch(rows, series, mach, ts_ns, values, brk, np.ascontiguousarray(e[:, 0]),
                             np.ascontiguousarray(e[:, 1]), np.ascontiguousarray(e[:, 2]), e_pos, e_done,
                             self.s_state, self.s_lev, self.s_lag, self.s_sib, self.s_group, self.m_state,
                             self.m_evt, self.g_state, self.g_members, self._prm, raw, expected, z, lone)

            threads = self.threads if n >= self.parallel_min_rows else 1
            work = self._parts(mach, ev[:, 0], threads, n // self.run_rows)
            if not work:
                step(np.arange(n), ev, pos, done)
            else:  # the parts share no state: each thread's in turn (the step releases the GIL), this one's included

                def steps(runs: list[tuple[I64, npt.NDArray[np.bool_]]]) -> None:
                    for rows, em in runs:
                        d = done[em]  # (a copy: the runs' events are disjoint, so are their writes back)
                        step(rows, ev[em], pos[em], d)
                        done[em] = d

                futures = []
                if len(work) > 1:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="machine-model")
                    futures = [self._pool.submit(steps, runs) for runs in work[1:]]
                steps(work[0])
                for f in futures:
                    f.result()
            self.pending = ev[done == 0]
        p = self.params
        scores = {
            "residual_spike": squash(raw[:, 0], p.z_spike),
            "residual_cusum": squash(raw[:, 1], 1.0),
            "residual_variance": squash(np.maximum(raw[:, 2] - 1.0, 0.0), p.variance_alarm - 1.0),
            "stuck": squash(raw[:, 3], 1.0),
        }
        return ModelResult(scores, expected, z, lone)

    def set_threads(self, threads: int) -> None:
        """Run the step on ``threads`` threads from the next batch on (the state is the same either way)."""
        threads = max(1, int(threads))
        if threads != self.threads and self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.threads = threads

    def _parts(self, mach: I64, ev_mach: I64, threads: int,
               runs: int) -> list[list[tuple[I64, npt.NDArray[np.bool_]]]]:
        """Split a batch by plant part into at least ``runs`` runs (as the parts allow) dealt to ``threads``:
        per thread with rows, its runs' ``(rows, event mask)``; ``[]`` when one run would do.

        Parts are dealt by their row counts, largest first, into contiguous runs of about equal load (a part
        is never split), and the runs in contiguous blocks to the threads, so where a part runs changes
        nothing but time.
        """
        if len(self._machine_part) > self.m_part.shape[0]:  # machines numbered since (or restored)
            self.m_part = np.array(self._machine_part, np.int64)
        n_parts = len(self._part_ids)
        part_of_row = self.m_part[mach]
        load = np.bincount(part_of_row, minlength=n_parts)
        n_runs = min(max(threads, runs), int(np.count_nonzero(load)), 4096)
        if n_runs < 2:
            return []
        by_load = np.argsort(-load, kind="stable")
        before = np.cumsum(load[by_load]) - load[by_load]
        run = np.empty(n_parts, np.int64)
        run[by_load] = np.minimum(n_runs - 1, before * n_runs // int(load.sum()))
        run_of_row = run[part_of_row].astype(np.uint16)  # (16 bits: a radix sort)
        order = np.argsort(run_of_row, kind="stable")  # rows by run, ascending within each
        ends = np.cumsum(np.bincount(run_of_row, minlength=n_runs))
        run_of_ev = run[self.m_part[ev_mach]]
        work: list[list[tuple[I64, npt.NDArray[np.bool_]]]] = [[] for _ in range(threads)]
        for r in range(n_runs):
            rows = order[(ends[r - 1] if r else 0):ends[r]]
            if rows.shape[0]:
                work[r * threads // n_runs].append((rows, run_of_ev == r))
        return [w for w in work if w]

    def reset(self) -> None:
        """Forget everything."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.__init__(self.params, self.grace, self.threads)  # type: ignore[misc]

    _ARRAYS = ("s_state", "s_lev", "s_lag", "s_sib", "s_group", "s_mach", "m_state", "m_evt", "pending", "g_state",
               "g_members")

    def snapshot(self) -> State:
        """Series, machine and peer-group arrays and their numbering (see :mod:`gateway.checkpoint`)."""
        machines = [[k.site, k.area, k.line, k.machine] if isinstance(k, MachineKey) else list(k)  # type: ignore[call-overload]
                    for k in self._machine_ids]
        return State({"machines": machines, "groups": [list(g) for g in self._group_ids]},
                     {name: getattr(self, name).copy() for name in self._ARRAYS})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot`."""
        self.reset()
        arrays = {name: state.array(name) for name in self._ARRAYS}
        for name, arr in arrays.items():
            old = getattr(self, name)
            if arr.dtype != old.dtype or arr.shape[1:] != old.shape[1:]:
                raise ValueError(f"machine model: {name} has shape {arr.shape} {arr.dtype}")
            setattr(self, name, np.array(arr, old.dtype))
        for k in state.meta["machines"]:
            self.machine_id(MachineKey(*k) if len(k) == 4 else (str(k[0]), int(k[1])))
        self._group_ids = {(str(a), str(b), str(c)): i for i, (a, b, c) in enumerate(state.meta["groups"])}
        for sid, mid in enumerate(self.s_mach.tolist()):
            if len(self._machine_series[mid]) < K.N_SIB:
                self._machine_series[mid].append(sid)


def subset_breaks(kept: I64, mach: I64, ts_ns: I64, breaks: I64) -> I64:
    """The group breaks of the rows ``kept`` (ascending) of a batch whose rows have machines ``mach``,
    times ``ts_ns`` and breaks ``breaks``: every group boundary between two kept rows stays one (where
    rows between them were left out, say), so which rows a group holds does not depend on what else
    the batch held.

    >>> mach, ts = np.array([1, 2, 1, 1]), np.array([5, 5, 5, 5])  # row 1 (another machine) left out:
    >>> subset_breaks(np.array([0, 2, 3]), mach, ts, np.array([], np.int64)).tolist()  # rows 0 and 2 stay apart
    [1]
    """
    n = mach.shape[0]
    bnd = np.zeros(n, np.int64)
    if n > 1:
        bnd[1:] = (mach[1:] != mach[:-1]) | (ts_ns[1:] != ts_ns[:-1])
    b = breaks[breaks < n]
    bnd[b] = 1
    cs = np.cumsum(bnd)  # boundaries at rows <= r
    return np.flatnonzero(cs[kept[1:]] - cs[kept[:-1]] > 0) + 1


def warm_up() -> None:
    """Load the compiled step now (numba's on-disk cache, or a compile), not inside the first batch.

    The load takes ~0.4 s; done on the event loop in a fresh gateway's first flush it held the first
    second of messages (p99 arrival -> visible at 5,000 msg/s over 20 s: ~770 ms instead of ~285 ms).

    >>> warm_up()  # a throwaway model: no detector's state is touched
    """
    from gateway.detect.base import BatchLayout  # the lone-series kernels too (calibration, time-of-day profile)
    from gateway.detect.likelihood import LikelihoodParams, ScoreLikelihood
    from gateway.detect.seasonal import SeasonalParams, SeasonalProfile

    MachineModel(MachineModelParams(), grace=1).run(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1))
    lay = BatchLayout.build(np.zeros(1, np.int64))
    ScoreLikelihood(LikelihoodParams(), grace=1).run(lay, np.ones((1, 1)))
    SeasonalProfile(SeasonalParams(), grace=1).run(lay, np.ones(1), np.zeros(1), np.ones(1, np.bool_))
