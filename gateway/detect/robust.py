"""Hampel-style robust detector: rolling median and MAD over a trailing window (a per-series ring)."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, Detector, StateField, squash

__all__ = ["RobustDetector"]

_MAD_TO_SIGMA = 1.4826


class RobustDetector(Detector):
    """``z = (x - median) / (1.4826 · MAD)`` over the last ``window`` learned readings,
    ``score = 1 - 2**(-|z| / n_sigmas)``.

    Each series keeps a ring buffer of shape ``(window,)``; median and MAD are recomputed every
    ``refresh`` learned readings (1 = after every reading, exact; larger trades freshness for speed —
    the recompute is a sort of the window). Flagged readings stay out of the window when
    ``learn_flagged`` is False.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> x = rng.normal(5.0, 0.5, 120); x[90] = 12.0
    >>> s = RobustDetector(window=16, refresh=1).score_learn(np.zeros(120, np.int64), x)
    >>> int(np.argmax(s)), bool(s[90] > 0.5)
    (90, True)
    """

    name = "robust"

    def __init__(
        self,
        *,
        window: int = 32,
        n_sigmas: float = 4.0,
        refresh: int = 4,
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
    ) -> None:
        self.window = window
        self.n_sigmas = n_sigmas
        self.refresh = refresh
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        return {
            "buf": StateField((self.window,), np.float64, np.nan),
            "n_learn": StateField((), np.int64, 0),
            "median": StateField((), np.float64, 0.0),
            "scale": StateField((), np.float64, np.inf),
        }

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        med = st["median"][:m]
        z = x - med
        np.abs(z, out=z)
        z /= st["scale"][:m]
        score, learn = self._gate(st, squash(z, self.n_sigmas), m)
        nl = st["n_learn"][:m]
        buf = st["buf"]
        if learn is None:
            buf[np.arange(m), nl % self.window] = x
            nl += 1
            due = np.flatnonzero(nl % self.refresh == 0) if self.refresh > 1 else None
        else:
            took = np.flatnonzero(learn)
            buf[took, nl[took] % self.window] = x[took]
            nl[took] += 1
            due = took[nl[took] % self.refresh == 0]
        if due is None or due.shape[0] == m:
            self._recompute(st, np.arange(m), m)
        elif due.shape[0]:
            self._recompute(st, due, m)
        return score

    def _recompute(self, st: dict[str, Arr], idx: Arr, m: int) -> None:
        win = np.sort(st["buf"][:m] if idx.shape[0] == m else st["buf"][idx], axis=1)  # NaN (unfilled) last
        c = np.minimum(st["n_learn"][idx], self.window)
        r = np.arange(idx.shape[0])
        med = 0.5 * (win[r, (c - 1) // 2] + win[r, c // 2])
        dev = np.abs(win - med[:, None])
        dev.sort(axis=1)
        mad = 0.5 * (dev[r, (c - 1) // 2] + dev[r, c // 2])
        # MAD is 0 when over half the window is one value; fall back to the mean absolute deviation.
        mean_ad = np.nansum(dev, axis=1) / c
        scale = np.where(mad > 0, _MAD_TO_SIGMA * mad, 1.2533 * mean_ad) + 1e-6 * np.abs(med) + 1e-12
        st["median"][idx] = med
        st["scale"][idx] = scale
