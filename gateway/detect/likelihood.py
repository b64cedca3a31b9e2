"""Calibrated scores: how improbable a series' raw score is given its own recent distribution.

A detector's alarm point is set in σ units, which is right only where its model fits: on a series the
model explains poorly (a lone metric with a trend, daily and weekly cycles and level shifts, no sibling
and no state channel to explain them) the raw score reaches its alarm point over and over. The leading
NAB detectors (HTM, ARTime, CAD-OSE) therefore report Numenta's *anomaly likelihood* rather than the raw
score: the raw score is smoothed over the latest few samples, its distribution is learned per series,
and the score is the tail probability ``p`` of the current smoothed value. One threshold on ``p`` then
fits many series.

Here the smoothed raw score is an EWMA over ``average`` samples, taken back to its statistic's own scale,
``t = -ln(1 - score)`` (every raw score is ``squash``-ed, so ``t`` is proportional to the CUSUM's sum,
the spike's |z|, the noise ratio's excess). Numenta takes ``p`` from a Gaussian of the smoothed score's
mean and variance (``law = "gaussian"``); but the statistics are not Gaussian: a CUSUM is 0 most of the
time and its excursions have an exponential tail, a noise ratio is skewed, and a Gaussian tail on them
made pure noise alarm every few hundred samples. So ``p`` is taken the way peaks-over-threshold methods
do (SPOT, Siffer et al., KDD 2017): the tail starts ``tail_from`` σ above ``t``'s mean, ``u = mean +
tail_from·sd`` (``sd`` at least ``sd_floor``), and beyond it is exponential (a generalised Pareto tail of
shape 0), ``p = π·exp(-(t - u)/β)`` with ``π`` the rate of samples beyond ``u`` and ``β`` their mean
excess, all learned over ``memory`` samples (running means while younger; ``β`` starts at ``sd``, as one
excess). An exponential tail is what a CUSUM has and heavier than a Gaussian's, so a Gaussian statistic
is judged conservatively: an 8 σ spike in noise is still ``p`` ≈ 1e-8. At or below ``u`` the score is 0.
The calibrated score is ``1 - 2**(-log p / log p_alarm)``: 0.5 at ``p = p_alarm``, 0.75 at ``p_alarm²``,
as the ``stuck`` detector maps its run probability. Each sample is scored against the state before it,
then learned. It is 0 for the first ``grace`` samples of a series (the detectors' raw scores are 0 then,
so they are not learned either) and the next ``warm_up`` (learned only); a NaN raw score (a detector
still warming up) scores 0 and is not learned.

>>> import numpy as np
>>> from gateway.detect.base import BatchLayout, squash
>>> cal = ScoreLikelihood(LikelihoodParams(), grace=30)
>>> rng = np.random.default_rng(0)
>>> noisy = squash(np.abs(rng.normal(1.0, 0.3, 600)), 1.0)  # a statistic at its alarm point half of the time
>>> quiet = squash(np.abs(rng.normal(0.0, 0.2, 600)), 1.0)  # one mostly far below it ...
>>> quiet[500] = squash(np.array(2.0), 1.0)                 # ... but for one sample (10 σ)
>>> series = np.tile(np.array([0, 1], np.int64), 600)
>>> raw = np.ravel(np.column_stack([noisy, quiet]))
>>> lay = BatchLayout.build(series)
>>> out = lay.unpack(cal.run(lay, lay.pack(raw))[:, 0])
>>> bool((out[series == 0] >= 0.5).any()), np.flatnonzero(out[series == 1] >= 0.5).tolist()
(False, [500])
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway.batch import F64, I64, room_for
from gateway.checkpoint import State
from gateway.detect.base import BatchLayout
from gateway.detect.jit import njit

__all__ = ["LikelihoodParams", "ScoreLikelihood", "Slots"]

C_N = 0  # samples seen
C_AVG = 1  # short EWMA of the raw score
C_MU = 2  # long-run mean of t = -ln(1 - that average)
C_VAR = 3  # long-run variance of t
C_G = 4  # samples of the series seen (the first grace ones are not learned)
C_PX = 5  # rate of samples beyond the tail's start u (π)
C_BX = 6  # their mean excess over u (β)
C_NX = 7  # samples beyond u seen
N_C = 8
CLIP = 3.0  # excesses are learned clipped at this many times their mean (as the machine model's errors at 3 σ)
CLIP_MEAN = 1.0 - math.exp(-CLIP)
T_MAX = 53.0 * math.log(2.0)  # t of a score of 1.0: squash rounds to 1 beyond 53 halvings


class LikelihoodParams(BaseModel):
    """``[detect.likelihood]``: each machine-model score (and ``seasonal``'s) of a lone series reported as its
    tail probability (see the module docstring).

    >>> p = LikelihoodParams()
    >>> p.scope, p.memory, p.p_alarm
    ('lone', 8640.0, 1e-05)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: Literal["lone", "all", "off"] = Field(
        "lone",
        description="Which series report the calibrated score: 'lone' the series of the machine model with no "
        "sibling metric on their machine (no lag fit: only its own levels, and a state channel's regimes "
        "if it has one, explain it, so its raw score is not Gaussian-calibrated); 'all' every series of the "
        "machine model; 'off' none. Only those series learn the distribution.",
    )
    memory: float = Field(
        8640.0, gt=1,
        description="Samples of memory of the smoothed score's mean and variance (EWMA, a running mean while "
        "younger). Numenta's historic window: 30 days of 5-minute samples, long enough to span weekly cycles.",
    )
    average: float = Field(
        1.0, ge=1,
        description="Samples the raw score is smoothed over (EWMA factor 2/(average+1)) before its tail "
        "probability is taken. 1 = none: the machine model's statistics already integrate over time "
        "(CUSUM, noise EWMA), and a spike is a single sample.",
    )
    p_alarm: float = Field(
        1e-5, gt=0, lt=0.5,
        description="Tail probability that maps to score 0.5 (the alarm point). Numenta's red threshold "
        "(likelihood 1 - 1e-5); as a budget, one false alarm per 10⁵ samples of a well-fitted series.",
    )
    warm_up: int = Field(
        100, ge=1,
        description="Samples of the raw score learned (after the detectors' grace period, when raw scores are "
        "still 0) before the calibrated score is reported: Numenta's estimation samples; σ estimated from "
        "100 samples is within 7 % (1/√(2n)).",
    )
    sd_floor: float = Field(
        0.0039, gt=0,
        description="Least σ of the smoothed score (Numenta's floor, variance 1.5e-5): a series whose score "
        "has been constant does not turn every tiny blip into an alarm.",
    )
    law: Literal["exponential", "gaussian"] = Field(
        "exponential",
        description="The tail law of the scores: 'exponential' beyond tail_from σ (peaks over threshold; what a "
        "CUSUM's excursions follow, and heavier than a Gaussian's, so pure noise alarms about once in 1/p_alarm "
        "samples); 'gaussian' Numenta's Gaussian tail of the smoothed score itself (more alarms: on pure noise "
        "a lone series alarmed every few hundred samples; the NAB benchmark, which charges a false positive a "
        "ninth of a missed window, scored it higher on its 7 files here).",
    )
    tail_from: float = Field(
        2.0, gt=0,
        description="Where the exponential tail starts, in σ above the score's mean: the top few percent of "
        "most distributions (peaks-over-threshold methods start their tail at the 98th percentile), so there "
        "are excesses to learn its scale from, and the body is not judged by the tail's law.",
    )


@njit(cache=True, nogil=True)
def _calibrate(slots: Any, active: Any, offsets: Any, raw: Any, st: Any, prm: Any, out: Any, mask: Any) -> None:
    """Score then learn every packed sample and channel of the local rows with a state slot (``slots[r]`` ≥ 0)
    and ``mask[i]``, step by step (each series' samples in order); the others keep their raw scores and
    learn nothing."""
    grace = prm[0]
    memory = prm[1]
    beta = prm[2]
    log_alarm = math.log(prm[3])
    floor = prm[4]
    warm = prm[5]
    tail_from = prm[6]
    gaussian = prm[7] != 0.0
    n_ch = raw.shape[1]
    for k in range(active.shape[0]):
        a = offsets[k]
        for r in range(active[k]):
            s = slots[r]
            i = a + r
            if s < 0 or not mask[i]:
                for c in range(n_ch):
                    out[i, c] = raw[i, c]
                continue
            for c in range(n_ch):
                row = st[s, c]
                row[C_G] += 1.0
                if row[C_G] <= grace:  # the detectors' grace period: raw scores are 0, nothing to learn
                    out[i, c] = 0.0
                    continue
                x = raw[i, c]
                if math.isnan(x):  # the detector has no score yet (warming up): nothing to report or learn
                    out[i, c] = 0.0
                    continue
                n = row[C_N]
                avg = x if n == 0.0 else row[C_AVG] + beta * (x - row[C_AVG])
                # the statistic's own scale (squash inverted); Numenta's law: the smoothed score itself
                t = avg if gaussian else (-math.log1p(-avg) if avg < 1.0 else T_MAX)
                sd = math.sqrt(row[C_VAR])
                if sd < floor:
                    sd = floor
                u = row[C_MU] + tail_from * sd
                if row[C_NX] == 0.0 and not gaussian:
                    row[C_BX] = sd  # (the prior: one excess of σ)
                score = 0.0
                if gaussian and n >= warm:
                    p = 0.5 * math.erfc((t - row[C_MU]) / (sd * math.sqrt(2.0)))
                    if p < 1e-300:
                        p = 1e-300
                    score = -math.expm1(math.log(p) / log_alarm * -math.log(2.0))
                elif n >= warm and t > u:
                    # (π at least one sample in those seen, up to the memory: none beyond u yet is no certainty)
                    log_p = math.log(max(row[C_PX], 1.0 / min(n, memory))) - (t - u) / row[C_BX]
                    if log_p < 0.0:
                        score = -math.expm1(log_p / log_alarm * -math.log(2.0))
                out[i, c] = score
                n += 1.0
                w = 1.0 / n
                if w < 1.0 / memory:
                    w = 1.0 / memory
                beyond = t > u and not gaussian  # (the Gaussian law learns no tail)
                row[C_PX] += w * ((1.0 if beyond else 0.0) - row[C_PX])
                if beyond:  # an excess: its mean over as many excesses as the memory holds (the prior one of them)
                    row[C_NX] += 1.0
                    if row[C_N] < warm:  # a plain mean while warming up (the first replaces the prior)
                        row[C_BX] += ((t - u) - row[C_BX]) / row[C_NX]
                    else:
                        wx = 1.0 / (row[C_NX] + 1.0)
                        if wx < 1.0 / (memory * row[C_PX]):
                            wx = 1.0 / (memory * row[C_PX])
                        # (clipped at CLIP β, Huber-like, so one large anomaly does not make the next look usual;
                        # an exponential's mean clipped so is (1 - e^-CLIP) β: divided out)
                        row[C_BX] += wx * (min(t - u, CLIP * row[C_BX]) / CLIP_MEAN - row[C_BX])
                d = t - row[C_MU]
                row[C_MU] += w * d
                row[C_VAR] = (1.0 - w) * (row[C_VAR] + w * d * d)
                row[C_AVG] = avg
                row[C_N] = n


class Slots:
    """Dense state slots for the few series that need them (lone series among many with siblings): a map
    series id → slot (-1: none), slots handed out in order of first use (by series id within a batch).
    A snapshot is canonical (by series id), so it does not depend on where batches were cut.

    >>> sl = Slots()
    >>> sl.assign(np.array([9, 4, 7]), np.array([True, False, True])).tolist()
    [1, -1, 0]
    >>> sl.assign(np.array([4, 9]), np.array([True, True])).tolist(), sl.ids.tolist()
    ([2, 1], [7, 9, 4])
    """

    def __init__(self) -> None:
        self._of: I64 = np.full(0, -1, np.int64)
        self.ids: I64 = np.zeros(0, np.int64)  # series id of each slot

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def assign(self, rows: I64, use: npt.NDArray[np.bool_]) -> I64:
        """Slot of each of ``rows`` (distinct series ids) where ``use``, a new one if it has none; else -1."""
        need = int(rows.max()) + 1
        if self._of.shape[0] < need:
            self._of = room_for(self._of, self._of.shape[0], need, -1)
        slot = self._of[rows]
        new = use & (slot < 0)
        if new.any():
            ids = np.sort(rows[new])
            self._of[ids] = np.arange(len(self), len(self) + ids.shape[0])
            self.ids = np.concatenate((self.ids, ids))
            slot = self._of[rows]
        out: I64 = np.where(use, slot, -1)
        return out

    def order(self) -> I64:
        """Slots by series id (a canonical order for snapshots)."""
        out: I64 = np.argsort(self.ids, kind="stable")
        return out

    def restore(self, ids: I64) -> None:
        """Slots ``0..len(ids)-1`` for the series ``ids`` (sorted, distinct), as :meth:`order` saved them."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype != np.int64 or (ids.shape[0] > 1 and bool((np.diff(ids) <= 0).any())) \
                or (ids.shape[0] and int(ids[0]) < 0):
            raise ValueError(f"slot ids have shape {ids.shape} {ids.dtype}, expected sorted distinct int64 ids")
        self.ids = ids.copy()
        self._of = np.full(int(ids.max()) + 1 if ids.shape[0] else 0, -1, np.int64)
        self._of[ids] = np.arange(ids.shape[0])


class ScoreLikelihood:
    """Calibration state of ``channels`` raw scores in one flat ``(slots, channels, 5)`` array, a slot per
    series calibrated (:class:`Slots`); :meth:`run` scores then learns.

    >>> cal = ScoreLikelihood(LikelihoodParams(), grace=0, channels=1)
    >>> raw = np.r_[np.tile([0.1, 0.2], 100), 0.9]   # t = 0.16 ± 0.06, beyond u = 0.28 once (its 2nd sample,
    >>> lay = BatchLayout.build(np.zeros(raw.shape[0], np.int64))  # when σ was unknown), then 2.3: p ≈ 5e-11
    >>> out = cal.run(lay, lay.pack(raw))[:, 0]
    >>> float(out[:100].max()), round(float(out[-1]), 3), cal.n_series
    (0.0, 0.765, 1)
    """

    def __init__(self, params: LikelihoodParams, grace: int = 30, channels: int = 1) -> None:
        self.params = params
        self.grace = int(grace)
        self.channels = int(channels)
        self._prm = np.array([float(grace), params.memory, 2.0 / (params.average + 1.0), params.p_alarm,
                              params.sd_floor, float(params.warm_up), params.tail_from,
                              1.0 if params.law == "gaussian" else 0.0], np.float64)
        self._buf = np.zeros((0, self.channels, N_C))
        self.state = self._buf
        self.slots = Slots()

    @property
    def n_series(self) -> int:
        """Series with a calibration state."""
        return len(self.slots)

    def _grow(self, needed: int) -> None:
        have = int(self.state.shape[0])
        if needed <= have:
            return
        buf = self._buf if self.state.base is self._buf else self.state
        grown = room_for(buf, have, needed)
        grown[have:needed] = 0.0
        self._buf = grown
        self.state = grown[:needed]

    def run(self, layout: BatchLayout, raw: F64, use: npt.NDArray[np.bool_] | None = None,
            samples: npt.NDArray[np.bool_] | None = None) -> F64:
        """Calibrated scores of the packed raw scores ``raw`` (samples × channels, see :class:`BatchLayout`);
        ``use`` (per local row, default all) marks the series calibrated, ``samples`` (per packed sample,
        default all) which of their samples; the others keep ``raw``."""
        raw = np.ascontiguousarray(raw, np.float64).reshape(raw.shape[0], self.channels)
        out = np.zeros(raw.shape, np.float64)
        if layout.n_steps == 0:
            return out
        mask = np.ones(layout.rows.shape[0], np.bool_) if use is None else np.asarray(use, np.bool_)
        slots = self.slots.assign(layout.rows, mask)
        self._grow(len(self.slots))
        sm = np.ones(raw.shape[0], np.bool_) if samples is None else np.ascontiguousarray(samples, np.bool_)
        _calibrate(slots, layout.active, layout.offsets, raw, self.state, self._prm, out, sm)
        return out

    def snapshot(self, n: int | None = None) -> State:
        """The state of the calibrated series (of ids below ``n``, default all), by series id, copies."""
        o = self.slots.order()
        if n is not None:
            o = o[self.slots.ids[o] < n]
        return State({}, {"ids": self.slots.ids[o], "state": self.state[o]})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot`."""
        arr, ids = state.array("state"), state.array("ids")
        if arr.shape[1:] != (self.channels, N_C) or arr.dtype != np.float64 or arr.shape[0] != ids.shape[0]:
            raise ValueError(f"likelihood state has shape {arr.shape} {arr.dtype}, "
                             f"expected ({ids.shape[0]}, {self.channels}, {N_C}) float64")
        self.slots = Slots()
        self.slots.restore(ids)
        self.state = self._buf = np.array(arr, np.float64)
