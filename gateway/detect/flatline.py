"""Flatline / stuck sensor: the same reading ``n`` times in a row."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, Detector, StateField, squash

__all__ = ["FlatlineDetector"]


class FlatlineDetector(Detector):
    """Counts identical readings (within ``tolerance``); from ``n`` in a row the score is
    ``1 - 2**(-run/n)`` (0.5 at exactly ``n``, rising while the sensor stays stuck), else 0.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.r_[np.arange(40.0), np.full(12, 7.0)]
    >>> s = FlatlineDetector(n=10, grace_samples=5).score_learn(np.zeros(52, np.int64), x)
    >>> int(np.argmax(s >= 0.5)), float(s[48])  # the 10th identical reading is sample 49
    (49, 0.0)
    """

    name = "flatline"

    def __init__(
        self,
        *,
        n: int = 30,
        tolerance: float = 0.0,
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
    ) -> None:
        self.n = n
        self.tolerance = tolerance
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        return {"last": StateField((), np.float64, np.nan), "run": StateField((), np.float64, 0.0)}

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        last = st["last"][:m]
        run = st["run"][:m]
        same = np.abs(x - last) <= self.tolerance
        run += 1.0
        run *= same
        run += 1.0 - same  # a changed reading starts a new run of 1
        last[:] = x
        raw = squash(run, float(self.n))
        raw *= run >= self.n
        score, _ = self._gate(st, raw, m)
        return score
