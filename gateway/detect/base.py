"""The streaming detector base: per-series state in flat arrays, one vectorised step per position.

A batch may interleave series. :class:`BatchLayout` stable-sorts it by series and packs it "by step":
step ``k`` holds the ``k``-th sample of every series that has more than ``k`` samples in the batch.
Series are ordered by their sample count (descending), so the series active at step ``k`` are a
prefix of length ``active[k]`` and a step works on contiguous slices, no masks and no fancy indexing.
The loop runs over the steps (the few samples a series has in one batch), vectorised across series.

>>> import numpy as np
>>> lay = BatchLayout.build(np.array([7, 3, 7, 7, 3], dtype=np.int64))
>>> lay.rows.tolist(), lay.active.tolist(), lay.offsets.tolist()
([7, 3], [2, 2, 1], [0, 2, 4, 5])
>>> lay.flat.tolist()  # where each input sample sits in the packed arrays
[0, 1, 2, 4, 3]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from gateway.batch import F64, I64
from gateway.checkpoint import State

__all__ = ["BatchLayout", "Detector", "StateField", "squash"]

_LN2 = math.log(2.0)
Arr = npt.NDArray[Any]


def squash(stat: F64, level: float) -> F64:
    """Map a non-negative statistic to [0, 1): ``1 - 2**(-stat/level)``, so ``stat == level`` → 0.5.

    >>> squash(np.array([0.0, 4.0, 8.0]), 4.0).tolist()
    [0.0, 0.5, 0.75]
    """
    out: F64 = -np.expm1(stat * (-_LN2 / level))
    return out


@dataclass(frozen=True, slots=True)
class StateField:
    """One per-series state array: trailing shape, dtype and initial value."""

    tail: tuple[int, ...]
    dtype: type[np.generic]
    fill: float


@dataclass(slots=True)
class BatchLayout:
    """How the samples of one batch are packed step by step (see the module docstring).

    ``rows[r]`` is the series id of local row ``r``; ``active[k]`` the number of rows at step ``k``;
    step ``k`` lives in ``packed[offsets[k]:offsets[k+1]]``; ``flat[i]`` is where input sample ``i``
    sits in the packed arrays; ``pos[i]`` its position within its series in this batch.
    """

    rows: I64
    active: I64
    offsets: I64
    _flat: I64 | None
    _pos: I64 | None
    _row: I64 | None
    in_order: bool = False  # packed order is input order (flat is the identity)

    @property
    def flat(self) -> I64:
        if self._flat is None:  # tiled: the identity, built only if asked for
            self._flat = np.arange(int(self.offsets[-1]), dtype=np.int64)
        return self._flat

    @property
    def pos(self) -> I64:
        if self._pos is None:
            self._pos = np.repeat(np.arange(self.n_steps, dtype=np.int64), int(self.rows.shape[0]))
        return self._pos

    @property
    def row(self) -> I64:
        if self._row is None:
            self._row = np.tile(np.arange(int(self.rows.shape[0]), dtype=np.int64), self.n_steps)
        return self._row

    @property
    def n_steps(self) -> int:
        return int(self.active.shape[0])

    @classmethod
    def build(cls, series: I64) -> BatchLayout:
        n = int(series.shape[0])
        if n == 0:
            e = np.empty(0, np.int64)
            return cls(e, e, np.zeros(1, np.int64), e, e, e)
        tiled = cls._tiled(series)
        if tiled is not None:
            return tiled
        order = np.argsort(series, kind="stable")
        s_sorted = series[order]
        starts = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))
        counts = np.diff(np.append(starts, n))
        perm = np.argsort(-counts, kind="stable")
        rows = s_sorted[starts][perm]
        counts_rows = counts[perm]
        rank = np.empty_like(perm)
        rank[perm] = np.arange(perm.shape[0])
        n_steps = int(counts_rows[0])
        active = np.searchsorted(-counts_rows, -np.arange(1, n_steps + 1), side="right").astype(np.int64)
        offsets = np.zeros(n_steps + 1, np.int64)
        np.cumsum(active, out=offsets[1:])
        pos_sorted = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)
        row_sorted = np.repeat(rank, counts)
        pos = np.empty(n, np.int64)
        row = np.empty(n, np.int64)
        pos[order] = pos_sorted
        row[order] = row_sorted
        flat = offsets[pos] + row
        return cls(rows.astype(np.int64), active, offsets, flat, pos, row)

    @classmethod
    def _tiled(cls, series: I64) -> BatchLayout | None:
        """Fast path, no sort: the batch is rounds of the same distinct series in the same order (the
        usual time-major gateway batch), so input order already is packed order."""
        n = int(series.shape[0])
        u = n
        a, width = 1, 4096
        while a < n:  # the first repeat of series[0], in growing windows: a round is short
            again = np.flatnonzero(series[a : a + width] == series[0])
            if again.shape[0]:
                u = a + int(again[0])
                break
            a, width = a + width, 4 * width
        if n % u:
            return None
        per = n // u
        head = series[:u]
        if per > 1 and not bool((series[u:] == series[:-u]).all()):  # every round repeats the one before
            return None
        lo, hi = int(head.min()), int(head.max())
        if lo >= 0 and hi < 8 * u + 4096:  # dense ids: mark them instead of sorting
            seen = np.zeros(hi + 1, np.bool_)
            seen[head] = True
            distinct = int(np.count_nonzero(seen))
        else:
            distinct = int(np.unique(head).shape[0])
        if distinct != u:
            return None
        offsets = np.arange(per + 1, dtype=np.int64) * u
        return cls(head.astype(np.int64), np.full(per, u, np.int64), offsets, None, None, None, True)

    def pack(self, values: F64) -> F64:
        """Reorder per-sample values into the packed step-by-step order."""
        if self.in_order:  # nothing writes into the packed input, so no copy
            return np.asarray(values, np.float64)
        out = np.empty(values.shape[0], np.float64)
        out[self.flat] = values
        return out

    def unpack(self, packed: F64) -> F64:
        """Back from packed order to input order."""
        if self.in_order:
            return packed.copy()
        out: F64 = packed[self.flat]
        return out


class Detector(ABC):
    """Base of every streaming detector: ``score_learn`` scores a batch, then learns from it.

    Subclasses declare their per-series state in ``_fields`` and implement ``_step``, which scores the
    ``m`` active series of one step against their state and updates it, calling :meth:`_gate` to apply
    the grace period and decide what is learned.
    """

    name: ClassVar[str]

    def __init__(self, *, grace_samples: int = 30, threshold: float = 0.5, learn_flagged: bool = True) -> None:
        self.grace_samples = int(grace_samples)
        self.threshold = float(threshold)
        self.learn_flagged = bool(learn_flagged)
        fields = {"n_seen": StateField((), np.int64, 0), **self._fields()}
        self._spec = fields
        self._state: dict[str, Arr] = {k: np.empty((0, *f.tail), f.dtype) for k, f in fields.items()}
        self._capacity = 0
        self._slice = slice(0, 0)  # packed slice of the current step, for detectors that record extras

    @abstractmethod
    def _fields(self) -> dict[str, StateField]:
        """Per-series state arrays this detector needs."""

    @abstractmethod
    def _step(self, st: dict[str, Arr], x: F64, m: int) -> F64:
        """Score ``x`` (one sample of each of the first ``m`` local rows), update ``st``, return scores."""

    @property
    def n_series(self) -> int:
        """Number of series slots allocated (≥ highest series id seen + 1)."""
        return self._capacity

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        cap = max(needed, 2 * self._capacity, 64)
        for k, f in self._spec.items():
            old = self._state[k]
            new = np.full((cap, *f.tail), f.fill, f.dtype)
            new[: old.shape[0]] = old
            self._state[k] = new
        self._capacity = cap

    def _gate(self, st: dict[str, Arr], raw: F64, m: int) -> tuple[F64, F64 | None]:
        """Zero scores still in the grace period, count the sample, and return (scores, learn mask).

        The learn mask is None when every sample is learned, else 1.0 where the sample is learned.
        """
        n = st["n_seen"][:m]
        raw *= n >= self.grace_samples
        n += 1
        if self.learn_flagged:
            return raw, None
        learn: F64 = (raw < self.threshold).astype(np.float64)
        return raw, learn

    def run(self, layout: BatchLayout, packed: F64) -> F64:
        """Score and learn a packed batch (see :class:`BatchLayout`); returns packed scores."""
        if layout.n_steps == 0:
            return np.empty(0, np.float64)
        self._grow(int(layout.rows.max()) + 1)
        rows = layout.rows
        local = {k: v[rows] for k, v in self._state.items()}
        out = np.empty(packed.shape[0], np.float64)
        offsets = layout.offsets.tolist()
        for k, m in enumerate(layout.active.tolist()):
            a, b = offsets[k], offsets[k + 1]
            self._slice = slice(a, b)
            out[a:b] = self._step(local, packed[a:b], m)
        for key, arr in local.items():
            self._state[key][rows] = arr
        return out

    def score_learn(self, series: I64, values: F64) -> F64:
        """Score every sample against the state before it (per-series arrival order), then learn it.

        ``series`` and ``values`` are parallel arrays of one batch; the result is parallel to them.
        """
        layout = BatchLayout.build(np.asarray(series, np.int64))
        return layout.unpack(self.run(layout, layout.pack(np.asarray(values, np.float64))))

    def reset(self) -> None:
        """Forget every series."""
        self._state = {k: np.empty((0, *f.tail), f.dtype) for k, f in self._spec.items()}
        self._capacity = 0

    def snapshot(self, n: int | None = None) -> State:
        """Every per-series state array (copies; see :mod:`gateway.checkpoint`); ``n``: for series ids < n."""
        size = self._capacity if n is None else n
        return State({"name": self.name}, {k: fit(v, size, self._spec[k].fill) for k, v in self._state.items()})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot` (of a detector with the same settings)."""
        self._state = restore_arrays(state, {k: (f.tail, f.dtype) for k, f in self._spec.items()})
        self._capacity = int(self._state["n_seen"].shape[0])


def fit(arr: Arr, n: int, fill: float | bool) -> Arr:
    """A copy of ``arr`` with exactly ``n`` rows (cut, or padded with ``fill``): a canonical saved state."""
    if arr.shape[0] >= n:
        return arr[:n].copy()
    out = np.full((n, *arr.shape[1:]), fill, arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def restore_arrays(state: State, spec: dict[str, tuple[tuple[int, ...], type[np.generic]]]) -> dict[str, Arr]:
    """The arrays ``spec`` names (trailing shape, dtype), checked: one length, no missing or foreign key."""
    if set(state.arrays) != set(spec):
        raise ValueError(f"state arrays {sorted(state.arrays)} are not {sorted(spec)}")
    out: dict[str, Arr] = {}
    n = -1
    for k, (tail, dtype) in spec.items():
        arr = state.arrays[k]
        if arr.shape[1:] != tail or arr.dtype != np.dtype(dtype) or (n >= 0 and arr.shape[0] != n):
            raise ValueError(f"state array {k!r} has shape {arr.shape} {arr.dtype}, expected (n, *{tail}) {dtype}")
        n = arr.shape[0]
        out[k] = np.array(arr, dtype)
    return out
