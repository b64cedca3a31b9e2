"""EWMA mean/variance z-score detector, and the EWMA standardiser other detectors share."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, BatchLayout, Detector, StateField, squash

__all__ = ["EwmaDetector"]

EWMA_FIELDS = {
    "mean": StateField((), np.float64, 0.0),
    "var": StateField((), np.float64, 0.0),
    "n_learn": StateField((), np.float64, 0.0),
}


def ewma_z(st: dict[str, Arr], x: F64, m: int) -> tuple[F64, F64, F64]:
    """Return (x - mean, σ, z) of the first ``m`` rows against their EWMA baseline."""
    mean = st["mean"][:m]
    d: F64 = x - mean
    # A tiny floor relative to the level keeps constant stretches from dividing by zero.
    floor = mean * 1e-6
    floor *= floor
    floor += 1e-18
    floor += st["var"][:m]
    sd: F64 = np.sqrt(floor, out=floor)
    return d, sd, d / sd


def ewma_learn(st: dict[str, Arr], d: F64, m: int, alpha: float, learn: F64 | None, freeze_after: int = -1) -> None:
    """Fold ``d = x - mean`` into the EWMA mean/variance of the first ``m`` rows.

    The factor starts at 1/n (a plain running mean while young) and settles at ``alpha``. With
    ``alpha == 0`` and ``freeze_after >= 0`` it is a running mean of the first ``freeze_after`` samples,
    then frozen (the classic phase I / phase II split).
    """
    nl = st["n_learn"][:m]
    a: F64 = 1.0 / (nl + 1.0)
    if alpha > 0:
        np.maximum(a, alpha, out=a)
    elif freeze_after >= 0:
        a *= nl < freeze_after
    if learn is not None:
        a *= learn
        nl += learn
    else:
        nl += 1.0
    mean = st["mean"][:m]
    var = st["var"][:m]
    ad = a * d
    mean += ad
    ad *= d
    var += ad
    var *= 1.0 - a


class EwmaDetector(Detector):
    """Exponentially weighted mean/variance z-score: ``score = 1 - 2**(-|z| / z_alarm)``.

    Parameters
    ----------
    alpha
        EWMA smoothing factor.
    z_alarm
        |z| that maps to score 0.5.
    grace_samples, threshold, learn_flagged
        See :class:`~gateway.detect.base.Detector`.
    record
        Keep the expected value (EWMA mean) and z of every sample of the last batch, packed.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(10.0, 1.0, 200); x[150] = 25.0
    >>> det = EwmaDetector(grace_samples=30)
    >>> s = det.score_learn(np.zeros(200, np.int64), x)
    >>> int(np.argmax(s)), bool(s[150] > 0.9), float(s[:30].max())
    (150, True, 0.0)
    """

    name = "ewma"

    def __init__(
        self,
        *,
        alpha: float = 0.02,
        z_alarm: float = 4.0,
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
        record: bool = False,
    ) -> None:
        self.alpha = alpha
        self.z_alarm = z_alarm
        self.record = record
        self.expected: F64 = np.empty(0, np.float64)
        self.zscore: F64 = np.empty(0, np.float64)
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        return dict(EWMA_FIELDS)

    def run(self, layout: BatchLayout, packed: F64) -> F64:
        if self.record:
            self.expected = np.empty(packed.shape[0], np.float64)
            self.zscore = np.empty(packed.shape[0], np.float64)
        return super().run(layout, packed)

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        d, _, z = ewma_z(st, x, m)
        if self.record:
            self.expected[self._slice] = st["mean"][:m]
            self.zscore[self._slice] = z
        score, learn = self._gate(st, squash(np.abs(z), self.z_alarm), m)
        ewma_learn(st, d, m, self.alpha, learn)
        return score
