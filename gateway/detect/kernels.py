"""The compiled step of the machine model (:mod:`gateway.detect.machine`), written once, in numba.

Why numba: the model's update is a few hundred dependent scalar operations per sample (level
assignment, two small recursive least-squares fits, peer common mode, four change statistics) that
branch per sample; a numpy step loop would run each of them as a separate array pass per step and
need a second, vectorised copy of the logic. One compiled loop over the batch in arrival order does
it once, and is the only definition of the step (the classes and the engine all call it).

Every per-series, per-machine and per-group quantity lives in flat float64/int64 arrays owned by
:class:`gateway.detect.machine.MachineModel`; this module only reads and writes them. Column layouts
are named by the ``S_*``, ``L_*`` and ``G_*`` constants below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gateway.detect.jit import njit

__all__ = ["CHANNELS", "K_LEVELS", "N_LAG", "step_batch"]

K_LEVELS = 6  # operating levels per series (stopped, idle, setup, running) — or the state channel's regimes
# Lag basis: the sibling's level mean through 7.5, 15, 30 and 60 min first-order lags (together they fit
# any thermal time constant from 10 to 45 min within 1 %), and its "stopped" indicator (lowest level)
# through 10 and 40 min: switching a machine off drops its base load too, which no straight line in the
# sibling's reading explains.
LAG_TAUS_S = (450.0, 900.0, 1800.0, 3600.0, 600.0, 2400.0)
N_ON_U = 4  # the first N_ON_U lags filter the level mean, the others the stopped indicator
# The fit's memory is a day: solving its normal equations every 16th sample (and every sample while
# young) gives the same predictions to well within the noise, at a fraction of the cost.
RESOLVE_EVERY = 16  # (a power of two: the check is a mask, not a float modulo, ~5 % of the step's time)
RESOLVE_YOUNG = 256.0
N_LAG = len(LAG_TAUS_S)
VISIT_MEMORY = 30.0  # visits remembered by a level's spread of visit offsets
MIN_MEM = 100.0  # samples a memory spans at least (level_memory_s at coarse sampling: σ from 100 is within 7 %)
LOCAL_T_S = 50.0  # memory of the local error mean: 5 samples at 10 s, shorter than any thermal change of misfit
LOCAL_A_MAX = 0.5  # (its weight dt / LOCAL_T_S, at most this: a mean of at least 2 samples)
# The lag model's error has a slow misfit (a fixed lag basis fits a thermal response to a fraction of
# its size, the peers' common mode the hall's ambient to a fraction of a degree) on top of the sensor
# noise, as large as the faults sought and as slow; a sensor fault is abrupt. So a lag-modelled series'
# CUSUM is a jump CUSUM: its error minus the one-step forecast of a local linear trend (Brown's double
# exponential smoothing over HP_T_S seconds, which follows a misfit's level and slope), in that forecast
# error's own long-run σ. HP_T_S = 160 s, a third of the shortest lag (7.5 min), so the trend follows a
# thermal response's curve; at 10-second samples that is 16 of them, over which a 2.5 σ step (the middle
# of the 2-3 σ steps to find) sums to 4.9 ≈ h = 5 with allowance 1 σ before the trend absorbs it (3 σ:
# 7.3; 2 σ: 2.7). Its weight per sample is dt / HP_T_S, at most HP_A_MAX (a trend needs 2 samples).
HP_T_S = 160.0
HP_A_MAX = 0.5


def hp_gain(a: float) -> float:
    """Variance of the trend's one-step forecast error for iid errors of variance 1, at weight ``a``.

    The forecast is Σ w_j x_{t-1-j}, w_j = a β^(j-1) ((1 + β) - a (j + 1)), β = 1 - a, so the error's
    variance is 1 + Σ w_j², summed here in closed form (geometric series in β²).

    >>> round(hp_gain(1 / 16), 6), round(hp_gain(0.375), 6)
    (1.082743, 1.689577)
    """
    b = 1.0 - a
    q = b * b
    omq = a * (2.0 - a)  # 1 - q
    d = 2.0 * b
    return 1.0 + (a * a / q) * (d * d / omq - 2.0 * d * a * q / omq ** 2 + a * a * q * (1.0 + q) / omq ** 3)

# The CUSUMs sum one value per CUSUM_BLOCK_S of samples, the time-weighted mean of their inputs over it: the
# faults they look for last half an hour and more, and samples closer than that add no evidence of a sustained
# shift that the block's mean lacks, but they do add sums of the model's slow misfit, correlated over minutes,
# which the lag-1 ρ and h in time cannot take out (one sample a second: 2.5-2.9 false alarms per machine-day,
# mostly CUSUMs on the temperature). 10 s = HP_T_S / 16, the sampling the jump CUSUM's trend memory was designed
# for (16 values of it); samples 10 s apart or more are each a block of their own (exactly as without blocks).
CUSUM_BLOCK_S = HP_T_S / 16.0
OWN_BLOCK_S = CUSUM_BLOCK_S * 2.0 / 3.0  # a sample this far after the last is a block of its own (see _block)
RHO_MAX = 0.95  # the largest lag-1 autocorrelation of z the CUSUM allows for (long-run σ ≤ 6.2 σ)
N_SIB = 2  # sibling metrics tried as the load input of the lag model
CHANNELS = ("spike", "cusum", "variance", "stuck")

# per-series scalar columns
S_N = 0  # samples seen
S_PREV = 1  # last reading
S_LEVEL = 2  # current level index (-1 none yet)
S_NLEV = 3  # levels in use
S_PEND = 4  # value of the pending new level
S_PENDN = 5  # consecutive far samples
S_ABS_OWN = 6  # EWMA |error| of the own-level model
S_CHI = 7  # CUSUM high side
S_CLO = 8  # CUSUM low side
S_VAR = 9  # short EWMA of the difference variance (e_t - e_{t-1})² / 2 over the level's long-run one
S_RUN = 10  # identical readings in a row
S_USE = 11  # model in use: 0 own levels, 1 + j lag model on sibling j
S_LAST_T = 12  # last timestamp (s)
S_U = 13  # current level mean (the load input siblings read)
S_SCALE = 14  # series noise scale (median-like, for pending levels)
S_PRE = 15  # error against the nearest level before any new level opened (what the own model predicted)
S_VISIT = 16  # offset of this visit of the level (a new product, a new load) from the level's mean
S_VN = 17  # samples of this visit
S_LOWK = 18  # 1 + the index of its stopped level (the state channel's stopped regime, else the lowest; 0: none yet)
S_ZP = 19  # last clipped z (for the lag-1 autocorrelation)
S_ZZ = 20  # EWMA of z_t · z_{t-1} (clipped)
S_ZV = 21  # EWMA of z² (clipped)
S_EP = 22  # last error of the model in use (its units; for the noise of consecutive differences)
S_EL = 23  # short EWMA of that error (over LOCAL_T_S): what it is locally, its slow misfit included
S_H1 = 24  # the lag model's error, smoothed once and twice over HP_T_S (its local level and trend)
S_H2 = 25
S_R1 = 26  # the same for its response still to come, r
S_R2 = 27
S_HHI = 28  # jump CUSUM high side
S_HLO = 29  # jump CUSUM low side
S_HN = 30  # samples the local trend has learned since it (re)started
S_HV = 31  # long-run variance of the trend's one-step forecast error (steady state, clipped)
S_HVN = 32  # samples S_HV has learned from
S_SEEN = 33  # 1 once the series had a sample: from then on a sibling's input and a member of its peer group
S_XL = 34  # 1 + the level the last sample left (0: it stayed in its level), and the reading before it (if the
S_XB = 35  # next sample is back in that level, the last one may have been an isolated excursion: a spike)
S_RES = 36  # the series' resolution: the smallest change between two readings seen (0: none yet)
S_BTZ = 37  # the CUSUMs' current blocks (see CUSUM_BLOCK_S), each the time its samples cover and, next to it,
S_BZ = 38  # the time-weighted sum of its input: the plain CUSUM's, then the jump CUSUM's
S_BTJ = 39
S_BJ = 40
N_S = 41

# per-series per-level columns (K_LEVELS levels)
L_MEAN = 0
L_VAR = 1
L_N = 2
L_SAME = 3  # EWMA rate of identical consecutive readings while in this level
L_TAU = 4  # mean square of the level's visit offsets (how far a new product or load sits from the level)
L_NV = 5  # visits whose offset was learned
L_DV = 6  # long-run difference variance (e_t - e_{t-1})² / 2 of the model's error in this level: the noise
N_L = 7

# per-series per-sibling lag model: forgotten sums of the least-squares fit, lag states, e2, |e|, n
J_W = 0
J_SY = 1
J_SX = 2
J_SXY = J_SX + N_LAG
J_SXX = J_SXY + N_LAG  # the lower triangle, row by row: (q, r ≤ q) at q(q+1)/2 + r (Cholesky reads no other)
J_LP = J_SXX + N_LAG * (N_LAG + 1) // 2
J_BETA = J_LP + N_LAG  # the last solved slopes (re-solved every RESOLVE_EVERY samples)
J_E2 = J_BETA + N_LAG
J_ABS = J_E2 + 1
J_N = J_ABS + 1
# the fit's error variance as v0 + v1·r², r the response still to come (see _lag_v01): forgotten sums of
# the weight, r², r⁴, e² and e²·r²
J_H1 = J_N + 1
J_HR = J_H1 + 1
J_HRR = J_HR + 1
J_HE = J_HRR + 1
J_HER = J_HE + 1
J_LOWK = J_HER + 1  # the sibling's S_LOWK the fit learned with: its stopped indicator means that level
J_UP = J_LOWK + 1  # the inputs (level mean, stopped indicator) at the last sample: a change of them
J_LOWP = J_UP + 1  # happened somewhere in the interval since, half way in expectation
N_J = J_LOWP + 1

# per-group (site × area × metric) common mode
G_C = 0
G_S = 1
G_N = 2
N_G = 3


@njit(cache=True, nogil=True, inline="always")
def _alpha_a(a: float, n: float) -> float:
    """EWMA weight of one sample: time-based, ``a`` = 1 - e^{-dt/tau} (a column of the decay table), never
    below 1/n while young."""
    w = 1.0 / n
    return w if w > a else a


# columns of the decay table: exp(-dt/tau) terms of one sample interval dt, computed once per distinct dt
D_LAG = 0  # 1 - e^{-dt/tau_q} of the N_LAG lags
D_FIT = N_LAG  # e^{-dt/t_fit} (1 at dt = 0): the lag fit's forgetting
D_LEVEL = N_LAG + 1  # 1 - e^{-dt/t_level} (0 at dt = 0): levels, error and noise references
D_HOLD = N_LAG + 2  # e^{-dt/t_level} (1 at dt = 0): the misfit's variance fit
D_GROUP = N_LAG + 3  # 1 - e^{-dt/t_group} (0 at dt = 0): the peers' common mode
D_HPA = N_LAG + 4  # the jump CUSUM trend's weight dt / HP_T_S (at most HP_A_MAX)
D_HPG = N_LAG + 5  # its forecast error's variance gain, hp_gain(D_HPA)
D_LOC = N_LAG + 6  # the local error mean's weight dt / LOCAL_T_S (at most LOCAL_A_MAX)
D_H = N_LAG + 7  # the CUSUMs' decision interval h at this sampling interval (see cusum_h)
N_D = N_LAG + 8
DT_CACHE = 4  # intervals remembered: a plant samples at a few fixed intervals, and a machine's metrics share one


_hp_gain = njit(cache=True, nogil=True)(hp_gain)

SIEGMUND_B = 1.166  # Siegmund's correction of a CUSUM's boundary for the overshoot (of a unit-variance sum)


def cusum_h(k: float, run_length: float) -> float:
    """The decision interval ``h`` (σ) at which a one-sided CUSUM of independent N(0, 1) with allowance
    ``k`` crosses once in ``run_length`` samples on average (Siegmund's approximation,
    ``ARL = (e^{2kb} - 2kb - 1) / 2k²`` with ``b = h + 1.166``; ``b²`` at ``k = 0``), never below 0.5.

    So a time-based run length (a false alarm per side in so many days) holds at any sampling rate: the
    CUSUM of a series read twice as often sums twice as many samples in that time, and needs a little more
    (the machine model's CUSUMs sum blocks of ``CUSUM_BLOCK_S``, so their ``h`` stops growing below 10 s).

    >>> two_weeks = 14 * 86400.0
    >>> [round(cusum_h(1.0, two_weeks / dt), 2) for dt in (5.0, 10.0, 60.0)]
    [5.38, 5.03, 4.14]
    >>> round(cusum_h(0.0, 10_000), 3)
    98.834
    """
    n = max(run_length, 1.0)
    if k <= 1e-9:
        b = math.sqrt(n)
    else:
        c = 2.0 * k * k * n + 1.0
        x = math.log(c)  # x = 2kb solves x = ln(c + x): a contraction by 1/(c + x), converged in a few steps
        for _ in range(40):
            x1 = math.log(c + x)
            if abs(x1 - x) <= 1e-13 * x1:
                x = x1
                break
            x = x1
        b = x / (2.0 * k)
    return max(0.5, b - SIEGMUND_B)


_cusum_h = njit(cache=True, nogil=True)(cusum_h)


@njit(cache=True, nogil=True)
def _decays(row: Any, dt: float, t_fit: float, t_level: float, t_group: float, ck: float, h: float,
            arl_s: float) -> None:
    """Fill one row of the decay table for ``dt`` (0 or 1 at dt = 0, where nothing decays); the CUSUMs' ``h``
    is the one whose in-control run length per side is ``arl_s`` seconds (``h`` itself if ``arl_s`` is 0)."""
    for q in range(N_LAG):
        row[D_LAG + q] = 1.0 - math.exp(-dt / LAG_TAUS_S[q])
    # (a day of hourly readings is 24 samples: too few for a level's σ or a noise reference, which the
    # noise ratio's 30-sample EWMA would outlast; the memory then spans MIN_MEM samples)
    t_fit = max(t_fit, MIN_MEM * dt)
    t_level = max(t_level, MIN_MEM * dt)
    row[D_FIT] = math.exp(-dt / t_fit) if dt > 0.0 else 1.0
    row[D_LEVEL] = 1.0 - math.exp(-dt / t_level) if dt > 0.0 else 0.0
    row[D_HOLD] = math.exp(-dt / t_level) if dt > 0.0 else 1.0
    row[D_GROUP] = 1.0 - math.exp(-dt / t_group) if dt > 0.0 else 0.0
    dt_w = max(dt, 1e-3)  # (the memories in time: an interval under 1 ms counts as 1 ms)
    a = min(HP_A_MAX, dt_w / HP_T_S)
    row[D_HPA] = a
    row[D_HPG] = _hp_gain(a)
    row[D_LOC] = min(LOCAL_A_MAX, dt_w / LOCAL_T_S)
    step = dt_w if dt_w >= OWN_BLOCK_S else CUSUM_BLOCK_S  # (the interval a CUSUM sums: see _block)
    row[D_H] = _cusum_h(ck, arl_s / step) if arl_s > 0.0 else h


@njit(cache=True, nogil=True, inline="always")
def _start_visit(st: Any) -> None:
    """A new visit of the series' level: its offset is learned anew (see ``visit_samples``)."""
    st[S_VISIT] = 0.0
    st[S_VN] = 0.0


@njit(cache=True, nogil=True)
def _merge_close(st: Any, lev: Any, k: int, z_merge: float) -> None:
    """Merge into level ``k`` a level whose mean is within ``z_merge`` σ of its own (the larger of the two
    σ): one noisy level split in two close ones, whose readings chatter between them, understates both
    halves' noise (each keeps one side of the distribution). Pooled statistics, weighted by samples; the
    last level moves into the freed slot."""
    nl = int(st[S_NLEV])
    for q in range(nl):
        if q == k or lev[q, L_N] <= 0.0:
            continue
        d = abs(lev[k, L_MEAN] - lev[q, L_MEAN])
        if d * d >= z_merge * z_merge * max(lev[k, L_VAR], lev[q, L_VAR]):
            continue
        w = lev[k, L_N] / (lev[k, L_N] + lev[q, L_N])
        m = w * lev[k, L_MEAN] + (1.0 - w) * lev[q, L_MEAN]
        between = w * (1.0 - w) * d * d
        st[S_VISIT] += lev[k, L_MEAN] - m  # this visit's reading stays where it was
        lev[k, L_VAR] = w * lev[k, L_VAR] + (1.0 - w) * lev[q, L_VAR] + between
        lev[k, L_TAU] = w * lev[k, L_TAU] + (1.0 - w) * lev[q, L_TAU] + between
        lev[k, L_DV] = w * lev[k, L_DV] + (1.0 - w) * lev[q, L_DV]
        lev[k, L_SAME] = w * lev[k, L_SAME] + (1.0 - w) * lev[q, L_SAME]
        lev[k, L_MEAN] = m
        lev[k, L_N] += lev[q, L_N]
        lev[k, L_NV] += lev[q, L_NV]
        last = nl - 1
        for c in range(N_L):
            lev[q, c] = lev[last, c]
            lev[last, c] = 0.0
        st[S_NLEV] = nl - 1.0
        st[S_LEVEL] = q if k == last else k
        st[S_XL] = 0.0  # (level indices moved)
        return


@njit(cache=True, nogil=True)
def _level_sd(lev: Any, k: int, st: Any, grace: float) -> float:
    """Noise σ of level ``k`` of the series ``st``: at least its resolution (a reading is known to one step
    of its sensor: a quiet level read by a coarse sensor is a constant that flips by a step now and then);
    a young level (fewer than ``grace`` samples) at least 2 typical steps."""
    sd: float = max(math.sqrt(lev[k, L_VAR] + (1e-6 * lev[k, L_MEAN]) ** 2 + 1e-18), st[S_RES])
    if lev[k, L_N] < grace:
        sd = max(sd, 2.0 * st[S_SCALE])
    return sd


@njit(cache=True, nogil=True, inline="always")
def _level_z(lev: Any, k: int, xv: float, st: Any, grace: float) -> float:
    """How far ``xv`` is from level ``k`` of the series ``st``, in that level's σ."""
    return float(abs(xv - lev[k, L_MEAN]) / _level_sd(lev, k, st, grace))


@njit(cache=True, nogil=True, inline="always")
def _resolves(lag: Any) -> bool:
    """Whether the step solves the fit's normal equations again for this sample (:func:`_lag_solve`)."""
    n = lag[J_N]  # (a count: a whole number)
    return n <= RESOLVE_YOUNG or (int(n) & (RESOLVE_EVERY - 1)) == 0


@njit(cache=True, nogil=True, inline="always")
def _lag_held(lag: Any) -> float:
    """The prediction of the slopes solved last (between re-solves)."""
    wsum = lag[J_W]
    if wsum <= 0.0:
        return 0.0
    pred = lag[J_SY] / wsum
    for q in range(N_LAG):
        pred += lag[J_BETA + q] * (lag[J_LP + q] - lag[J_SX + q] / wsum)
    return float(pred)


@njit(cache=True, nogil=True)
def _lag_solve(lag: Any, c: Any, beta: Any) -> float:
    """Solve the slopes again and predict: least squares from the forgotten sums, centred normal equations
    with a small ridge, by Cholesky (sums decay uniformly, so no excitation means no wind-up, unlike RLS).
    Between re-solves (:func:`_resolves`) the step predicts with the held slopes (:func:`_lag_held`)."""
    wsum = lag[J_W]
    if wsum <= 0.0:
        return 0.0
    my = lag[J_SY] / wsum
    for q in range(N_LAG):  # the lower triangle of the centred matrix (what the Cholesky below reads)
        mq = lag[J_SX + q] / wsum
        for r in range(q + 1):
            c[q, r] = lag[J_SXX + q * (q + 1) // 2 + r] / wsum - mq * lag[J_SX + r] / wsum
        beta[q] = lag[J_SXY + q] / wsum - mq * my
    for q in range(N_LAG):
        c[q, q] += 1e-6 * c[q, q] + 1e-12
    for q in range(N_LAG):  # Cholesky, in place (lower)
        v = c[q, q]
        for r in range(q):
            v -= c[q, r] * c[q, r]
        if v <= 1e-300:
            for r in range(N_LAG):
                lag[J_BETA + r] = 0.0
            return float(my)
        d = math.sqrt(v)
        c[q, q] = d
        for r in range(q + 1, N_LAG):
            acc = c[r, q]
            for t in range(q):
                acc -= c[r, t] * c[q, t]
            c[r, q] = acc / d
    for q in range(N_LAG):  # forward
        acc = beta[q]
        for r in range(q):
            acc -= c[q, r] * beta[r]
        beta[q] = acc / c[q, q]
    for q in range(N_LAG - 1, -1, -1):  # backward
        acc = beta[q]
        for r in range(q + 1, N_LAG):
            acc -= c[r, q] * beta[r]
        beta[q] = acc / c[q, q]
    pred = my
    for q in range(N_LAG):
        lag[J_BETA + q] = beta[q]
        pred += beta[q] * (lag[J_LP + q] - lag[J_SX + q] / wsum)
    return float(pred)


@njit(cache=True, nogil=True)
def _lag_v01(lag: Any) -> tuple[float, float]:
    """``(v0, v1)`` of the lag fit's error variance at a transient of size ``r``: ``max(E2, v0 + v1·r²)``.

    A fixed basis of lags fits a thermal response to a fraction of its size, and the size of what is
    still to come after a load change is known: ``r = Σ β_q (input_q − lag_q)``, zero in steady state,
    the whole step right after one. So the misfit's variance is modelled as ``v0 + v1·r²`` by a least-
    squares fit of e² on r² (forgotten like the fit, a day; ``v1`` ≥ 0), and z's σ is the larger of that
    and the plain error variance ``E2``: the transient term only widens σ while the response to a load
    change is still to come (a recurring start heats the machine as it always does and scores low),
    never below what the fit's errors are overall. Until transients have been seen ``(E2, 0)``.
    """
    h1 = lag[J_H1]
    if h1 <= 0.0:
        return float(lag[J_E2]), 0.0
    mr = lag[J_HR] / h1
    me = lag[J_HE] / h1
    vrr = lag[J_HRR] / h1 - mr * mr
    v1 = (lag[J_HER] / h1 - me * mr) / vrr if vrr > 1e-12 * (lag[J_HRR] / h1 + 1e-300) else 0.0
    if v1 < 0.0:
        v1 = 0.0
    return float(me - v1 * mr), float(v1)




MAX_PENDING = 16  # state events a machine holds until a sample reaches their time (then the oldest applies)


@njit(cache=True, nogil=True)
def _ev_take(m: int, upto: int, ev_ts: Any, ev_pos: Any, ev_reg: Any, ev_done: Any, cur: Any, lo: Any,
             end: Any, npend: Any, m_state: Any, m_evt: Any) -> None:
    """Machine ``m`` receives its events that arrived before row ``upto`` (in arrival order): one older
    than the machine's current event is stale; the others wait until a sample reaches their time (at
    most MAX_PENDING: past that the oldest applies)."""
    k = cur[m]
    while k < end[m] and ev_pos[k] <= upto:
        if ev_ts[k] < m_evt[m]:
            ev_done[k] = 1
        else:
            ev_done[k] = 0
            npend[m] += 1
            if npend[m] > MAX_PENDING:
                old = -1
                for j in range(lo[m], k + 1):
                    if ev_done[j] == 0 and (old < 0 or ev_ts[j] < ev_ts[old]):
                        old = j
                ev_done[old] = 1
                npend[m] -= 1
                m_state[m] = ev_reg[old]
                m_evt[m] = ev_ts[old]
        k += 1
    cur[m] = k


@njit(cache=True, nogil=True)
def _ev_apply(m: int, t_ns: int, ev_ts: Any, ev_reg: Any, ev_done: Any, cur: Any, lo: Any, npend: Any,
              m_state: Any, m_evt: Any) -> None:
    """A sample of machine ``m`` at ``t_ns``: its waiting events up to that time apply (the newest wins;
    at equal times the last to arrive)."""
    j = lo[m]
    while j < cur[m] and ev_done[j] != 0:
        j += 1
    lo[m] = j
    best = -1
    for j in range(lo[m], cur[m]):
        if ev_done[j] == 0 and ev_ts[j] <= t_ns:
            ev_done[j] = 1
            npend[m] -= 1
            if best < 0 or ev_ts[j] >= ev_ts[best]:
                best = j
    if best >= 0:
        m_state[m] = ev_reg[best]
        m_evt[m] = ev_ts[best]


@njit(cache=True, nogil=True)
def step_batch(
    order: Any, sid: Any, mach: Any, ts: Any, x: Any, brk: Any,
    ev_mach: Any, ev_ts: Any, ev_reg: Any, ev_pos: Any, ev_done: Any,
    s_state: Any, s_lev: Any, s_lag: Any, s_sib: Any, s_group: Any,
    m_state: Any, m_evt: Any, g_state: Any, g_members: Any,
    prm: Any, out: Any, expected: Any, zout: Any, lone: Any,
) -> None:
    """Score then learn every sample, in ``order`` (arrival order: what the samples of a batch do to
    shared state, the peers' common mode, then does not depend on where batches are cut). ``order`` may
    hold the rows of some machines only, with their events only: machines that share no peer group share
    no state, so such parts may run at once on several threads (:meth:`MachineModel.run`).

    State events ``ev_*`` are sorted by machine, then arrival; ``ev_pos`` is the row before which each
    arrived (-1: in an earlier batch). A machine's event applies to its samples that arrived after it and
    are at least as new (see :func:`_ev_take`, :func:`_ev_apply`); ``m_evt`` is each machine's current
    event time. ``ev_done`` comes back 0 for the events still waiting, 1 for those applied or stale.
    ``brk`` (ascending) are rows no group extends over (a message starting at the previous row's time).

    ``prm``: grace, z_join, n_new, t_level_s, cusum_k, cusum_h, var_alpha, z_spike (unused here),
    stuck_p, stuck_min, t_fit_s, t_group_s, min_group, var_alarm (unused here), clip, visit_n, cusum_arl_s
    (> 0: the CUSUMs' h follows each sample's interval, :func:`cusum_h`, except on lone series).
    ``out[i, c]`` is the raw statistic of channel ``c`` (spike |z|, CUSUM S/h, variance ratio,
    stuck run / alarm run) for input sample ``i``.
    """
    grace = prm[0]
    z_join = prm[1]
    n_new = prm[2]
    t_level = prm[3]
    ck = prm[4]
    # the CUSUMs' decision interval: a run length of arl_s seconds per side at each sample's interval (the
    # statistics alarm as they are); a lone series' scores are calibrated against their own distribution, which
    # takes its sampling rate in, and there h (the sums' restart) stays h_lone
    h_lone = prm[5]
    arl_s = prm[16]
    va = prm[6]
    # 4 standard errors above the reference: an EWMA of a χ²₁ over 1/va samples has sd √(2va/(2-va))
    var_learn = 1.0 + 4.0 * math.sqrt(2.0 * va / (2.0 - va))
    stuck_p = prm[8]
    stuck_min = prm[9]
    log_stuck_p = math.log(stuck_p)
    t_fit = prm[10]
    t_group = prm[11]
    min_group = prm[12]
    clip = prm[14]
    visit_n = prm[15]
    n = order.shape[0]
    n_rows = x.shape[0]  # rows of the whole batch (``order`` may be the rows of some of its machines only)
    n_ev = ev_mach.shape[0]
    n_m = m_state.shape[0]
    e_cur = np.zeros(n_m, np.int64)  # per machine: events [e_lo, e_cur) received, [e_cur, e_end) to come
    e_end = np.zeros(n_m, np.int64)
    for k in range(n_ev - 1, -1, -1):
        e_cur[ev_mach[k]] = k
    for k in range(n_ev):
        e_end[ev_mach[k]] = k + 1
    e_lo = e_cur.copy()
    npend = np.zeros(n_m, np.int64)
    nb = brk.shape[0]
    b = 0  # next group break
    # per position in ``order``: its error and the last one's are against two levels (a jump, or a level opened by
    # samples that were far from every level): their difference is no noise
    straddle = np.zeros(n, np.bool_)
    late = np.zeros(n)  # per position: the last sample's spike statistic, known only now (see S_XL)
    cmat = np.empty((N_LAG, N_LAG))
    beta = np.empty(N_LAG)
    # the exp() terms of the last few sample intervals: ~10 per distinct dt instead of ~25 per sample
    dt_key = np.full(DT_CACHE, -1.0)
    dt_tab = np.empty((DT_CACHE, N_D))
    dt_next = 0
    i0 = 0
    while i0 < n:
        # a group: the samples of one machine at one timestamp (all of them see the same context)
        first = order[i0]
        mid = mach[first]
        t_ns = ts[first]
        if e_cur[mid] < e_end[mid]:
            _ev_take(mid, first, ev_ts, ev_pos, ev_reg, ev_done, e_cur, e_lo, e_end, npend, m_state, m_evt)
        if npend[mid] > 0:  # (a call passes its arrays by reference count: not per sample for nothing)
            _ev_apply(mid, t_ns, ev_ts, ev_reg, ev_done, e_cur, e_lo, npend, m_state, m_evt)
        nxt = ev_pos[e_cur[mid]] if e_cur[mid] < e_end[mid] else n_rows  # the machine's next event ends the group
        while b < nb and brk[b] <= first:
            b += 1
        if b < nb and brk[b] < nxt:  # so does the next message at the same time
            nxt = brk[b]
        i1 = i0 + 1
        while i1 < n and mach[order[i1]] == mid and ts[order[i1]] == t_ns and order[i1] < nxt:
            dup = False  # a series twice at one timestamp: the second sample starts the next group
            for jj in range(i0, i1):
                if sid[order[jj]] == sid[order[i1]]:
                    dup = True
            if dup:
                break
            i1 += 1
        t = t_ns * 1e-9
        regime = m_state[mid]
        # the state channel and the telemetry come from different clocks (a PLC, a sensor gateway): a sample
        # within one of its intervals of a state change may be either regime's, and takes the one whose level
        # explains it better. The change due next (an event already received, at a time after this sample's):
        nxt_ts = -1
        nxt_reg = -1
        if regime >= 0 and npend[mid] > 0:
            for j in range(e_lo[mid], e_cur[mid]):
                if ev_done[j] == 0 and ev_ts[j] > t_ns and (nxt_ts < 0 or ev_ts[j] < nxt_ts):
                    nxt_ts = ev_ts[j]
                    nxt_reg = ev_reg[j]
        # -- pass 1: level of every sample of the group (siblings read each other's level mean)
        switched = False  # a series its own levels explain moved to another level: the machine changed regime
        for ii in range(i0, i1):
            i = order[ii]
            s = sid[i]
            st = s_state[s]
            lev = s_lev[s]
            xv = x[i]
            nl = int(st[S_NLEV])
            if st[S_N] == 0.0:
                st[S_SCALE] = abs(xv) * 1e-3 + 1e-9
            if st[S_SEEN] == 0.0:  # first sample: counted among its peers now (not when registered), so
                st[S_SEEN] = 1.0  # where a batch is cut does not change what the earlier samples saw
                if s_group[s] >= 0:
                    g_members[s_group[s]] += 1.0
            best = -1
            bestz = 1e300
            if regime >= 0:  # the state channel names the level
                best = regime
                if st[S_N] > 0.0:  # (the other regime near a change: the next one, or the one this series left)
                    span = (t - st[S_LAST_T]) * 1e9  # the series' interval (ns)
                    alt = -1
                    if nxt_ts >= 0 and nxt_ts - t_ns < span:
                        alt = nxt_reg
                    elif t_ns - span < m_evt[mid] < t_ns:
                        alt = int(st[S_LEVEL])
                    if 0 <= alt < K_LEVELS and alt != best:  # the one whose level explains it better (a level not
                        # seen yet: if the reading is beyond z_join σ of the other's)
                        zb = _level_z(lev, best, xv, st, grace) if lev[best, L_N] > 0.0 else -1.0
                        za = _level_z(lev, alt, xv, st, grace) if lev[alt, L_N] > 0.0 else -1.0
                        if (zb < 0.0 and 0.0 <= za <= z_join) or (za < 0.0 and zb > z_join) or 0.0 <= za < zb:
                            best = alt
                # a regime's first reading may not be its own (a change between two samples, another clock): a level
                # of fewer than n_new samples that a reading is far from starts again at it
                bestz = _level_z(lev, best, xv, st, grace) if lev[best, L_N] > 0.0 else 0.0
                if lev[best, L_N] == 0.0 or (lev[best, L_N] < n_new and bestz > z_join):
                    lev[best, L_MEAN] = xv
                    lev[best, L_VAR] = st[S_SCALE] ** 2
                    lev[best, L_N] = 0.0
                    bestz = 0.0
            else:
                for k in range(nl):
                    zk = _level_z(lev, k, xv, st, grace)
                    if zk < bestz:
                        bestz = zk
                        best = k
                if best < 0 or bestz > z_join:
                    # far from every level: a new level once n_new such samples agree
                    sc = st[S_SCALE]
                    if st[S_PENDN] > 0.0 and abs(xv - st[S_PEND]) <= z_join * sc:
                        st[S_PENDN] += 1.0
                        st[S_PEND] += (xv - st[S_PEND]) / st[S_PENDN]
                    else:
                        st[S_PENDN] = 1.0
                        st[S_PEND] = xv
                    if st[S_PENDN] >= n_new or nl == 0:
                        if nl < K_LEVELS:
                            k = nl
                            st[S_NLEV] = nl + 1
                        else:  # replace the level seen least
                            k = 0
                            for q in range(1, K_LEVELS):
                                if lev[q, L_N] < lev[k, L_N]:
                                    k = q
                        lev[k, L_MEAN] = st[S_PEND]
                        lev[k, L_VAR] = sc * sc
                        lev[k, L_N] = 0.0
                        lev[k, L_SAME] = 0.0
                        lev[k, L_TAU] = 0.0
                        lev[k, L_NV] = 0.0
                        lev[k, L_DV] = 0.0
                        st[S_PENDN] = 0.0
                        straddle[ii] = True
                        best = k
                        bestz = abs(xv - lev[k, L_MEAN]) / sc
                    elif best < 0:
                        best = 0
                else:
                    st[S_PENDN] = 0.0
            # a spike may land near another known level (a product whose load differs by a few σ) and read as a
            # switch to it; the next sample tells: back in the level it left, the last one is scored against its
            # two neighbours, d = x - (before + after) / 2, in that level's fast noise (var(d) = 1.5 σ²), at least
            # the series' typical step (a noisy level split in two close ones underestimates both halves' noise)
            if st[S_XL] > 0.0 and best == int(st[S_XL]) - 1 and lev[best, L_N] > grace and lev[best, L_DV] > 0.0:
                noise = max(lev[best, L_DV], st[S_SCALE] ** 2)
                late[ii] = abs(st[S_PREV] - 0.5 * (st[S_XB] + xv)) / math.sqrt(1.5 * noise)
            st[S_XL] = 0.0
            jumped = best != int(st[S_LEVEL]) and st[S_LEVEL] >= 0.0 and st[S_N] > 0.0 and \
                abs(xv - st[S_PREV]) > z_join * _level_sd(lev, best, st, grace)
            if jumped:  # (not chatter between close levels: a jump beyond z_join σ)
                st[S_XL] = st[S_LEVEL] + 1.0
                st[S_XB] = st[S_PREV]
                st[S_VAR] = 1.0  # the noise ratio is the new level's to learn (its last value was the old one's)
                straddle[ii] = True
            if best != int(st[S_LEVEL]):
                _start_visit(st)
                # (a jump beyond z_join σ of the new level: not a drift across levels or chatter between close ones)
                if st[S_USE] == 0.0 and st[S_N] > grace and jumped:
                    switched = True
            st[S_PRE] = xv - lev[best, L_MEAN] if bestz <= z_join else bestz * _level_sd(lev, best, st, grace)
            st[S_LEVEL] = best
            st[S_U] = lev[best, L_MEAN] + st[S_VISIT]
            # the stopped indicator: the state channel's stopped regime, else the lowest level (also while it
            # is the only one: a plant is first seen at night as often as not)
            low_k = 0
            if regime < 0:
                low_k = best
                for q in range(int(st[S_NLEV])):
                    if lev[q, L_N] > 0.0 and lev[q, L_MEAN] < lev[low_k, L_MEAN]:
                        low_k = q
            st[S_LOWK] = low_k + 1.0
        # a regime switch moves every metric at once: where a sibling switched level, a series that stayed in
        # its level (two regimes it cannot tell apart, say idle and setup) starts a new visit too, so the offset
        # it learned for the last regime is not held against the new one
        if switched:
            for ii in range(i0, i1):
                s = sid[order[ii]]
                st = s_state[s]
                if st[S_USE] == 0.0 and st[S_VN] > 0.0:
                    _start_visit(st)
                    st[S_U] = s_lev[s, int(st[S_LEVEL]), L_MEAN]
        # -- pass 2: predict, score, learn
        for ii in range(i0, i1):
            i = order[ii]
            s = sid[i]
            st = s_state[s]
            lev = s_lev[s]
            xv = x[i]
            k = int(st[S_LEVEL])
            nseen = st[S_N] + 1.0
            dt = t - st[S_LAST_T] if st[S_N] > 0.0 else 0.0
            if dt < 0.0:
                dt = 0.0
            st[S_LAST_T] = t
            slot = -1
            for c in range(DT_CACHE):
                if dt_key[c] == dt:
                    slot = c
                    break
            if slot < 0:
                slot = dt_next
                dt_next = (dt_next + 1) % DT_CACHE
                dt_key[slot] = dt
                _decays(dt_tab[slot], dt, t_fit, t_level, t_group, ck, h_lone, arl_s)
            dec = dt_tab[slot]
            a_lev = dec[D_LEVEL]
            # own-level model
            res2 = st[S_RES] * st[S_RES]  # no noise statistic is finer than the series' resolution
            sd_own = _level_sd(lev, k, st, grace)
            mu = lev[k, L_MEAN] + st[S_VISIT]
            e_own = xv - mu
            visiting = st[S_VN] < visit_n and lev[k, L_N] > grace  # this visit's offset is still learned
            sd_z = sd_own
            if visiting:  # its error: the spread of visit offsets at first, then that of a mean of S_VN samples
                u2 = lev[k, L_TAU]
                if st[S_VN] > 0.0:
                    u2 = min(u2, sd_own * sd_own / st[S_VN])
                sd_z = math.sqrt(sd_own * sd_own + u2)
            g = s_group[s]
            use_group = g >= 0 and g_members[g] >= min_group
            cg = g_state[g, G_C] if use_group else 0.0
            # lag models on the siblings' level means (plus the peers' common mode)
            best_j = -1
            best_abs = st[S_ABS_OWN]
            e_sel = e_own
            sd_sel = sd_z
            pred_sel = mu
            d_raw = 0.0
            r_sel = 0.0
            v1_sel = 0.0
            refit_p = 0.0  # how far this sample's re-solve of the fit in use moved its prediction and r
            refit_r = 0.0
            e2_sel = 0.0
            settled = False
            alone = True  # no sibling with a sample yet: only the series' own levels explain it
            # the error every fitted lag model agrees on, in each one's σ: the one nearest 0 where their signs
            # agree, else 0. A fault of the series' own sensor moves its error against every model of it; a
            # fault of one input (its sensor steps, the load it reports does not) only against that input's
            z_all = 0.0
            fitted = False  # (a fit past its grace has given z_all its first value)
            for j in range(N_SIB):
                sb = s_sib[s, j]
                if sb < 0 or s_state[sb, S_SEEN] == 0.0:  # no sibling, or none that has had a sample yet
                    continue
                alone = False
                lag = s_lag[s, j]
                u = s_state[sb, S_U]
                low = 1.0 if s_state[sb, S_LEVEL] == s_state[sb, S_LOWK] - 1.0 else 0.0  # it is stopped
                if lag[J_N] > 0.0 and lag[J_LOWK] != s_state[sb, S_LOWK]:
                    # the sibling's stopped level is another one now (a lower level appeared): the fit's sums
                    # hold its indicator with another meaning, and learn anew
                    lag[:] = 0.0
                if lag[J_N] == 0.0:
                    lag[J_LOWK] = s_state[sb, S_LOWK]
                    for q in range(N_LAG):
                        lag[J_LP + q] = u if q < N_ON_U else low
                    lag[J_E2] = sd_own * sd_own
                    lag[J_ABS] = 1e300
                else:  # the lags of the input over the interval: its old value, its new one from half way
                    um = 0.5 * (u + lag[J_UP])
                    lm = 0.5 * (low + lag[J_LOWP])
                    for q in range(N_LAG):
                        lag[J_LP + q] += dec[D_LAG + q] * ((um if q < N_ON_U else lm) - lag[J_LP + q])
                lag[J_UP] = u
                lag[J_LOWP] = low
                # what the slopes solved so far predict, where a re-solve below may move them (otherwise
                # the prediction is exactly that)
                keep_p = 0.0
                keep_r = 0.0
                resolve = lag[J_W] > 0.0 and _resolves(lag)
                if resolve:
                    keep_p = _lag_held(lag)
                    for q in range(N_LAG):
                        keep_r += lag[J_BETA + q] * ((u if q < N_ON_U else low) - lag[J_LP + q])
                    pred = _lag_solve(lag, cmat, beta)
                else:  # (inline: the call costs more than this sum, 15 samples in 16)
                    pred = _lag_held(lag)
                ej = xv - cg - pred
                rj = 0.0  # the response still to come: where the current input would settle the prediction
                for q in range(N_LAG):
                    rj += lag[J_BETA + q] * ((u if q < N_ON_U else low) - lag[J_LP + q])
                r2 = rj * rj
                young = lag[J_N] <= grace
                v1j = 0.0
                varj = lag[J_E2]
                if not young:  # max(E2, v0 + v1·r²), with v1 kept for the jump CUSUM
                    v0j, v1j = _lag_v01(lag)
                    v = v0j + v1j * r2
                    if v > varj:
                        varj = v
                sdj = math.sqrt(max(varj, res2) + 1e-18)
                if not young:  # a fitted model: a test of z_all, and a candidate for the model in use
                    zj = ej / sdj
                    if not fitted:
                        z_all = zj
                        fitted = True
                    elif zj * z_all <= 0.0:
                        z_all = 0.0
                    elif abs(zj) < abs(z_all):
                        z_all = zj
                    if lag[J_ABS] < best_abs:  # the fit nearest the data so far is the model in use
                        best_abs = lag[J_ABS]
                        best_j = j
                        e_sel = ej
                        sd_sel = sdj
                        pred_sel = pred + cg
                        d_raw = xv - pred
                        r_sel = rj
                        v1_sel = v1j
                        if resolve:
                            refit_p = pred - keep_p
                            refit_r = rj - keep_r
                        e2_sel = lag[J_E2]
                        # the load input is settled: its level is known (none pending) and this visit's offset
                        # learned; until then it is still to move, and so is the response's slope
                        settled = s_state[sb, S_PENDN] == 0.0 and s_state[sb, S_VN] >= visit_n
                # learn: exponentially forgotten sums (time constant t_fit), Huber weight beyond clip σ
                lam = dec[D_FIT]
                w = 1.0
                lim = clip * sdj
                if not young and abs(ej) > lim:
                    w = lim / abs(ej)
                yt = xv - cg
                lag[J_W] = lag[J_W] * lam + w
                lag[J_SY] = lag[J_SY] * lam + w * yt
                for q in range(N_LAG):
                    fq = lag[J_LP + q]
                    lag[J_SX + q] = lag[J_SX + q] * lam + w * fq
                    lag[J_SXY + q] = lag[J_SXY + q] * lam + w * fq * yt
                    qq = J_SXX + q * (q + 1) // 2
                    for r in range(q + 1):
                        lag[qq + r] = lag[qq + r] * lam + w * fq * lag[J_LP + r]
                lag[J_N] += 1.0
                aj = _alpha_a(a_lev, lag[J_N])
                # (clipped at clip times its own σ: clipped at the transient-widened sdj, a first start's runaway
                # prediction kept it inflated for a day)
                lag[J_E2] += aj * (min(ej * ej, clip * clip * lag[J_E2]) - lag[J_E2]) if lag[J_N] > grace \
                    else (ej * ej - lag[J_E2]) / lag[J_N]
                ab = abs(ej)
                lag[J_ABS] = ab if lag[J_ABS] > 1e299 else lag[J_ABS] + aj * (ab - lag[J_ABS])
                if not young:  # the misfit's variance against the transient (clipped like the fit's)
                    e2c = min(ej * ej, (clip * sdj) ** 2)
                    lh = dec[D_HOLD]
                    lag[J_H1] = lag[J_H1] * lh + 1.0
                    lag[J_HR] = lag[J_HR] * lh + r2
                    lag[J_HRR] = lag[J_HRR] * lh + r2 * r2
                    lag[J_HE] = lag[J_HE] * lh + e2c
                    lag[J_HER] = lag[J_HER] * lh + e2c * r2
            z = e_sel / sd_sel
            ch = h_lone if alone else dec[D_H]
            expected[i] = pred_sel
            zout[i] = z
            lone[i] = alone
            # -- statistics
            az = abs(z)
            zq = max(-clip * 2.0, min(clip * 2.0, z))
            # the CUSUM's z in units of its long-run σ: a residual with lag-1 autocorrelation ρ (what a
            # model's slow misfit leaves) sums like an iid one of variance (1 + ρ) / (1 - ρ)
            rho = st[S_ZZ] / st[S_ZV] if st[S_ZV] > 0.0 else 0.0
            rho = max(0.0, min(RHO_MAX, rho))
            rf = math.sqrt((1.0 - rho) / (1.0 + rho))
            zc = zq * rf
            hi = st[S_CHI]
            lo = st[S_CLO]
            cus = max(hi, lo)
            relearn = False
            if best_j >= 0:
                # a lag-modelled series' CUSUM sums the error all its fits agree on (z_all), in the same long-run
                # σ: the intersection of one test per model, so a step or drift of this sensor is found and a
                # fault of its input is not put on it (the input's own statistics find that). It restarts when
                # the model in use changes, and holds at zero while the load input is still to move (as the jump
                # CUSUM below): the thermal response to a new load is where the fits' misfit is largest. Its
                # slow misfit stays in z (the hall's ambient mostly, bench/README): the long-run σ and the
                # allowance take it, the jump CUSUM finds the steps it hides
                if st[S_USE] != best_j + 1.0:
                    hi = 0.0
                    lo = 0.0
                    _block_clear(st, S_BTZ)
                if settled:
                    za = max(-clip * 2.0, min(clip * 2.0, z_all)) * rf
                    done, zb = _block(st, S_BTZ, za, dt)
                    if done:
                        hi, lo, cus = _cusum_step(hi, lo, zb, ck, ch)
                    else:  # (within a block: the sums as they stand, restarted above if the model changed)
                        cus = max(hi, lo)
                else:
                    hi = 0.0
                    lo = 0.0
                    cus = 0.0
                    _block_clear(st, S_BTZ)
            elif not visiting:  # a series its own levels explain: no sum while the visit's offset learns
                done, zb = _block(st, S_BTZ, zc, dt)
                if done:
                    hi, lo, cus = _cusum_step(hi, lo, zb, ck, ch)
                    # an alarm says this visit's offset is wrong now (a step, or a drift its running mean
                    # followed): it is learned anew, as a chart restarts after a signal, so the alarm is not
                    # repeated for the rest of the visit (nor the return of a drift the running mean had followed)
                    relearn = cus >= ch
            else:
                _block_clear(st, S_BTZ)
            st[S_CHI] = hi
            st[S_CLO] = lo
            # jump CUSUM (lag model in use): the error against its local trend's one-step forecast, in that
            # forecast error's long-run σ (learned in steady state) widened by the misfit's share (v1, as in
            # _lag_v01) of the response's own departure from its trend; it restarts when the model in use
            # changes, sums once the trend has learned over its memory (HP_T_S), and holds off (sums at zero, the
            # trend still learning) while its load input is still to move
            jump = 0.0
            if best_j >= 0 and st[S_USE] == best_j + 1.0 and lev[k, L_N] > grace and lev[k, L_DV] > 0.0:
                # a re-fit of the model is no change of the data: its trend moves with the prediction
                st[S_H1] -= refit_p
                st[S_H2] -= refit_p
                st[S_R1] += refit_r
                st[S_R2] += refit_r
                ha = dec[D_HPA]
                hb = 1.0 - ha
                n_h = 1.0 / ha  # samples of the trend's memory
                de = d_raw - (st[S_H1] * (1.0 + hb) - st[S_H2]) / hb
                dr = r_sel - (st[S_R1] * (1.0 + hb) - st[S_R2]) / hb
                if st[S_HVN] == 0.0:
                    st[S_HV] = lev[k, L_DV] * dec[D_HPG]
                tv = v1_sel * dr * dr
                dz = de / math.sqrt(max(st[S_HV], res2) + tv)
                # (one jump counts at most h + k: alone it alarms there, the CUSUM a Shewhart chart at h + k too)
                dz = max(-(ch + ck), min(ch + ck, dz))
                if not settled:  # the load input is still to move: no sums, but the trend keeps learning
                    st[S_HHI] = 0.0
                    st[S_HLO] = 0.0
                    _block_clear(st, S_BTJ)
                elif st[S_HN] >= n_h:  # the trend has learned over its memory: sum
                    done, db = _block(st, S_BTJ, dz, dt)
                    if done:
                        st[S_HHI], st[S_HLO], jump = _cusum_step(st[S_HHI], st[S_HLO], db, ck, ch)
                    else:
                        jump = max(st[S_HHI], st[S_HLO])
                    if tv <= st[S_HV]:  # its in-control spread, learned where no transient dominates
                        st[S_HVN] += 1.0
                        # (its start, the level's noise through the trend's gain, counts as the trend's memory)
                        st[S_HV] += _alpha_a(a_lev, st[S_HVN] + n_h) * (min(de * de, 9.0 * st[S_HV]) - st[S_HV])
                st[S_HN] += 1.0
                ha = max(ha, 1.0 / st[S_HN])  # a plain mean while young
                st[S_H1] += ha * (d_raw - st[S_H1])
                st[S_H2] += ha * (st[S_H1] - st[S_H2])
                st[S_R1] += ha * (r_sel - st[S_R1])
                st[S_R2] += ha * (st[S_R1] - st[S_R2])
            else:  # another model (or none yet): start from its error
                st[S_H1] = d_raw
                st[S_H2] = d_raw
                st[S_R1] = r_sel
                st[S_R2] = r_sel
                st[S_HHI] = 0.0
                st[S_HLO] = 0.0
                st[S_HN] = 0.0
                _block_clear(st, S_BTJ)
            # noise: half the squared difference of consecutive errors of the model in use estimates the
            # variance of its fast part, blind to a slow misfit or an offset (those are the CUSUM's). It is
            # compared, in the series' own units, with the same in the current level over the long run (noise
            # depends on the level; z's σ would change with the model in use): a short EWMA of the ratio. The
            # level's reference averages from its warm-up on, then learns every difference (clipped at clip² times
            # itself) over the level's memory: tripled noise stays an alarm for hours, a lasting change becomes the
            # level's normal (a reference that learned only while the ratio was low kept the quiet moments' noise
            # and alarmed for good where a machine's products differ in noise). A lone series (no sibling to say
            # what its machine does) learns only while the short EWMA is below var_learn: its noise change stays
            # news while it lasts. Nothing is learned while the visit's offset is, nor from a difference that
            # straddles two levels or two models (a jump to another level, or the model in use changed).
            ar = _alpha_a(a_lev, nseen)
            if st[S_N] > 0.0 and not visiting and not straddle[ii] and st[S_USE] == best_j + 1.0:
                de = e_sel - st[S_EP]
                d2 = 0.5 * de * de
                ref = lev[k, L_DV]
                if lev[k, L_N] <= grace or ref <= 0.0:
                    lev[k, L_DV] = ref + (d2 - ref) / (lev[k, L_N] + 1.0) if ref > 0.0 else d2 + 1e-300
                else:
                    st[S_VAR] += va * (min(d2 / max(ref, res2), 36.0) - st[S_VAR])
                    if not alone or st[S_VAR] < var_learn:
                        lev[k, L_DV] += _alpha_a(a_lev, lev[k, L_N] - grace) * (min(d2, clip * clip * ref) - ref)
            st[S_EP] = e_sel
            st[S_USE] = best_j + 1.0
            # a spike against the local error (the model's slow misfit removed) in the level's fast noise:
            # e - its short EWMA has variance σ²·2/(2-α) for independent noise of σ² = the difference variance
            z_loc = 0.0
            if not visiting and lev[k, L_N] > grace and lev[k, L_DV] > 0.0 and st[S_N] > 0.0:
                z_loc = abs(e_sel - st[S_EL]) / math.sqrt(max(lev[k, L_DV], res2) * 2.0 / (2.0 - dec[D_LOC]))
            # (a visit of a level starts it anew, a plain mean of the visit's errors while it learns its offset:
            # the last level's errors are no local mean of this one, and the visit's samples are counted, not
            # timed: at one sample a second its 16 samples left 72 % of the old mean in, a spike at every stop)
            a_loc = max(dec[D_LOC], 1.0 / (st[S_VN] + 1.0)) if visiting else dec[D_LOC]
            st[S_EL] = e_sel if st[S_N] == 0.0 else st[S_EL] + a_loc * (e_sel - st[S_EL])
            zl = max(-clip, min(clip, z))
            st[S_ZZ] += ar * (zl * st[S_ZP] - st[S_ZZ])
            st[S_ZV] += ar * (zl * zl - st[S_ZV])
            st[S_ZP] = zl
            same = st[S_N] > 0.0 and xv == st[S_PREV]
            st[S_RUN] = st[S_RUN] + 1.0 if same else 1.0
            p_same = lev[k, L_SAME]
            need = stuck_min
            if p_same > 1e-12 and st[S_RUN] >= stuck_min:  # (a shorter run is short of any need: no log)
                need = max(stuck_min, log_stuck_p / math.log(min(p_same, 0.999999)) + 1.0)
            warm = nseen > grace
            out[i, 0] = max(az, z_loc, late[ii]) if warm else 0.0
            out[i, 1] = max(cus, jump) / ch if warm else 0.0
            out[i, 2] = st[S_VAR] if warm and nseen > 1.0 / va and lev[k, L_N] > grace + 1.0 / va else 0.0
            out[i, 3] = st[S_RUN] / need if warm and st[S_RUN] >= need else 0.0
            # -- learn: levels (clipped), identical-reading rate, own error, peers
            an = _alpha_a(a_lev, lev[k, L_N] + 1.0)
            if bestz_ok(e_own, sd_own, z_join) and st[S_RUN] < need:  # a stuck sensor teaches nothing
                ecl = max(-clip * sd_own, min(clip * sd_own, e_own)) if lev[k, L_N] > grace else e_own
                if not visiting:  # the visit's offset learns first; the level from samples it explains
                    lev[k, L_MEAN] += an * ecl
                    lev[k, L_VAR] += an * (min(e_own * e_own, (clip * sd_own) ** 2) - lev[k, L_VAR]) \
                        if lev[k, L_N] > grace else (e_own * e_own - lev[k, L_VAR]) / (lev[k, L_N] + 1.0)
                lev[k, L_N] += 1.0
                # every run shorter than an alarm teaches a learned level its repeat rate: a coarse sensor reading
                # a quiet level repeats for long, and learned from the runs' first stuck_min samples only its
                # rate read as ~0.9 and its long runs as stuck. A young level (its weights 1/n) keeps that rule,
                # or a sensor stuck early would teach itself that repeats are normal; so does a lone series (its
                # calibrated scores made the rarer stuck alarms more surprising: NAB's rogue_agent_key_updown
                # 31 -> 51 false positives).
                if st[S_N] > 0.0 and ((not alone and lev[k, L_N] > grace) or st[S_RUN] < stuck_min):
                    lev[k, L_SAME] += an * ((1.0 if same else 0.0) - lev[k, L_SAME])
            # (a check every 16th sample; a machine's series only: a lone series' levels are bins of whatever it
            # measures, not regimes, and merged they reopen: NAB's cpu_utilization 3 -> 22 false positives)
            if regime < 0 and not alone and lev[k, L_N] > grace and (int(lev[k, L_N]) & 15) == 0:
                _merge_close(st, lev, k, 0.5 * z_join)
                k = int(st[S_LEVEL])
            pre = abs(st[S_PRE])
            st[S_ABS_OWN] = pre if st[S_N] == 0.0 else st[S_ABS_OWN] + ar * (pre - st[S_ABS_OWN])
            # the visit offset: learned over the first visit_n samples of each visit, then held
            if lev[k, L_N] > grace and st[S_RUN] < need and (visiting or abs(e_own) <= clip * sd_own):
                st[S_VN] += 1.0
                lim = (z_join if visiting else clip) * sd_own
                st[S_VISIT] += (max(-lim, min(lim, e_own))) / st[S_VN]
                if st[S_VN] == visit_n:  # learned: its square teaches the level's spread of visit offsets
                    lev[k, L_NV] += 1.0
                    lev[k, L_TAU] += (st[S_VISIT] ** 2 - lev[k, L_TAU]) / min(lev[k, L_NV], VISIT_MEMORY)
            ds = abs(xv - st[S_PREV]) if st[S_N] > 0.0 else 0.0
            if ds > 0.0:  # noise scale from the typical step (log-domain EWMA: robust to jumps)
                st[S_SCALE] = math.exp(math.log(st[S_SCALE]) + ar * (math.log(ds) - math.log(st[S_SCALE])))
                st[S_RES] = ds if st[S_RES] == 0.0 else min(st[S_RES], ds)
            if use_group and best_j >= 0:
                # inverse-variance weight: a peer in a transient (σ widened by the response still to come)
                # says little about the hall; in steady state it counts fully. A sample its own model puts
                # beyond clip σ (a dropout, a spike, a fault) says little either (Huber weight): the hall's
                # common mode is what the peers agree on, not one machine's fault
                wg = _alpha_a(dec[D_GROUP], 1e300) / g_members[g] * min(1.0, e2_sel / (sd_sel * sd_sel + 1e-300)) \
                    * min(1.0, clip / (az + 1e-300))
                gs = g_state[g, G_S]
                dv = d_raw - g_state[g, G_C]
                if g_state[g, G_N] < min_group:
                    g_state[g, G_C] += dv / (g_state[g, G_N] + 1.0)
                    g_state[g, G_S] = max(gs, abs(dv))
                else:  # (the spread learns from the clipped deviation too: an outlier widens no clip)
                    dvc = max(-3.0 * gs, min(3.0 * gs, dv))
                    g_state[g, G_C] += wg * dvc
                    g_state[g, G_S] += wg * (1.25 * abs(dvc) - gs)
                g_state[g, G_N] += 1.0
            if relearn:
                _start_visit(st)
            st[S_PREV] = xv
            st[S_N] = nseen
        i0 = i1
    for k in range(n_ev):  # the events that arrived after every sample of their machine
        if k >= e_cur[ev_mach[k]]:
            _ev_take(ev_mach[k], n_rows, ev_ts, ev_pos, ev_reg, ev_done, e_cur, e_lo, e_end, npend, m_state, m_evt)


@njit(cache=True, nogil=True, inline="always")
def _block(st: Any, ti: int, v: float, dt: float) -> tuple[bool, float]:
    """Add a CUSUM's input ``v`` (its sample ``dt`` s after the last) to its block (time ``st[ti]``, weighted
    sum ``st[ti + 1]``): ``(True, the block's time-weighted mean)`` once the block covers ``CUSUM_BLOCK_S`` to
    within half a sample, else ``(False, 0)``. A sample that covers that much alone (``dt`` ≥ ``OWN_BLOCK_S``, or
    the first, ``dt`` = 0) with no block open is a block of its own, ``v`` itself."""
    bt = st[ti]
    if bt == 0.0 and (dt == 0.0 or dt >= OWN_BLOCK_S):
        return True, v
    bt += dt
    sv = st[ti + 1] + v * dt
    if bt >= CUSUM_BLOCK_S - 0.5 * dt:
        _block_clear(st, ti)
        return True, sv / bt
    st[ti] = bt
    st[ti + 1] = sv
    return False, 0.0


@njit(cache=True, nogil=True, inline="always")
def _block_clear(st: Any, ti: int) -> None:
    """Drop the open block at ``st[ti]`` (its sums restart)."""
    st[ti] = 0.0
    st[ti + 1] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _cusum_step(hi: float, lo: float, z: float, k: float, h: float) -> tuple[float, float, float]:
    """One step of a two-sided CUSUM: ``(high, low, statistic)``, both sides restarting once it reaches ``h``."""
    hi = max(0.0, hi + z - k)
    lo = max(0.0, lo - z - k)
    stat = max(hi, lo)
    if stat >= h:
        return 0.0, 0.0, stat
    return hi, lo, stat


@njit(cache=True, nogil=True, inline="always")
def bestz_ok(e: float, sd: float, z_join: float) -> bool:
    """A sample teaches its level only if it belongs to it (within ``z_join`` σ)."""
    return abs(e) <= z_join * sd
