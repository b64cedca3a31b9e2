"""The machine model: what normal looks like for a machine on a real shop floor.

Every series (machine × metric) is explained by two models, and the one whose recent absolute error is
lower is used (chosen per series, online):

- **Own operating levels.** A machine has a few operating levels (stopped, idle, setup, running); each
  metric that follows the load at once (power, current, vibration) sits at one level per regime with its
  own noise. The level is the state channel's regime when the machine sends one, else the nearest of up
  to four levels learned from the series itself (a sample further than ``z_join`` σ from every level
  opens a new one once ``n_new`` such samples agree). A recurring start, break or stop moves between
  known levels and scores low; a step, drift, spike or noise change inside a level does not.
- **Lagged load (cross-metric).** A metric that follows the load through a lag (temperature) is
  predicted by recursive least squares from a sibling metric's level mean passed through first-order
  lags of 7.5, 15, 30 and 60 min (their combination fits any thermal time constant from about 10 to
  45 min within 1 %), minus the peers' common mode: the robust mean error of the same metric on the
  other machines of the same site and area (the hall's ambient daily cycle and wander), used when the
  group has ``min_peers`` machines. The sibling's *level mean* is the input, not its raw reading, so a
  fault of the sibling sensor does not leak into this metric.

The standardised error ``z`` of the model in use feeds four statistics, each a detector by name:

======================  =====================================================  ======================
detector                statistic                                              alarm (score 0.5) at
======================  =====================================================  ======================
``residual_spike``      ``|z|``                                                ``z_spike`` σ
``residual_cusum``      two-sided CUSUM of ``z`` in its long-run σ, allowance   ``S = cusum_h``
                        ``cusum_k``
``residual_variance``   EWMA over ``variance_memory`` samples of the            ``variance_alarm``
                        difference variance ``(z_t - z_{t-1})² / 2``, as a
                        ratio to its own day-long mean
``stuck``               identical readings in a row                            ``log(stuck_p)/log(p)``
======================  =====================================================  ======================

The CUSUM's ``z`` is scaled by ``√((1-ρ)/(1+ρ))``, ``ρ`` the day-long lag-1 autocorrelation of ``z``
(at most 0.95): what a model's slow misfit leaves behind is autocorrelated, and an autocorrelated
residual sums like an independent one of variance ``(1+ρ)/(1-ρ)``, so unscaled it would cross ``h``
with no fault. The noise statistic uses consecutive differences, which are blind to a slow misfit or
an offset (those are the CUSUM's), and compares them with the series' own long-run difference
variance (which stops learning while the short one is more than 4 standard errors above it, so hours
of tripled noise stay an alarm).

where ``p`` is the series' own rate of identical consecutive readings in its current level (a
quantised sensor repeats itself more often; a stuck one repeats itself far longer than its rate
allows). Levels, fits and peers learn from Huber-clipped errors (``clip`` σ), so a fault is not
absorbed while it lasts.

Parameters are set by principle, not fitted: ``cusum_k`` = 1 σ is half the smallest step to find
(2 σ); ``cusum_h`` = 5 gives an in-control run length of about 10⁵ samples per side; ``z_spike`` = 6 σ
has a Gaussian tail of 2·10⁻⁹; memories are physical (a day for levels and fits, 15 min for the
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
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gateway.batch import F64, I64, MachineKey, StateEvent
from gateway.detect import kernels as K
from gateway.detect.base import squash
from gateway.schema import MachineState

__all__ = ["MODEL_DETECTORS", "REGIME_OF_STATE", "MachineModel", "MachineModelParams", "ModelResult", "warm_up"]

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
    level_memory_s: float = Field(86400.0, gt=0, description="Memory of levels, noise and fits (seconds).")
    cusum_k: float = Field(1.0, ge=0, description="CUSUM allowance in σ (half the smallest step to find).")
    cusum_h: float = Field(5.0, gt=0, description="CUSUM decision interval in σ (score 0.5 there).")
    variance_memory: int = Field(30, ge=2, description="Samples of memory of the EWMA of the difference variance of z.")
    variance_alarm: float = Field(4.0, gt=1, description="Noise variance ratio (short / long-run) alarmed at.")
    z_spike: float = Field(6.0, gt=0, description="|z| alarmed at.")
    stuck_p: float = Field(1e-6, gt=0, lt=1, description="Run of identical readings as improbable as this.")
    stuck_min: int = Field(10, ge=2, description="Never alarm a run shorter than this.")
    peer_memory_s: float = Field(900.0, gt=0, description="Memory of the peers' common mode (seconds).")
    min_peers: int = Field(3, ge=2, description="Machines of a site × area × metric needed for a common mode.")
    clip: float = Field(3.0, gt=0, description="Learning clips errors at this many σ (Huber).")
    visit_samples: int = Field(
        6, ge=0, description="Samples at the start of each visit of a level that learn the visit's own offset "
        "(a new product or load after a setup); 0 = off.")


@dataclass(slots=True)
class ModelResult:
    """Scores in [0, 1] per detector, the model's expected value and z, parallel to the input."""

    scores: dict[str, F64]
    expected: F64
    zscore: F64


class MachineModel:
    """Per-series, per-machine and per-group state in flat arrays; :meth:`run` scores then learns a batch.

    Series ids index the series arrays; ``machines`` (the machine of each series id) groups series into
    machines (siblings) and site × area × metric peer groups. Without it every series is its own machine.
    """

    def __init__(self, params: MachineModelParams, grace: int = 30) -> None:
        self.params = params
        self.grace = int(grace)
        p = params
        self._prm = np.array([
            float(grace), p.z_join, float(p.n_new), p.level_memory_s, p.cusum_k, p.cusum_h,
            1.0 / p.variance_memory, p.z_spike, p.stuck_p, float(p.stuck_min), p.level_memory_s,
            p.peer_memory_s, float(p.min_peers), p.variance_alarm, p.clip, float(p.visit_samples),
        ], np.float64)
        self.s_state = np.zeros((0, K.N_S))
        self.s_lev = np.zeros((0, K.K_LEVELS, K.N_L))
        self.s_lag = np.zeros((0, K.N_SIB, K.N_J))
        self.s_sib = np.full((0, K.N_SIB), -1, np.int64)
        self.s_group = np.full(0, -1, np.int64)
        self.s_mach = np.zeros(0, np.int64)
        self.m_state = np.full(0, -1, np.int64)
        self.g_state = np.zeros((0, K.N_G))
        self.g_members = np.zeros(0, np.float64)
        self._machine_ids: dict[object, int] = {}
        self._machine_series: list[list[int]] = []
        self._group_ids: dict[tuple[str, str, str], int] = {}

    @property
    def n_series(self) -> int:
        return int(self.s_state.shape[0])

    def machine_id(self, key: object) -> int:
        mid = self._machine_ids.get(key)
        if mid is None:
            mid = len(self._machine_ids)
            self._machine_ids[key] = mid
            self._machine_series.append([])
        return mid

    def _register(self, needed: int, machines: Sequence[MachineKey] | None, metrics: Sequence[str] | None) -> None:
        """Allocate state for series ids below ``needed``: machine, siblings, peer group (once per series)."""
        have = self.n_series
        if needed <= have:
            return
        add = needed - have
        self.s_state = np.concatenate((self.s_state, np.zeros((add, K.N_S))))
        self.s_state[have:, K.S_LEVEL] = 0.0
        self.s_lev = np.concatenate((self.s_lev, np.zeros((add, K.K_LEVELS, K.N_L))))
        self.s_lag = np.concatenate((self.s_lag, np.zeros((add, K.N_SIB, K.N_J))))
        self.s_sib = np.concatenate((self.s_sib, np.full((add, K.N_SIB), -1, np.int64)))
        self.s_group = np.concatenate((self.s_group, np.full(add, -1, np.int64)))
        self.s_mach = np.concatenate((self.s_mach, np.zeros(add, np.int64)))
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
            members.append(sid)
            if isinstance(key, MachineKey) and metrics is not None and sid < len(metrics):
                gk = (key.site, key.area, metrics[sid])
                g = self._group_ids.setdefault(gk, len(self._group_ids))
                self.s_group[sid] = g
        ng = len(self._group_ids)
        if ng > groups_before:
            self.g_state = np.concatenate((self.g_state, np.zeros((ng - groups_before, K.N_G))))
        self.g_members = np.bincount(self.s_group[self.s_group >= 0], minlength=ng).astype(np.float64)
        self._grow_machines()

    def _grow_machines(self) -> None:
        """One regime slot per known machine (-1: no state channel seen)."""
        add = len(self._machine_ids) - self.m_state.shape[0]
        if add > 0:
            self.m_state = np.concatenate((self.m_state, np.full(add, -1, np.int64)))

    def run(
        self, series: I64, ts_ns: I64, values: F64, *, machines: Sequence[MachineKey] | None = None,
        metrics: Sequence[str] | None = None, states: Sequence[StateEvent] = (),
    ) -> ModelResult:
        """Score every sample against the state before it, then learn it (per machine in time order).

        ``states`` are the batch's state-channel events; a machine that sent one is modelled by regime.
        """
        series = np.ascontiguousarray(series, np.int64)
        ts_ns = np.ascontiguousarray(ts_ns, np.int64)
        values = np.ascontiguousarray(values, np.float64)
        n = int(series.shape[0])
        if n:
            self._register(int(series.max()) + 1, machines, metrics)
        ev_m = np.empty(0, np.int64)
        ev_t = np.empty(0, np.int64)
        ev_r = np.empty(0, np.int64)
        if states:
            ev_m = np.array([self.machine_id(e.machine) for e in states], np.int64)
            ev_t = np.array([e.ts_ns for e in states], np.int64)
            ev_r = np.array([REGIME_OF_STATE.get(e.state, 0) for e in states], np.int64)
            o = np.lexsort((ev_t, ev_m))
            ev_m, ev_t, ev_r = ev_m[o], ev_t[o], ev_r[o]
            self._grow_machines()
        raw = np.zeros((n, len(K.CHANNELS)))
        expected = np.zeros(n)
        z = np.zeros(n)
        if n:
            mach = self.s_mach[series]
            order = np.lexsort((ts_ns, mach))  # stable: arrival order within a machine and timestamp
            K.step_batch(order, series, mach, ts_ns, values, ev_m, ev_t, ev_r, self.s_state, self.s_lev,
                         self.s_lag, self.s_sib, self.s_group, self.m_state, self.g_state,
                         self.g_members, self._prm, raw, expected, z)
        if ev_m.shape[0]:  # every machine ends the batch in its latest state (with or without samples)
            last = np.flatnonzero(np.r_[ev_m[1:] != ev_m[:-1], True])
            self.m_state[ev_m[last]] = ev_r[last]
        p = self.params
        scores = {
            "residual_spike": squash(raw[:, 0], p.z_spike),
            "residual_cusum": squash(raw[:, 1], 1.0),
            "residual_variance": squash(np.maximum(raw[:, 2] - 1.0, 0.0), p.variance_alarm - 1.0),
            "stuck": squash(raw[:, 3], 1.0),
        }
        return ModelResult(scores, expected, z)

    def reset(self) -> None:
        """Forget everything."""
        self.__init__(self.params, self.grace)  # type: ignore[misc]


def warm_up() -> None:
    """Load the compiled step now (numba's on-disk cache, or a compile), not inside the first batch.

    The load takes ~0.4 s; done on the event loop in a fresh gateway's first flush it held the first
    second of messages (p99 arrival -> visible at 5,000 msg/s over 20 s: ~770 ms instead of ~285 ms).

    >>> warm_up()  # a throwaway model: no detector's state is touched
    """
    MachineModel(MachineModelParams(), grace=1).run(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1))
