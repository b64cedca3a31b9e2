"""Western Electric rules 1–4 on the EWMA-standardised stream."""

from __future__ import annotations

import numpy as np

from gateway.batch import F64
from gateway.detect.base import Arr, Detector, StateField
from gateway.detect.ewma import EWMA_FIELDS, ewma_learn, ewma_z

__all__ = ["WesternElectricDetector"]

_POP = np.array([bin(i).count("1") for i in range(256)], np.int64)
_RULE2 = _POP[np.arange(256) & 0b111] >= 2  # 2 of the last 3
_RULE3 = _POP[np.arange(256) & 0b11111] >= 4  # 4 of the last 5


class WesternElectricDetector(Detector):
    """Western Electric rules on ``z = (x - centre) / σ`` (EWMA centre line and σ).

    1. one point beyond 3σ;
    2. two of three consecutive points beyond 2σ on the same side;
    3. four of five consecutive points beyond 1σ on the same side;
    4. eight consecutive points on the same side of the centre line.

    The score is the ``rule_scores`` entry of the highest-scoring rule that fires, else 0. Each
    condition's history is a per-series 8-bit shift register, so the rules cost a few integer ops.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> x = rng.normal(0.0, 1.0, 100); x[60:75] += 2.5  # a shift of 2.5σ
    >>> s = WesternElectricDetector().score_learn(np.zeros(100, np.int64), x)
    >>> bool(s[60:75].max() >= 0.5), float(s[:30].max())
    (True, 0.0)
    """

    name = "western_electric"

    def __init__(
        self,
        *,
        alpha: float = 0.02,
        rules: tuple[int, ...] = (1, 2, 3, 4),
        rule_scores: tuple[float, float, float, float] = (1.0, 0.9, 0.8, 0.7),
        grace_samples: int = 30,
        threshold: float = 0.5,
        learn_flagged: bool = True,
    ) -> None:
        self.alpha = alpha
        self.rules = tuple(rules)
        self.rule_scores = tuple(rule_scores)
        super().__init__(grace_samples=grace_samples, threshold=threshold, learn_flagged=learn_flagged)

    def _fields(self) -> dict[str, StateField]:
        hist = {k: StateField((), np.uint8, 0) for k in ("hi2", "lo2", "hi1", "lo1", "pos", "neg")}
        return {**EWMA_FIELDS, **hist}

    @staticmethod
    def _push(reg: Arr, bit: Arr) -> Arr:
        np.left_shift(reg, 1, out=reg)
        np.bitwise_or(reg, bit, out=reg)
        return reg

    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        d, _, z = ewma_z(st, x, m)
        push = self._push
        raw = np.zeros(m, np.float64)
        if 1 in self.rules:
            np.maximum(raw, (np.abs(z) > 3.0) * self.rule_scores[0], out=raw)
        if 2 in self.rules:
            hi2 = push(st["hi2"][:m], z > 2.0)
            lo2 = push(st["lo2"][:m], z < -2.0)
            np.maximum(raw, (_RULE2.take(hi2) | _RULE2.take(lo2)) * self.rule_scores[1], out=raw)
        if 3 in self.rules:
            hi1 = push(st["hi1"][:m], z > 1.0)
            lo1 = push(st["lo1"][:m], z < -1.0)
            np.maximum(raw, (_RULE3.take(hi1) | _RULE3.take(lo1)) * self.rule_scores[2], out=raw)
        if 4 in self.rules:
            pos = push(st["pos"][:m], z > 0.0)
            neg = push(st["neg"][:m], z < 0.0)
            np.maximum(raw, ((pos == 255) | (neg == 255)) * self.rule_scores[3], out=raw)
        score, learn = self._gate(st, raw, m)
        ewma_learn(st, d, m, self.alpha, learn)
        return score
