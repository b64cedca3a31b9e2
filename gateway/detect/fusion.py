"""The anomaly engine: per-metric detector sets, score fusion, thresholding into events.

Events are emitted for flagged samples only: one per (sample, detector whose score ≥ threshold), plus
one ``fused`` event when a series' fused score crosses the threshold upwards (the previous sample of
the series was below it) — a sustained anomaly yields one ``fused`` event, not one per sample.
The fused score is first suppressed to 0 unless it beats the series' recent peak, which decays with a
half-life of ``fusion.holdoff`` samples, so a repeat of the same alarm soon after is not reported.
``expected`` and ``zscore`` of every event come from the EWMA baseline (mean and z of the sample
against the state before it), whichever detector flagged it. By default the detectors run fused in one
loop (:mod:`gateway.detect.kernel`, same scores); the separate classes run when the kernel does not apply.
On a lone series (no sibling metric) the machine model's scores and ``seasonal``'s are first replaced by
their calibrated values (:mod:`gateway.detect.likelihood`), before fusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.batch import F64, I64, MachineKey, StateEvent, room_for
from gateway.checkpoint import State
from gateway.detect.base import BatchLayout, Detector, fit
from gateway.detect.config import DETECTOR_NAMES, DetectionConfig, ResolvedProfile
from gateway.detect.cusum import CusumDetector
from gateway.detect.ewma import EwmaDetector
from gateway.detect.flatline import FlatlineDetector
from gateway.detect.kernel import FusedKernel, supports
from gateway.detect.likelihood import ScoreLikelihood
from gateway.detect.machine import MODEL_DETECTORS, MachineModel, ModelResult, subset_breaks
from gateway.detect.robust import RobustDetector
from gateway.detect.seasonal import SeasonalProfile
from gateway.detect.spike import SpikeDetector
from gateway.detect.western_electric import WesternElectricDetector

__all__ = ["DETECTOR_CLASSES", "EVENT_NAMES", "AnomalyEngine", "AnomalyEvents", "make_detector"]

DETECTOR_CLASSES: dict[str, type[Detector]] = {
    "ewma": EwmaDetector,
    "cusum": CusumDetector,
    "western_electric": WesternElectricDetector,
    "robust": RobustDetector,
    "flatline": FlatlineDetector,
    "spike": SpikeDetector,
}
EVENT_NAMES: tuple[str, ...] = (*DETECTOR_NAMES, "fused")
_FUSED = len(DETECTOR_NAMES)


def _step_row(layout: BatchLayout, slots: I64) -> tuple[I64, I64]:
    """Step and local row of packed slots (a tiled batch is a rectangle: no search)."""
    if layout.in_order:
        u = int(layout.rows.shape[0])
        return slots // u, slots % u
    step = np.searchsorted(layout.offsets, slots, side="right") - 1
    return step, slots - layout.offsets[step]


def make_detector(name: str, config: DetectionConfig | None = None, metric: str = "") -> Detector:
    """Build detector ``name`` with the parameters ``config`` resolves for ``metric``.

    >>> make_detector("cusum").h
    5.0
    """
    if name not in DETECTOR_CLASSES:
        allowed = ", ".join(DETECTOR_CLASSES)
        raise ValueError(f"unknown detector {name!r} (the machine model's run in AnomalyEngine); allowed: {allowed}")
    cfg = config or DetectionConfig()
    params = cfg.resolve(metric).params[name].model_dump()
    return DETECTOR_CLASSES[name](
        grace_samples=cfg.grace_samples, threshold=cfg.threshold, learn_flagged=cfg.learn_flagged, **params
    )


def _empty_f() -> F64:
    return np.empty(0, np.float64)


def _empty_i() -> I64:
    return np.empty(0, np.int64)


@dataclass(slots=True)
class AnomalyEvents:
    """Flagged samples, as parallel arrays; ``code`` indexes :data:`EVENT_NAMES` (``detector``).

    >>> ev = AnomalyEvents.empty()
    >>> len(ev), ev.detector
    (0, [])
    """

    series: I64 = field(default_factory=_empty_i)
    ts_ns: I64 = field(default_factory=_empty_i)
    code: I64 = field(default_factory=_empty_i)
    score: F64 = field(default_factory=_empty_f)
    value: F64 = field(default_factory=_empty_f)
    expected: F64 = field(default_factory=_empty_f)
    zscore: F64 = field(default_factory=_empty_f)

    names: tuple[str, ...] = EVENT_NAMES

    def __len__(self) -> int:
        return int(self.series.shape[0])

    @property
    def detector(self) -> list[str]:
        """Detector name per event (``fused`` for the fused threshold crossing)."""
        names = self.names
        return [names[c] for c in self.code.tolist()]

    @classmethod
    def empty(cls) -> AnomalyEvents:
        return cls()

    @classmethod
    def concat(cls, parts: Sequence[AnomalyEvents]) -> AnomalyEvents:
        if not parts:
            return cls()
        if len(parts) == 1:
            return parts[0]
        def cat(f: str) -> Any:
            return np.concatenate([getattr(p, f) for p in parts])

        return cls(cat("series"), cat("ts_ns"), cat("code"), cat("score"), cat("value"),
                   cat("expected"), cat("zscore"))


class _Profile:
    """The detector instances shared by every series with the same resolved settings."""

    def __init__(self, profile: ResolvedProfile, config: DetectionConfig) -> None:
        self.enabled = profile.enabled
        common: dict[str, Any] = {
            "grace_samples": config.grace_samples,
            "threshold": config.threshold,
            "learn_flagged": config.learn_flagged,
        }
        self.detectors: list[Detector] = []
        self.codes: list[int] = []
        weights = profile.fusion.weights
        self.weights: list[float] = []
        self.baseline: EwmaDetector
        self.model_names = [d for d in profile.detectors if d in MODEL_DETECTORS]
        self.model_codes = [DETECTOR_NAMES.index(d) for d in self.model_names]
        self.model_weights = [float(weights.get(d, 1.0)) for d in self.model_names]  # type: ignore[call-overload]
        # the time-of-day profile of lone series, a channel after the machine model's (calibrated with them)
        self.seasonal = SeasonalProfile(config.seasonal, config.grace_samples) if "seasonal" in profile.detectors \
            else None
        if self.seasonal is not None:
            if not self.model_names:
                raise ValueError("detector 'seasonal' needs the machine model's detectors in the same set "
                                 f"(it profiles the series the model finds lone), got {list(profile.detectors)}")
            self.model_codes.append(DETECTOR_NAMES.index("seasonal"))
            self.model_weights.append(float(weights.get("seasonal", 1.0)))
        for name in profile.detectors:
            if name in MODEL_DETECTORS or name == "seasonal":
                continue
            det = DETECTOR_CLASSES[name](**common, **profile.params[name].model_dump())
            self.detectors.append(det)
            self.codes.append(DETECTOR_NAMES.index(name))
            self.weights.append(float(weights.get(name, 1.0)))  # type: ignore[call-overload]
            if isinstance(det, EwmaDetector):
                det.record = True
                self.baseline = det
        self.own_baseline = "ewma" not in profile.detectors and not self.model_names
        # the fused kernel replaces the separate detectors (same scores, one loop); kept for fallback
        self.kernel = FusedKernel(profile, config) if supports(profile, config) and not self.model_names else None
        if self.own_baseline:
            self.baseline = EwmaDetector(**common, **profile.params["ewma"].model_dump(), record=True)
        self.method = profile.fusion.method
        half = profile.fusion.holdoff
        self.decay = 2.0 ** (-1.0 / half) if half > 0 else 0.0
        self.prev_fused: F64 = np.zeros(0, np.float64)
        # Per detector code: was the series' last sample flagged by that detector (for onset events).
        self.prev_flag: npt.NDArray[np.bool_] = np.zeros((len(DETECTOR_NAMES), 0), np.bool_)
        self.peak: F64 = np.zeros(0, np.float64)
        # the machine model's fused score, calibrated against its own distribution (gateway.detect.likelihood)
        self.calib = ScoreLikelihood(config.likelihood, config.grace_samples, len(self.model_codes)) \
            if self.model_names and config.likelihood.scope != "off" else None

    def suppress(self, layout: BatchLayout, fused: F64) -> None:
        """Zero (in place) every fused score that does not beat its series' decaying recent peak."""
        if self.decay <= 0.0:
            return
        rows = layout.rows
        peak = self.peak[rows]
        offsets = layout.offsets.tolist()
        g = self.decay
        for k, m in enumerate(layout.active.tolist()):
            s = fused[offsets[k] : offsets[k + 1]]
            p = peak[:m]
            beat = s > p
            p *= g
            np.maximum(p, s, out=p)
            s *= beat
        self.peak[rows] = peak

    def snapshot(self, n: int) -> State:
        """State for series ids below ``n`` (capacity beyond is not state)."""
        st = State({}, {"prev_fused": fit(self.prev_fused, n, 0.0), "peak": fit(self.peak, n, 0.0),
                        "prev_flag": fit(self.prev_flag.T, n, False).T.copy()})
        if self.kernel is not None:
            st.put("kernel", self.kernel.snapshot(n))
        else:
            for i, det in enumerate(self.detectors):
                st.put(f"d{i}", det.snapshot(n))
            if self.own_baseline:
                st.put("baseline", self.baseline.snapshot(n))
        if self.calib is not None:
            st.put("likelihood", self.calib.snapshot(n))
        if self.seasonal is not None:
            st.put("seasonal", self.seasonal.snapshot(n))
        return st

    def restore(self, state: State) -> None:
        self.prev_fused = np.array(state.array("prev_fused"), np.float64)
        self.peak = np.array(state.array("peak"), np.float64)
        self.prev_flag = np.array(state.array("prev_flag"), np.bool_)
        shape = self.prev_fused.shape
        if self.prev_flag.shape != (len(DETECTOR_NAMES), *shape) or self.peak.shape != shape:
            raise ValueError("fusion state arrays do not match")
        if self.kernel is not None:
            self.kernel.restore(state.sub("kernel"))
        else:
            for i, det in enumerate(self.detectors):
                det.restore(state.sub(f"d{i}"))
            if self.own_baseline:
                self.baseline.restore(state.sub("baseline"))
        if self.calib is not None:
            self.calib.restore(state.sub("likelihood"))
        if self.seasonal is not None:
            self.seasonal.restore(state.sub("seasonal"))

    def fuse(self, scores: list[F64], n: int) -> F64:
        fused = np.zeros(n, np.float64)
        weights = self.weights + self.model_weights
        if self.method == "noisy_or":
            fused += 1.0
            for s, w in zip(scores, weights, strict=True):
                fused *= 1.0 - w * s
            return 1.0 - fused
        if self.method == "mean":
            total = sum(weights) or 1.0
            for s, w in zip(scores, weights, strict=True):
                fused += (w / total) * s
            return fused
        tmp = np.empty(n, np.float64)
        for s, w in zip(scores, weights, strict=True):
            np.maximum(fused, s if w == 1.0 else np.multiply(s, w, out=tmp), out=fused)
        return fused


class AnomalyEngine:
    """Runs the configured detectors on every telemetry batch and returns the flagged samples.

    Parameters
    ----------
    config
        The ``[detect]`` section; per-metric settings are resolved once per series id and cached.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(4)
    >>> eng = AnomalyEngine(DetectionConfig())
    >>> n = 400
    >>> series = np.tile(np.array([0, 1], np.int64), n // 2)   # two interleaved series
    >>> values = rng.normal(20.0, 0.5, n); values[301] = 35.0  # a spike on series 1
    >>> ts = np.arange(n, dtype=np.int64) * 1_000_000_000
    >>> ev = eng.process(series, ts, values, ["temp_c", "pressure_bar"])
    >>> at = ev.ts_ns == 301_000_000_000
    >>> sorted({d for d, a in zip(ev.detector, at) if a})  # lone series: every score calibrated, these improbable
    ['fused', 'residual_spike', 'residual_variance']
    >>> set(ev.series[at].tolist()), float(ev.value[at][0])
    ({1}, 35.0)
    """

    def __init__(self, config: DetectionConfig) -> None:
        self.config = config
        self._profile_of: I64 = np.zeros(0, np.int64)
        self._profiles: list[_Profile] = []
        self._keys: dict[str, int] = {}
        self._pid_of_metric: dict[str, int] = {}
        self.last_fused: F64 = np.empty(0, np.float64)
        self.model = MachineModel(config.machine, config.grace_samples, config.model_threads())
        self._uses_model: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)
        self._profile_buf: I64 = self._profile_of  # what _profile_of and _uses_model are prefixes of
        self._uses_buf: npt.NDArray[np.bool_] = self._uses_model
        self._model: ModelResult | None = None  # this batch's machine-model scores (input order)

    def _resolve(self, needed: int, metrics: Sequence[str]) -> None:
        done = self._profile_of.shape[0]
        if needed <= done:
            return
        if len(metrics) < needed:
            raise ValueError(f"metrics has {len(metrics)} names but series id {needed - 1} was given")
        new = np.empty(needed - done, np.int64)
        by_metric = self._pid_of_metric
        for i, sid in enumerate(range(done, needed)):  # once per new series, not per sample
            metric = metrics[sid]
            pid = by_metric.get(metric)
            if pid is None:  # once per metric name: the profile depends on the name only
                prof = self.config.resolve(metric)
                key = prof.key
                pid = self._keys.get(key)
                if pid is None:
                    pid = len(self._profiles)
                    self._keys[key] = pid
                    self._profiles.append(_Profile(prof, self.config))
                by_metric[metric] = pid
            new[i] = pid
        # views of buffers whose capacity doubles: a batch of new series does not copy the old entries
        # (a profile's use of the model never changes, so only the new series' entries are computed)
        buf = self._profile_buf = room_for(self._profile_buf, done, needed)
        ubuf = self._uses_buf = room_for(self._uses_buf, done, needed)
        uses = np.array([bool(p.enabled and p.model_names) for p in self._profiles], np.bool_)
        buf[done:needed] = new
        ubuf[done:needed] = uses[new]
        self._profile_of, self._uses_model = buf[:needed], ubuf[:needed]

    def process(
        self, series: I64, ts_ns: I64, values: F64, metrics: Sequence[str],
        machines: Sequence[MachineKey] | None = None, states: Sequence[StateEvent] = (),
        state_rows: Sequence[int] | I64 | None = None, machine_list: Sequence[MachineKey] | None = None,
        group_breaks: Sequence[int] | I64 | None = None,
    ) -> AnomalyEvents:
        """Score and learn one batch (parallel arrays in arrival order); return the flagged samples.

        Non-finite values are skipped (neither scored nor learned). The fused score of every sample
        is left in :attr:`last_fused` (0 for skipped samples and metrics with detection disabled).
        ``machines`` (the machine of each series id) and ``states`` (the batch's state-channel events)
        give the machine model its context: siblings, peers and regimes; ``state_rows`` says where each
        state arrived (the samples before it; default: before them all); ``machine_list`` (the registry's
        machines by id) numbers the model's machines as the registry does (in arrival order);
        ``group_breaks``: rows where a message starts at the timestamp of the row before it.
        """
        series = np.asarray(series, np.int64)
        ts_ns = np.asarray(ts_ns, np.int64)
        values = np.asarray(values, np.float64)
        n = series.shape[0]
        self.last_fused = _empty_f()  # let the previous batch's scores go before this batch allocates
        if n == 0 or not self.config.enabled:
            self.last_fused = np.zeros(n, np.float64)
            if states and self.config.enabled:  # state events alone still move their machines' regime
                self.model.run(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), states=states,
                               state_rows=state_rows, machine_list=machine_list)
            return AnomalyEvents()
        self._resolve(int(series.max()) + 1, metrics)
        finite = np.isfinite(values)
        self._model = None
        if self._uses_model.any():
            use = finite & self._uses_model[series]
            at = None if bool(use.all()) else np.flatnonzero(use)
            if at is None:
                self._model = self.model.run(series, ts_ns, values, machines=machines, metrics=metrics,
                                             states=states, state_rows=state_rows, machine_list=machine_list,
                                             group_breaks=group_breaks)
            else:
                rows = None if state_rows is None else np.searchsorted(at, np.asarray(state_rows, np.int64))
                mach = self.model.prepare(series, machines, metrics, machine_list)
                brk = subset_breaks(at, mach, ts_ns, np.asarray(() if group_breaks is None else group_breaks,
                                                                np.int64))
                part = self.model.run(series[at], ts_ns[at], values[at], machines=machines, metrics=metrics,
                                      states=states, state_rows=rows, machine_list=machine_list, group_breaks=brk)
                full = ModelResult({k: np.zeros(n) for k in part.scores}, np.zeros(n), np.zeros(n))
                for k, v in part.scores.items():
                    full.scores[k][at] = v
                full.expected[at] = part.expected
                full.zscore[at] = part.zscore
                self._model = full
        elif states:
            self.model.run(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), states=states,
                           state_rows=np.full(len(states), n, np.int64), machine_list=machine_list)
        pids = self._profile_of[series] if self._profiles[1:] else None
        pid_list = np.unique(pids).tolist() if pids is not None else [0]
        all_finite = bool(finite.all())
        if not (len(pid_list) == 1 and all_finite and self._profiles[pid_list[0]].enabled):
            self.last_fused = np.zeros(n, np.float64)  # else the one run below covers every sample
        parts: list[AnomalyEvents] = []
        for pid in pid_list:
            prof = self._profiles[pid]
            if not prof.enabled:
                continue
            sel = finite if pids is None or len(pid_list) == 1 else finite & (pids == pid)
            idx = None if (all_finite if sel is finite else bool(sel.all())) else np.flatnonzero(sel)
            if idx is None:
                parts.append(self._run(prof, series, ts_ns, values, None))
            elif idx.shape[0]:
                parts.append(self._run(prof, series[idx], ts_ns[idx], values[idx], idx))
        return AnomalyEvents.concat(parts)

    def snapshot(self) -> State:
        """Every detector's per-series state, fusion peaks and flags, the machine model (copies)."""
        st = State({"resolved": int(self._profile_of.shape[0]), "profiles": len(self._profiles)},
                   {"profile_of": self._profile_of.copy()})
        for i, prof in enumerate(self._profiles):
            st.put(f"p{i}", prof.snapshot(int(self._profile_of.shape[0])))
        st.put("model", self.model.snapshot())
        return st

    def restore(self, state: State, metrics: Sequence[str]) -> None:
        """Continue from a :meth:`snapshot`; ``metrics`` is the restored registry's name per series id.

        Profiles are numbered by first use in series-id order, so resolving the same names again gives
        the same numbering; the saved ``profile_of`` checks it.
        """
        self.__init__(self.config)  # type: ignore[misc]
        n = int(state.meta["resolved"])
        if n:
            self._resolve(n, metrics)
        if len(self._profiles) != int(state.meta["profiles"]) or not np.array_equal(
            self._profile_of, state.array("profile_of")
        ):
            raise ValueError("detector profiles do not match the saved ones")
        for i, prof in enumerate(self._profiles):
            prof.restore(state.sub(f"p{i}"))
        self.model.restore(state.sub("model"))

    def score(self, series: I64, ts_ns: I64, values: F64, metrics: Sequence[str]) -> F64:
        """Like :meth:`process`, but return the fused score of every sample."""
        self.process(series, ts_ns, values, metrics)
        return self.last_fused

    @staticmethod
    def _onsets(
        prof: _Profile, layout: BatchLayout, cand: I64, hits: list[tuple[I64, int, F64]], codes: set[int],
        counts: I64,
    ) -> list[tuple[I64, int, F64]]:
        """The hits where a detector's flag turns on for its series (the previous sample was not flagged)."""
        out: list[tuple[I64, int, F64]] = []
        seen: set[int] = set()
        for w, code, sc in hits:
            if code not in codes:
                continue
            p = cand[w]  # sorted packed slots flagged by this detector
            step, r = _step_row(layout, p)
            slot = layout.offsets[np.maximum(step - 1, 0)] + r
            j = np.minimum(np.searchsorted(p, slot), p.shape[0] - 1)
            prev = np.where(step > 0, p[j] == slot, prof.prev_flag[code, layout.rows[r]])
            keep = ~prev
            if keep.any():
                out.append((w[keep], code, sc[keep]))
            prof.prev_flag[code, layout.rows] = False
            prof.prev_flag[code, layout.rows[r[step == counts[r] - 1]]] = True  # flagged at its last sample
            seen.add(code)
        for code in codes - seen:
            prof.prev_flag[code, layout.rows] = False
        return out

    def _calibrated(self, calib: ScoreLikelihood, layout: BatchLayout, raw: list[F64],
                    lone: npt.NDArray[np.bool_], lone_samples: npt.NDArray[np.bool_]) -> list[F64]:
        """The machine model's scores (packed), those of the series ``likelihood.scope`` names replaced by
        their calibrated values (only those series learn the calibration); ``lone`` per local row (a lone
        sample in the batch), ``lone_samples`` per packed sample."""
        use: npt.NDArray[np.bool_] | None = None
        samples: npt.NDArray[np.bool_] | None = None
        if self.config.likelihood.scope == "lone":
            use, samples = lone, lone_samples
            if not use.any():
                return raw
        cal = calib.run(layout, np.stack(raw, axis=1), use, samples)
        return [np.ascontiguousarray(cal[:, c]) for c in range(len(raw))]

    def _run(self, prof: _Profile, series: I64, ts_ns: I64, values: F64, idx: I64 | None) -> AnomalyEvents:
        layout = BatchLayout.build(series)
        packed = layout.pack(values)
        n = packed.shape[0]
        thr = self.config.threshold
        hits: list[tuple[I64, int, F64]] = []
        if prof.kernel is not None:
            res = prof.kernel.run(layout, packed)
            fused = res.fused
            for name, expo in res.expo.items():
                s = -np.expm1(expo)
                sel = np.flatnonzero(s >= thr)
                if sel.shape[0]:
                    hits.append((sel, DETECTOR_NAMES.index(name), s[sel]))
            if res.we_score is not None:
                sel = np.flatnonzero(res.we_score >= thr)
                if sel.shape[0]:
                    hits.append((sel, DETECTOR_NAMES.index("western_electric"), res.we_score[sel]))
            cand = res.cand
            baseline = res.baseline
        else:
            scores = [det.run(layout, packed) for det in prof.detectors]
            model = self._model
            if prof.model_names:
                assert model is not None  # the machine model ran on every sample of this profile
                own = [layout.pack(model.scores[d] if idx is None else model.scores[d][idx]) for d in prof.model_names]
                # lone: no sibling metric had a sample yet (only its own levels explain it), sample by sample,
                # so where a batch is cut does not decide it
                assert model.lone is not None
                lone_in = model.lone if idx is None else model.lone[idx]
                lone_samples = layout.pack(lone_in.astype(np.float64)) > 0.5
                lone = np.zeros(layout.rows.shape[0], np.bool_)
                lone[layout.row[lone_in]] = True
                if prof.seasonal is not None:
                    sea = prof.seasonal.run(layout, packed, layout.pack(np.multiply(ts_ns, 1e-9)), lone, lone_samples)
                    own.append(sea if prof.calib is not None else np.nan_to_num(sea, nan=0.0))
                scores += own if prof.calib is None else self._calibrated(prof.calib, layout, own, lone,
                                                                          lone_samples)
            if prof.own_baseline:
                prof.baseline.run(layout, packed)
            fused = prof.fuse(scores, n)
            for code, s in zip(prof.codes + prof.model_codes, scores, strict=True):
                where = np.flatnonzero(s >= thr)
                if where.shape[0]:
                    hits.append((where, code, s[where]))
            cand = np.arange(n)
            if prof.model_names:
                assert model is not None
                m_exp = layout.pack(model.expected if idx is None else model.expected[idx])
                m_z = layout.pack(model.zscore if idx is None else model.zscore[idx])

                def baseline(at: I64) -> tuple[F64, F64]:
                    return m_exp[at], m_z[at]
            else:
                base = prof.baseline

                def baseline(at: I64) -> tuple[F64, F64]:
                    return base.expected[at], base.zscore[at]
        need = int(layout.rows.max()) + 1
        if prof.prev_fused.shape[0] < need:
            cap = max(need, 2 * prof.prev_fused.shape[0])
            for name in ("prev_fused", "peak"):
                old = getattr(prof, name)
                grown = np.zeros(cap, np.float64)
                grown[: old.shape[0]] = old
                setattr(prof, name, grown)
            flags = np.zeros((len(DETECTOR_NAMES), cap), np.bool_)
            flags[:, : prof.prev_flag.shape[1]] = prof.prev_flag
            prof.prev_flag = flags
        prof.suppress(layout, fused)

        # Rising edge of the fused score: compare with the previous sample of the same series.
        u = layout.rows.shape[0]
        counts = np.searchsorted(-layout.active, -np.arange(u), side="left")  # samples per row
        last = fused[layout.offsets[counts - 1] + np.arange(u)]
        # fused >= thr needs some detector >= thr (weights are <= 1), so only candidates can cross
        at_high = np.flatnonzero(fused[cand] >= thr)
        at = at_high
        if at_high.shape[0]:
            high = cand[at_high]
            step, r = _step_row(layout, high)
            prev = np.where(step > 0, fused[layout.offsets[np.maximum(step - 1, 0)] + r],
                            prof.prev_fused[layout.rows[r]])
            rise = prev < thr
            where, at = high[rise], at_high[rise]
        else:
            where = at_high
        prof.prev_fused[layout.rows] = last

        out_fused = fused if layout.in_order else layout.unpack(fused)  # fused is this batch's own array
        if idx is None:
            self.last_fused = out_fused
        else:
            self.last_fused[idx] = out_fused

        # hits index ``cand``; the fused crossings index packed slots directly
        mode = self.config.events
        always = {DETECTOR_NAMES.index(d) for d in self.config.always_report}
        onset_codes = set(range(len(DETECTOR_NAMES))) if mode == "onset" else always if mode == "fused" else set()
        onsets = self._onsets(prof, layout, cand, hits, onset_codes, counts) if onset_codes else []
        if mode == "onset":
            hits = onsets
        elif mode == "fused":  # the rules that fired where the fused score rose, plus always-reported onsets
            onset_at = {code: w for w, code, _ in onsets}
            kept = list(onsets)
            for w, code, sc in hits:
                m = np.isin(cand[w], where)
                if code in onset_at:  # already reported as an onset
                    m &= ~np.isin(w, onset_at[code])
                if m.any():
                    kept.append((w[m], code, sc[m]))
            hits = kept
        events = [(cand[w], code, sc, w) for w, code, sc in hits]
        if where.shape[0]:
            events.append((where, _FUSED, fused[where], at))
        if not events:
            return AnomalyEvents()
        packed_idx = np.concatenate([e[0] for e in events])
        at_cand = np.concatenate([e[3] for e in events])
        if layout.in_order:
            sample = packed_idx  # tiled batch: packed order is input order
        else:
            inv = np.empty(n, np.int64)
            inv[layout.flat] = np.arange(n)
            sample = inv[packed_idx]  # packed slot -> position in this (sub)batch
        order = np.argsort(sample, kind="stable")
        packed_idx = packed_idx[order]
        sample = sample[order]
        at_cand = at_cand[order]
        expected_at, zscore_at = baseline(at_cand)
        return AnomalyEvents(
            series=series[sample],
            ts_ns=ts_ns[sample],
            code=np.concatenate([np.full(e[0].shape[0], e[1], np.int64) for e in events])[order],
            score=np.concatenate([e[2] for e in events])[order],
            value=packed[packed_idx],
            expected=expected_at,
            zscore=zscore_at,
        )
