"""Spike / rate of change: the step from the previous reading against its EWMA RMS."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, Detector, StateField, squash

__all__ = ["UP_RATE", "SpikeDetector"]

UP_RATE = 2.5  # the mean squared step learns this many times faster when a step is above it


class SpikeDetector(Detector):
    """``z = (x - previous) / RMS(step)``, ``score = 1 - 2**(-|z| / z_alarm)``.

    The mean squared step is an EWMA (1/n while young) with factor ``UP_RATE·alpha`` when the squared
    step is above it and ``alpha`` when below, so it rises fast in a burst of large steps and the burst
    raises one alarm rather than one per step; the previous reading always
    advances, flagged steps stay out of the RMS when ``learn_flagged`` is False.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.sin(np.arange(200) / 5.0); x[120] += 3.0
    >>> s = SpikeDetector().score_learn(np.zeros(200, np.int64), x)
    >>> int(np.argmax(s)), bool(s[120] > 0.8)
    (120, True)
    """

    name = "spike"

    def __init__(
        self,
        *,
        alpha: float = 0.02,
        z_alarm: float = 6.0,
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
    ) -> None:
        self.alpha = alpha
        self.alpha_up = min(UP_RATE * alpha, 1.0)
        self.z_alarm = z_alarm
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        return {
            "prev": StateField((), np.float64, 0.0),
            "msq": StateField((), np.float64, 0.0),
            "n_learn": StateField((), np.float64, 0.0),
        }

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        prev = st["prev"][:m]
        msq = st["msq"][:m]
        nl = st["n_learn"][:m]
        d = x - prev
        d *= nl > 0  # the first reading of a series has no step
        floor = prev * 1e-6
        floor *= floor
        floor += 1e-18
        floor += msq
        z = d / np.sqrt(floor, out=floor)
        score, learn = self._gate(st, squash(np.abs(z), self.z_alarm), m)
        d *= d
        d -= msq
        a = 1.0 / np.maximum(nl, 1.0)
        np.maximum(a, np.where(d > 0.0, self.alpha_up, self.alpha), out=a)
        a *= nl > 0  # no step to learn from on the first reading
        if learn is not None:
            a *= learn
        d *= a
        msq += d
        nl += 1.0
        prev[:] = x
        return score
