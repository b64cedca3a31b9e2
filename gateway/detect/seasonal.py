"""The ``seasonal`` detector: a lone series against its own profile of the time of day.

A series with no sibling metric on its machine (a lone metric: a room temperature, a request rate, a
CPU load) has nothing but its own history to explain why it rises every morning: the machine
model's levels see a daily cycle as drifts and level changes. So each such series keeps a profile of
the day in ``buckets`` buckets of the time of day (hourly by default: it resolves the daily cycle and
its harmonics up to 12 a day), each a mean and variance of the readings that fell into it, forgotten
over ``memory_periods`` periods (4 weeks: weekdays and weekends both shape the profile). The statistic
is ``|z|``, the reading against its bucket in that bucket's σ, scored ``squash(|z|, z_alarm)``; it is 0
until the series has been seen for a whole period and the bucket ``min_samples`` times (NaN: not yet
scored, which the calibration of :mod:`gateway.detect.likelihood` does not learn from), and 0 for series with a
sibling (the machine model's lag fit and levels explain those). Every sample learns, so a lasting
change becomes the new profile within the memory.

Learning is time-based, so it does not depend on the sampling rate: a sample that is ``dt`` after its
series' previous one weighs ``1 - exp(-dt / (memory_periods · width))``, ``width`` the bucket's span
(a running mean while the bucket is young), so each bucket forgets over ``memory_periods`` periods.

>>> import numpy as np
>>> from gateway.detect.base import BatchLayout
>>> hour = 3600 * 10**9
>>> t = np.arange(24 * 30, dtype=np.int64) * hour                   # 30 days, hourly
>>> x = 20.0 + 5.0 * np.sin(2 * np.pi * np.arange(t.size) / 24)     # a daily cycle of ±5
>>> x += np.random.default_rng(0).normal(0, 0.2, t.size)
>>> x[24 * 25 + 3] += 4.0                                           # 20 σ off its hour, within the cycle's range
>>> det = SeasonalProfile(SeasonalParams(), grace=30)
>>> lay = BatchLayout.build(np.zeros(t.size, np.int64))
>>> s = det.run(lay, lay.pack(x), lay.pack(t * 1e-9), np.ones(1, np.bool_))
>>> np.flatnonzero(s >= 0.5).tolist(), int(np.isnan(s).sum())  # NaN: no score yet (the first 8 days)
([603], 192)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway.batch import F64, room_for
from gateway.checkpoint import State
from gateway.detect.base import BatchLayout
from gateway.detect.jit import njit
from gateway.detect.likelihood import Slots

__all__ = ["SeasonalParams", "SeasonalProfile"]

B_MEAN = 0
B_VAR = 1
B_N = 2
N_B = 3
H_N = 0  # samples seen
H_FIRST = 1  # time of the first sample (s)
H_LAST = 2  # time of the last sample (s)
N_H = 3


class SeasonalParams(BaseModel):
    """``[detect.seasonal]``: the time-of-day profile of a lone series (``seasonal``).

    >>> p = SeasonalParams()
    >>> p.period_s / p.buckets, p.memory_periods  # hourly buckets, 4 weeks
    (3600.0, 28.0)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    period_s: float = Field(86400.0, gt=0, description="The cycle profiled (seconds): a day, the cycle of human "
                            "activity, shifts and the ambient temperature.")
    buckets: int = Field(24, ge=1, le=1440, description="Buckets of the period: 24 = hourly, which resolves the "
                         "daily cycle's harmonics up to 12 a day.")
    memory_periods: float = Field(28.0, gt=0, description="Periods a bucket remembers (time-based forgetting): "
                                  "4 weeks, so weekdays and weekends both shape the profile.")
    min_samples: int = Field(8, ge=2, description="Samples a bucket needs before it scores: σ estimated from n "
                             "samples is within 1/√(2n), 25 % at 8 (a σ 25 % low would turn 3.75 σ into an alarm).")
    z_alarm: float = Field(5.0, gt=0, description="|z| against the bucket that maps to score 0.5 (5 σ: a Gaussian "
                           "tail of 6·10⁻⁷, as the machine model's z_spike).")


@njit(cache=True, nogil=True)
def _seasonal(slots: Any, active: Any, offsets: Any, x: Any, t: Any, bk: Any, hd: Any, prm: Any, out: Any,
              mask: Any) -> None:
    """Score then learn every packed sample of the local rows with a state slot (``slots[r]`` ≥ 0; each
    series' samples in order) and ``mask[i]``."""
    grace = prm[0]
    period = prm[1]
    nb = int(prm[2])
    memory = prm[3]
    zl = prm[4]
    min_n = prm[5]
    width = period / nb
    ln2 = math.log(2.0)
    for k in range(active.shape[0]):
        a = offsets[k]
        for r in range(active[k]):
            i = a + r
            out[i] = 0.0
            s = slots[r]
            if s < 0 or not mask[i]:
                continue
            h = hd[s]
            tv = t[i]
            xv = x[i]
            if h[H_N] == 0.0:
                h[H_FIRST] = tv
                h[H_LAST] = tv
            b = int(math.floor(tv / width)) % nb
            if b < 0:
                b += nb
            q = bk[s, b]
            if h[H_N] >= grace and q[B_N] >= min_n and tv - h[H_FIRST] >= period:
                sd = math.sqrt(q[B_VAR] + (1e-6 * q[B_MEAN]) ** 2 + 1e-18)
                out[i] = -math.expm1(-ln2 * abs(xv - q[B_MEAN]) / sd / zl)
            else:
                out[i] = math.nan  # no score yet (not 0: a calibration must not learn the warm-up as normal)
            dt = tv - h[H_LAST]
            if dt < 0.0:
                dt = 0.0
            q[B_N] += 1.0
            w = 1.0 - math.exp(-dt / (memory * width))
            if w < 1.0 / q[B_N]:
                w = 1.0 / q[B_N]
            d = xv - q[B_MEAN]
            q[B_MEAN] += w * d
            q[B_VAR] = (1.0 - w) * (q[B_VAR] + w * d * d)
            h[H_LAST] = tv
            h[H_N] += 1.0


class SeasonalProfile:
    """Bucket state ``(slots, buckets, 3)`` and head ``(slots, 3)``, a slot per profiled series
    (:class:`gateway.detect.likelihood.Slots`); :meth:`run` scores then learns."""

    def __init__(self, params: SeasonalParams, grace: int = 30) -> None:
        self.params = params
        self._prm = np.array([float(grace), params.period_s, float(params.buckets), params.memory_periods,
                              params.z_alarm, float(params.min_samples)], np.float64)
        self.buckets = np.zeros((0, params.buckets, N_B))
        self.head = np.zeros((0, N_H))
        self.slots = Slots()
        self._bufs: dict[str, npt.NDArray[Any]] = {}

    @property
    def n_series(self) -> int:
        """Series profiled."""
        return len(self.slots)

    def _grow(self, needed: int) -> None:
        have = int(self.head.shape[0])
        if needed <= have:
            return
        for name in ("buckets", "head"):
            cur: npt.NDArray[Any] = getattr(self, name)
            buf = self._bufs.get(name)
            if buf is None or cur.base is not buf:
                buf = cur
            grown = room_for(buf, have, needed)
            grown[have:needed] = 0.0
            self._bufs[name] = grown
            setattr(self, name, grown[:needed])

    def run(self, layout: BatchLayout, values: F64, t_s: F64, use: npt.NDArray[np.bool_],
            samples: npt.NDArray[np.bool_] | None = None) -> F64:
        """Scores of the packed ``values`` at packed times ``t_s`` (seconds); ``use`` marks the local rows
        profiled, ``samples`` (per packed sample, default all) which of their samples (the others score 0
        and learn nothing). NaN while a profiled series or its bucket is young."""
        out = np.zeros(values.shape[0], np.float64)
        if layout.n_steps == 0 or not use.any():
            return out
        slots = self.slots.assign(layout.rows, np.asarray(use, np.bool_))
        self._grow(len(self.slots))
        sm = np.ones(values.shape[0], np.bool_) if samples is None else np.ascontiguousarray(samples, np.bool_)
        _seasonal(slots, layout.active, layout.offsets, np.ascontiguousarray(values, np.float64),
                  np.ascontiguousarray(t_s, np.float64), self.buckets, self.head, self._prm, out, sm)
        return out

    def snapshot(self, n: int | None = None) -> State:
        """The state of the profiled series (of ids below ``n``, default all), by series id, copies."""
        o = self.slots.order()
        if n is not None:
            o = o[self.slots.ids[o] < n]
        return State({}, {"ids": self.slots.ids[o], "buckets": self.buckets[o], "head": self.head[o]})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot`."""
        ids, b, h = state.array("ids"), state.array("buckets"), state.array("head")
        if b.shape[1:] != (self.params.buckets, N_B) or h.shape[1:] != (N_H,) or not b.shape[0] == h.shape[0] \
                == ids.shape[0] or b.dtype != np.float64 or h.dtype != np.float64:
            raise ValueError(f"seasonal state has shapes {b.shape} {h.shape}")
        self.slots = Slots()
        self.slots.restore(ids)
        self.buckets = np.array(b, np.float64)
        self.head = np.array(h, np.float64)
        self._bufs = {}
