"""Tabular two-sided CUSUM on the EWMA-standardised stream."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, Detector, StateField, squash
from gateway.detect.ewma import EWMA_FIELDS, ewma_learn, ewma_z

__all__ = ["CusumDetector"]


class CusumDetector(Detector):
    """Tabular CUSUM: ``S+ = max(0, S+ + z - k)``, ``S- = max(0, S- - z - k)``; alarm at ``max ≥ h``.

    ``z`` is the sample standardised by a slow EWMA mean/σ (``alpha``; 0 = estimated over the grace
    period then frozen). Both sums restart at 0 after an alarm, and stay 0 during the grace period.
    ``score = 1 - 2**(-max(S+, S-) / h)``, so the alarm point is 0.5.

    Parameters
    ----------
    k, h
        Allowance and decision interval, in σ units.
    alpha
        EWMA factor of the in-control mean/σ estimate.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> x = rng.normal(0.0, 1.0, 300); x[200:] += 1.5  # a small sustained shift
    >>> s = CusumDetector(alpha=0.0).score_learn(np.zeros(300, np.int64), x)
    >>> first = int(np.argmax(s >= 0.5)); 200 <= first < 215
    True
    """

    name = "cusum"

    def __init__(
        self,
        *,
        k: float = 0.5,
        h: float = 5.0,
        alpha: float = 0.005,
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
    ) -> None:
        self.k = k
        self.h = h
        self.alpha = alpha
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        return {
            **EWMA_FIELDS,
            "s_hi": StateField((), np.float64, 0.0),
            "s_lo": StateField((), np.float64, 0.0),
        }

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        d, _, z = ewma_z(st, x, m)
        warm = st["n_seen"][:m] >= self.grace_samples
        s_hi = st["s_hi"][:m]
        s_lo = st["s_lo"][:m]
        s_hi += z
        s_hi -= self.k
        np.maximum(s_hi, 0.0, out=s_hi)
        s_lo -= z
        s_lo -= self.k
        np.maximum(s_lo, 0.0, out=s_lo)
        s_hi *= warm
        s_lo *= warm
        stat = np.maximum(s_hi, s_lo)
        keep = stat < self.h  # restart both sums after an alarm
        s_hi *= keep
        s_lo *= keep
        score, learn = self._gate(st, squash(stat, self.h), m)
        ewma_learn(st, d, m, self.alpha, learn, freeze_after=self.grace_samples)
        return score
