"""The fused kernel: every detector of a profile in one step loop, sharing what they share.

The six detector classes each keep their own state and loop over the steps of a batch; run together
they cost ~100 numpy calls per step. The kernel computes the same scores with one loop:

- one EWMA standardisation per distinct ``alpha`` (EWMA z and Western Electric share one by default,
  CUSUM keeps its slower one), updated once per step;
- the learning factor is a Python scalar once every row is past its warm-up (the vector form is only
  needed while some series are young), and the grace-period zeroing runs in the cold steps only;
- per-detector statistics are written as ``stat · (-ln2 / level)`` (the exponent of
  :func:`~gateway.detect.base.squash`) straight into preallocated step×series matrices with ``out=``;
  detectors that share a fusion weight are combined by a minimum of exponents, in the step while its
  rows are in cache, so the whole fused set needs two ``expm1`` per sample, not six, and is
  bit-identical to ``max`` over the separate scores;
- rare branches stay sparse: CUSUM resets, flatline runs, and the Western Electric firings touch only
  the samples concerned, and the baseline mean/z are read only where an event is emitted;
- the Western Electric run rules are sliding-window counts over a per-sample int8 zone code
  (``±ceil(min(|z|, 4))``) after the loop, with the last 7 codes of each series kept as state.

Per-detector scores are only evaluated where some detector can reach the threshold, for the events.
Scores agree with the separate detector classes to rounding (see ``tests/unit/test_detect_kernel.py``);
exact batch-size invariance holds because every operation is elementwise in step order.

>>> import numpy as np
>>> from gateway.detect.config import CLASSIC_DETECTORS, DetectionConfig
>>> cfg = DetectionConfig(detectors=CLASSIC_DETECTORS)
>>> k = FusedKernel.build(cfg.resolve("m"), cfg)
>>> x = np.r_[np.random.default_rng(0).normal(0, 1, 300), 15.0]
>>> res = k.run(BatchLayout.build(np.zeros(301, np.int64)), x)
>>> int(np.argmax(res.fused)), bool(res.fused[-1] > 0.5)
(300, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.batch import F64, I64
from gateway.checkpoint import State
from gateway.detect.base import Arr, BatchLayout, fit, restore_arrays
from gateway.detect.config import DETECTOR_NAMES, DetectionConfig, ResolvedProfile
from gateway.detect.spike import UP_RATE

__all__ = ["FusedKernel", "KernelResult", "supports"]

_LN2 = math.log(2.0)
_HIST = 7  # Western Electric looks back at most 8 samples: the current one and 7 before it
_CLIP = 3.0
_MEAN_ABS_TO_SIGMA = 1.2533


def supports(profile: ResolvedProfile, config: DetectionConfig) -> bool:
    """The kernel covers max-fusion with every sample learned (the default); else the classes run."""
    return config.learn_flagged and profile.fusion.method == "max" and bool(profile.detectors)


def _hot_from(alpha: float, floor: int) -> tuple[int, float]:
    """Smallest n from which ``max(1/(n+1), alpha)`` is the constant ``alpha``, and that constant."""
    if alpha <= 0.0:
        return floor, 0.0
    n = max(int(math.ceil(1.0 / alpha)) - 1, 0)
    while 1.0 / (n + 1.0) > alpha:
        n += 1
    while n > 0 and 1.0 / n <= alpha:
        n -= 1
    return n, alpha


@dataclass(slots=True)
class _Std:
    """One shared EWMA standardiser: its factor, and whether it freezes after the grace period."""

    alpha: float
    freeze_after: int  # -1: never (alpha > 0)
    n_hot: int
    a_hot: float


@dataclass(slots=True)
class KernelResult:
    """Packed outputs of one batch: the fused score, and what the events need."""

    fused: F64
    cand: I64  # packed indices where some detector may reach the threshold
    expo: dict[str, F64] = field(default_factory=dict)  # detector -> squash exponent at ``cand``
    we_score: F64 | None = None  # Western Electric score at ``cand``
    # baseline mean and z of the step×series rectangle, and where ``cand`` sits in it; read through
    # :meth:`baseline` before the kernel runs again (the matrices are its reused work buffers)
    _expected: F64 = field(default_factory=lambda: np.empty(0, np.float64))
    _zscore: F64 = field(default_factory=lambda: np.empty(0, np.float64))
    _cand_rect: I64 = field(default_factory=lambda: np.empty(0, np.int64))

    def baseline(self, at: I64) -> tuple[F64, F64]:
        """Baseline mean and z at ``cand[at]`` (only the events need them: a few of the candidates)."""
        where = self._cand_rect[at]
        return self._expected[where], self._zscore[where]


class FusedKernel:
    """All detectors of one profile, fused: per-series state in flat arrays, one loop per batch."""

    def __init__(self, profile: ResolvedProfile, config: DetectionConfig) -> None:
        p: dict[str, Any] = {k: v.model_dump() for k, v in profile.params.items()}
        self.dets = frozenset(profile.detectors)
        self.grace = int(config.grace_samples)
        self.threshold = float(config.threshold)
        w = profile.fusion.weights
        self.weight = {d: float(w.get(d, 1.0)) for d in DETECTOR_NAMES}  # type: ignore[call-overload]
        self.p = p
        stds: list[_Std] = []
        keys: dict[tuple[float, int], int] = {}

        def std(alpha: float, freeze: int) -> int:
            key = (alpha, freeze)
            if key not in keys:
                keys[key] = len(stds)
                n_hot, a_hot = _hot_from(alpha, freeze)
                stds.append(_Std(alpha, freeze, n_hot, a_hot))
            return keys[key]

        self.std_e = std(float(p["ewma"]["alpha"]), -1)  # always: the events' expected value and z
        self.std_w = std(float(p["western_electric"]["alpha"]), -1) if "western_electric" in self.dets else -1
        ca = float(p["cusum"]["alpha"])
        self.std_c = std(ca, self.grace if ca <= 0.0 else -1) if "cusum" in self.dets else -1
        self.stds = stds
        win = int(p["robust"]["window"])
        sa = float(p["spike"]["alpha"])
        n_spike = _hot_from(sa, 0)[0] + 1  # the spike factor is 1/max(n, 1), not 1/(n + 1)
        n_hot = max([self.grace, win if "robust" in self.dets else 0, n_spike]
                    + [s.n_hot for s in stds])
        self.n_hot = n_hot
        # weight groups of exponent-scored detectors (WE is scored by a table, not an exponent)
        groups: dict[float, list[str]] = {}
        for d in ("ewma", "cusum", "robust", "flatline", "spike"):
            if d in self.dets:
                groups.setdefault(self.weight[d], []).append(d)
        self.groups = groups
        we = p["western_electric"]
        ranked = sorted((float(we["rule_scores"][r - 1]), r) for r in set(we["rules"]))
        self.we_rank = {r: i + 1 for i, (_, r) in enumerate(ranked)}
        self.we_table = np.array([0.0] + [s for s, _ in ranked], np.float64)
        self.n_series = 0
        self.st: dict[str, Arr] = {}
        self._grow(0)
        self._ws: dict[str, Arr] = {}  # step×series work matrices, reused: fresh pages cost more than the math

    def _buf(self, name: str, shape: tuple[int, int], dtype: type[np.generic], zero: bool) -> Arr:
        size = shape[0] * shape[1]
        arr = self._ws.get(name)
        if arr is None or arr.dtype != dtype or arr.shape[0] < size:
            arr = np.empty(size, dtype)
            self._ws[name] = arr
        out = arr[:size].reshape(shape)
        if zero:
            out.fill(0)
        return out

    @classmethod
    def build(cls, profile: ResolvedProfile, config: DetectionConfig) -> FusedKernel:
        return cls(profile, config)

    # -- state ---------------------------------------------------------------------------------------

    def _fields(self) -> dict[str, tuple[tuple[int, ...], type[np.generic], float]]:
        f: dict[str, tuple[tuple[int, ...], type[np.generic], float]] = {"n": ((), np.int64, 0)}
        for j in range(len(self.stds)):
            f[f"mean{j}"] = ((), np.float64, 0.0)
            f[f"var{j}"] = ((), np.float64, 0.0)
        f.update({
            "s_hi": ((), np.float64, 0.0), "s_lo": ((), np.float64, 0.0),
            "centre": ((), np.float64, 0.0), "scale": ((), np.float64, 0.0),
            "prev": ((), np.float64, 0.0), "msq": ((), np.float64, 0.0), "run": ((), np.float64, 0.0),
            "hist": ((_HIST,), np.int8, 0),
        })
        return f

    def _grow(self, needed: int) -> None:
        if needed <= self.n_series and self.st:
            return
        cap = max(needed, 2 * self.n_series, 64)
        for k, (tail, dt, fill) in self._fields().items():
            new = np.full((cap, *tail), fill, dt)
            old = self.st.get(k)
            if old is not None:
                new[: old.shape[0]] = old
            self.st[k] = new
        self.n_series = cap

    def snapshot(self, n: int | None = None) -> State:
        """Every per-series state array (copies; see :mod:`gateway.checkpoint`); ``n``: for series ids < n."""
        fields = self._fields()
        size = self.n_series if n is None else n
        return State({"name": "kernel"}, {k: fit(v, size, fields[k][2]) for k, v in self.st.items()})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot` (of a kernel with the same settings)."""
        self.st = restore_arrays(state, {k: (tail, dt) for k, (tail, dt, _) in self._fields().items()})
        self.n_series = int(self.st["n"].shape[0])

    # -- one batch -----------------------------------------------------------------------------------

    def run(self, layout: BatchLayout, packed: F64) -> KernelResult:
        """Score and learn a packed batch; see :class:`KernelResult`."""
        n = packed.shape[0]
        if n == 0:
            return KernelResult(np.empty(0, np.float64), np.empty(0, np.int64))
        rows = layout.rows
        self._grow(int(rows.max()) + 1)
        u = int(rows.shape[0])
        steps = layout.n_steps
        active = layout.active.tolist()
        if layout.in_order:
            X = packed.reshape(steps, u)
            rect_idx = None
            ragged = False
        else:  # ragged: pad to a step × row rectangle (each row is active on a prefix of the steps)
            rect_idx = np.repeat(np.arange(steps, dtype=np.int64) * u - layout.offsets[:-1], layout.active)
            rect_idx += np.arange(n, dtype=np.int64)
            X = self._buf("x", (steps, u), np.float64, True)
            X.reshape(-1)[rect_idx] = packed
            ragged = True
        dets = self.dets
        st = {k: v[rows] for k, v in self.st.items()}
        n0 = st["n"]
        nmin = int(n0.min())
        n_hot = self.n_hot
        grace = self.grace

        shape = (steps, u)
        Zb = self._buf("z", shape, np.float64, ragged)  # baseline z
        Eb = self._buf("e", shape, np.float64, ragged)  # baseline expected value
        V: dict[str, F64] = {d: self._buf(d, shape, np.float64, ragged) for d in dets if d != "western_electric"}
        use_we = "western_electric" in dets
        L = self._buf("we", (_HIST + steps, u), np.int8, True) if use_we else None
        if L is not None:
            L[:_HIST] = st["hist"].T
        c_e = -_LN2 / float(self.p["ewma"]["z_alarm"])
        k_c = float(self.p["cusum"]["k"])
        h_c = float(self.p["cusum"]["h"])
        c_c = -_LN2 / h_c
        win = int(self.p["robust"]["window"])
        c_r = -_LN2 / float(self.p["robust"]["n_sigmas"])
        inv_win = 1.0 / win
        s_alpha = float(self.p["spike"]["alpha"])
        s_up = min(UP_RATE * s_alpha, 1.0)  # >= s_alpha: UP_RATE > 1 and alpha <= 1
        c_s = -_LN2 / float(self.p["spike"]["z_alarm"])
        f_n = float(self.p["flatline"]["n"])
        c_f = -_LN2 / f_n
        tol = float(self.p["flatline"]["tolerance"])
        # only the baseline z outlives its step (the events); the other standardisations are step rows
        z_rows = {j: np.empty(u, np.float64) for j in range(len(self.stds)) if j != self.std_e}
        need_std = sorted({self.std_e, *(j for j in (self.std_w, self.std_c) if j >= 0)})
        std_run = [(j, self.stds[j], st[f"mean{j}"], st[f"var{j}"]) for j in need_std]
        j_e, j_w, j_c = self.std_e, self.std_w, self.std_c
        use_f, use_s = "flatline" in dets, "spike" in dets
        V_e, V_c, V_r = V.get("ewma"), V.get("cusum"), V.get("robust")
        V_f, V_s = V.get("flatline"), V.get("spike")
        # fusion per weight group, in the step while its rows are in cache: the smallest exponent wins
        # (squash is monotone, so this is exact); ``lim`` is loose, the events check exactly later
        lim = math.log1p(-min(self.threshold, 1.0 - 1e-16)) * (1.0 - 1e-9)
        groups = [(-wgt, [V[nm] for nm in names]) for wgt, names in self.groups.items()]
        # fresh each batch: handed out as the fused score (padding of a ragged batch is dropped below)
        fused = np.zeros(shape, np.float64) if ragged or not groups else np.empty(shape, np.float64)
        cand_m = self._buf("cand", shape, np.bool_, ragged or not groups)
        cold_steps = max(0, min(steps, grace - nmin))
        V_list = list(V.values())

        t2 = np.empty(u, np.float64)
        t3 = np.empty(u, np.float64)
        t4 = np.empty(u, np.float64)
        same = np.empty(u, np.bool_)
        tb = np.empty(u, np.bool_)
        sign = np.empty(u, np.int8)
        s_hi, s_lo = st["s_hi"], st["s_lo"]
        centre, scale = st["centre"], st["scale"]
        prev0, msq, run = st["prev"], st["msq"], st["run"]
        nn = n0.astype(np.float64)  # samples seen, per row, as of the current step (cold steps only)

        for k, m in enumerate(active):
            x = X[k, :m]
            hot = nmin + k >= n_hot
            nk = nn[:m]
            d = t2[:m]
            f = t3[:m]
            # -- shared EWMA standardisations
            for j, sj, mean_all, var_all in std_run:
                mean = mean_all[:m]
                var = var_all[:m]
                z = Zb[k, :m] if j == j_e else z_rows[j][:m]
                np.subtract(x, mean, out=d)
                if j == j_e:
                    Eb[k, :m] = mean
                np.multiply(mean, 1e-6, out=f)
                f *= f
                f += 1e-18
                f += var
                np.sqrt(f, out=f)
                np.divide(d, f, out=z)
                if hot:
                    a: Any = sj.a_hot
                    if a == 0.0:
                        continue
                    b: Any = 1.0 - a
                else:
                    a = np.add(nk, 1.0)
                    np.divide(1.0, a, out=a)
                    if sj.alpha > 0:
                        np.maximum(a, sj.alpha, out=a)
                    elif sj.freeze_after >= 0:
                        a *= nk < sj.freeze_after
                    b = 1.0 - a
                np.multiply(d, a, out=f)
                mean += f
                f *= d
                var += f
                var *= b
            have_abs = False
            if V_e is not None:
                np.abs(Zb[k, :m], out=f)
                np.multiply(f, c_e, out=V_e[k, :m])
                have_abs = j_w == j_e
            if L is not None:
                zw = Zb[k, :m] if j_w == j_e else z_rows[j_w][:m]
                if not have_abs:
                    np.abs(zw, out=f)
                np.minimum(f, 4.0, out=f)
                np.ceil(f, out=f)
                lk = L[_HIST + k, :m]
                lk[...] = f  # the zone 0..4, then its sign: -q == (q ^ -1) + 1
                sg = sign[:m]
                np.less(zw, 0.0, out=sg.view(np.bool_))
                np.negative(sg, out=sg)
                lk ^= sg
                lk -= sg
            # -- CUSUM
            if V_c is not None:
                zc = Zb[k, :m] if j_c == j_e else z_rows[j_c][:m]
                hi = s_hi[:m]
                lo = s_lo[:m]
                hi += zc
                hi -= k_c
                np.maximum(hi, 0.0, out=hi)
                lo -= zc
                lo -= k_c
                np.maximum(lo, 0.0, out=lo)
                if not hot:
                    warm = nk >= grace
                    hi *= warm
                    lo *= warm
                vc = V_c[k, :m]
                np.maximum(hi, lo, out=vc)
                sm = same[:m]
                np.less(vc, h_c, out=sm)
                if not sm.all():  # alarms (a few of the series): reset those sums, as ``hi *= vc < h``
                    reset = np.flatnonzero(~sm)
                    hi[reset] *= 0.0
                    lo[reset] *= 0.0
                vc *= c_c
            # -- robust centre / scale
            if V_r is not None:
                cen = centre[:m]
                sca = scale[:m]
                np.subtract(x, cen, out=d)
                np.abs(cen, out=f)
                f *= 1e-6
                f += 1e-12
                f += sca
                vr = V_r[k, :m]
                np.abs(d, out=vr)
                vr /= f
                vr *= c_r
                f *= _CLIP
                if not hot:
                    f[nk < win] = np.inf
                np.minimum(d, f, out=d)
                np.negative(f, out=f)
                np.maximum(d, f, out=d)
                np.abs(d, out=f)
                if hot:
                    a = inv_win
                else:
                    a = np.add(nk, 1.0)
                    np.divide(1.0, a, out=a)
                    np.maximum(a, inv_win, out=a)
                d *= a
                cen += d
                f *= _MEAN_ABS_TO_SIGMA
                f -= sca
                f *= a
                sca += f
            # -- first difference: spike and flatline
            prev = prev0[:m] if k == 0 else X[k - 1, :m]
            if use_s or use_f:
                np.subtract(x, prev, out=d)
            if V_f is not None:
                sm = same[:m]
                if tol > 0.0:
                    np.abs(d, out=f)
                    np.less_equal(f, tol, out=sm)
                else:
                    np.equal(x, prev, out=sm)
                if not hot:
                    sm &= nk > 0  # the first reading of a series starts a run
                r = run[:m]
                vf = V_f[k, :m]
                if sm.any():
                    r *= sm
                    r += 1.0
                    longest = np.maximum.reduce(r)
                else:  # no run goes on: every run restarts at 1 (r·0 + 1)
                    r.fill(1.0)
                    longest = 1.0
                if longest >= f_n:
                    np.multiply(r, c_f, out=vf)
                    vf *= r >= f_n
                else:  # r · c_f · 0 with r >= 1, c_f < 0
                    vf.fill(-0.0)
            if V_s is not None:
                ms = msq[:m]
                if not hot:
                    d *= nk > 0
                np.multiply(prev, 1e-6, out=f)
                f *= f
                f += 1e-18
                f += ms
                np.sqrt(f, out=f)
                vs = V_s[k, :m]
                np.divide(d, f, out=vs)
                np.abs(vs, out=vs)
                vs *= c_s
                d *= d
                d -= ms  # > 0: the squared step is above its mean, which then rises at UP_RATE·alpha
                if hot and s_up == s_alpha:
                    d *= s_alpha
                elif hot:  # d · (s_up if d > 0 else s_alpha), as the larger of the two products
                    np.multiply(d, s_up, out=f)
                    d *= s_alpha
                    np.maximum(d, f, out=d)
                else:
                    a = np.maximum(nk, 1.0)
                    np.divide(1.0, a, out=a)
                    np.maximum(a, np.where(d > 0.0, s_up, s_alpha), out=a)
                    a *= nk > 0
                    d *= a
                ms += d
            # -- grace period: zero the scores of the cold samples (only the first steps of young series)
            if k < cold_steps:
                cold_k = nk < grace
                for v in V_list:
                    v[k, :m][cold_k] = 0.0
            # -- fuse the step
            fr = fused[k, :m]
            cr = cand_m[k, :m]
            for gi, (negw, vs_) in enumerate(groups):
                if len(vs_) == 1:
                    g = vs_[0][k, :m]
                else:
                    g = t4[:m]
                    np.minimum(vs_[0][k, :m], vs_[1][k, :m], out=g)
                    for v in vs_[2:]:
                        np.minimum(g, v[k, :m], out=g)
                if gi == 0:
                    np.less_equal(g, lim, out=cr)
                    np.expm1(g, out=fr)
                    fr *= negw
                else:
                    np.less_equal(g, lim, out=tb[:m])
                    cr |= tb[:m]
                    np.expm1(g, out=f)
                    f *= negw
                    np.maximum(fr, f, out=fr)
            if not hot:
                nk += 1.0

        # -- state back: last reading, sample counts, WE history
        u_idx = np.arange(u)
        counts = np.searchsorted(-layout.active, -u_idx, side="left")  # samples per row
        last = X[counts - 1, u_idx]
        st["prev"] = last
        st["n"] = n0 + counts
        if L is not None:
            st["hist"] = L[counts[None, :] + np.arange(_HIST)[:, None], u_idx].T
        for key, arr in st.items():
            self.st[key][rows] = arr

        # -- Western Electric: sliding windows over the zone codes, sparse where they fire
        if L is not None:
            we_idx = self._we(L, steps, u)
            if cold_steps:
                cold = (n0[None, :] + np.arange(cold_steps)[:, None]) < grace
                we_idx[:cold_steps][cold] = 0
        # candidates of the exponent-scored detectors (the only places any of them can reach the threshold)
        exp_rect = np.flatnonzero(cand_m)
        cand_rect = exp_rect
        if L is not None:
            fired = np.flatnonzero(we_idx != 0)  # a few % of the samples
            if fired.shape[0]:
                code = we_idx.reshape(-1)[fired]
                table = self.we_table * self.weight["western_electric"]
                ff = fused.reshape(-1)
                ff[fired] = np.maximum(ff[fired], table[code])
                min_code = int(np.searchsorted(self.we_table, self.threshold))  # >= 1: threshold > 0
                if min_code < self.we_table.shape[0]:
                    cand_m.reshape(-1)[fired if min_code <= 1 else fired[code >= min_code]] = True
                    cand_rect = np.flatnonzero(cand_m)
        flat_fused = fused.reshape(-1)
        if rect_idx is not None:
            flat_fused = flat_fused[rect_idx]
            inv = np.full(steps * u, -1, np.int64)
            inv[rect_idx] = np.arange(n)
            cand = inv[cand_rect]
            keep = cand >= 0
            cand, cand_rect = cand[keep], cand_rect[keep]
            exp_rect = exp_rect[inv[exp_rect] >= 0]
        else:
            cand = cand_rect
        res = KernelResult(flat_fused, cand)
        if exp_rect.shape[0] == cand_rect.shape[0]:
            res.expo = {d: v.reshape(-1)[cand_rect] for d, v in V.items()}
        else:  # Western Electric only: no exponent-scored detector reaches the threshold there, score 0
            at = np.searchsorted(cand_rect, exp_rect)
            for name, v in V.items():
                e = np.zeros(cand_rect.shape[0], np.float64)
                e[at] = v.reshape(-1)[exp_rect]
                res.expo[name] = e
        if L is not None:
            res.we_score = self.we_table.take(we_idx.reshape(-1)[cand_rect])
        res._expected = Eb.reshape(-1)
        res._zscore = Zb.reshape(-1)
        res._cand_rect = cand_rect
        return res

    def _we(self, L: Arr, steps: int, u: int) -> Arr:
        """Rank (0 = none) of the best Western Electric rule firing at each step."""
        rank = self.we_rank
        out = np.zeros((steps, u), np.int8)
        tmp = np.empty((steps, u), np.int8)
        cur = L[_HIST:]

        def count(cond: Arr, width: int) -> Arr:
            c = cond.view(np.int8)
            acc = c[_HIST:].copy()
            for j in range(1, width):
                acc += c[_HIST - j : _HIST - j + steps]
            return acc

        def fire(mask: Arr, r: int) -> None:
            np.multiply(mask.view(np.int8), np.int8(rank[r]), out=tmp)
            np.maximum(out, tmp, out=out)

        if 1 in rank:
            fire(np.abs(cur) >= 4, 1)
        if 2 in rank:
            fire((count(L >= 3, 3) >= 2) | (count(L <= -3, 3) >= 2), 2)
        if 3 in rank:
            fire((count(L >= 2, 5) >= 4) | (count(L <= -2, 5) >= 4), 3)
        if 4 in rank:
            lo = np.minimum(L[1:], L[:-1])
            hi = np.maximum(L[1:], L[:-1])
            lo = np.minimum(lo[2:], lo[:-2])
            hi = np.maximum(hi[2:], hi[:-2])
            lo = np.minimum(lo[4:], lo[:-4])
            hi = np.maximum(hi[4:], hi[:-4])
            fire((lo >= 1) | (hi <= -1), 4)
        return out
