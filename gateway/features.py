"""Window features of high-rate waveforms (vibration): RMS, peak, crest factor, kurtosis, ISO 10816 zone.

Fixed-rate blocks (:class:`~gateway.batch.WaveformBlock`) are cut into windows of ``window_samples``
consecutive samples; a per-series carry-over buffer joins windows across blocks, so the result does not
depend on how a device splits its stream (1000-sample blocks with 1000-sample windows give one row per
block; 250-sample blocks give one row every fourth block). A block that does not continue its series
(gap, overlap or a different ``dt``) discards the incomplete window before it (``dropped_samples``).
All arithmetic is vectorised over windows; there is no per-sample Python.

Features of one window (after removing the window mean when ``remove_mean``, as an AC-coupled vibration
meter does, so gravity on an accelerometer axis does not count as vibration):

* ``rms`` = √(mean x²); ``peak`` = max |x|; ``crest`` = peak / rms (NaN when rms = 0);
* ``kurtosis`` = m4 / m2² (Pearson: 3 for Gaussian noise, 1.5 for a sine; NaN for a constant window);
* ``zone``: ISO 10816-1 severity zone A/B/C/D of the velocity RMS in mm/s, for metrics whose name matches
  ``velocity_metrics`` only ("" otherwise); the machine's class (I–IV) sets the boundaries, and a value
  on a boundary belongs to the better zone.

>>> import numpy as np
>>> from gateway.batch import MachineKey, WaveformBlock
>>> fan = MachineKey("plant1", "utilities", "hvac", "fan1")
>>> t = np.arange(2000) * 1e-3
>>> velocity = 5.0 * np.sin(2 * np.pi * 50 * t)  # mm/s peak, 1 kHz sampling
>>> fx = FeatureExtractor(FeaturesConfig(window_samples=1000), {})
>>> rows = fx.process([WaveformBlock(7, 0, 1_000_000, velocity)], ["vibration_mm_s"], [fan])
>>> len(rows), rows.ts_ns.tolist(), rows.zone.tolist()
(2, [0, 1000000000], ['C', 'C'])
>>> [round(float(v), 3) for v in (rows.rms[0], rows.peak[0], rows.crest[0], rows.kurtosis[0])]
[3.536, 5.0, 1.414, 1.5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.batch import MachineKey, WaveformBlock
from gateway.checkpoint import State

__all__ = [
    "ISO10816_LIMITS_MM_S",
    "FeatureExtractor",
    "FeatureRows",
    "FeaturesConfig",
    "VibrationClass",
    "severity_zones",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Zones = npt.NDArray[np.str_]

VibrationClass = Literal["I", "II", "III", "IV"]

# ISO 10816-1 zone boundaries A/B, B/C, C/D for velocity RMS in mm/s, per machine class.
ISO10816_LIMITS_MM_S: dict[VibrationClass, tuple[float, float, float]] = {
    "I": (0.71, 1.8, 4.5),
    "II": (1.12, 2.8, 7.1),
    "III": (1.8, 4.5, 11.2),
    "IV": (2.8, 7.1, 18.0),
}
_CLASSES: tuple[VibrationClass, ...] = ("I", "II", "III", "IV")
_LIMITS = np.array([ISO10816_LIMITS_MM_S[c] for c in _CLASSES], dtype=np.float64)
_ZONE_LETTERS = np.array(["A", "B", "C", "D", ""], dtype="<U1")
_NO_ZONE = -1
_NO_END = -(2**63)
_LONG_AGO = -(2**62)  # no sample in zone C or D yet


class FeaturesConfig(BaseModel):
    """The ``[features]`` section.

    >>> FeaturesConfig().window_samples, FeaturesConfig().default_vibration_class
    (1000, 'II')
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_samples: int = Field(default=1000, ge=4, le=10_000_000)
    default_vibration_class: VibrationClass = "II"
    velocity_metrics: list[str] = Field(default_factory=lambda: ["*velocity*", "*vel*mm_s*", "vibration_mm_s"])
    remove_mean: bool = True
    # a series' zone C/D report repeats only after this long without a sample in C or D (a stop reads zone A
    # but is no better condition: a machine that runs in zone C is reported once, not at every start)
    severity_rearm_s: float = Field(default=86400.0, gt=0)

    @field_validator("velocity_metrics")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern.strip():
                raise ValueError("velocity_metrics: a pattern is empty; use globs such as '*velocity*'")
        return v


class HasVibrationClass(Protocol):
    """What the extractor needs of a ``[machines."<name>"]`` entry (``gateway.oee.MachineConfig``)."""

    @property
    def vibration_class(self) -> VibrationClass | None: ...


@dataclass(slots=True)
class FeatureRows:
    """One row per complete window, as parallel arrays; measurement ``vibration_features``.

    ``zone`` is "" where it does not apply (not a velocity metric); ``crest`` and ``kurtosis`` are NaN
    where undefined (a constant window).
    """

    series: I64
    ts_ns: I64
    rms: F64
    peak: F64
    crest: F64
    kurtosis: F64
    zone: Zones
    metric: list[str] = field(default_factory=list)
    machine: list[MachineKey] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.series.shape[0])

    @classmethod
    def empty(cls) -> FeatureRows:
        f = np.empty(0, np.float64)
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), f, f.copy(), f.copy(), f.copy(), np.empty(0, "<U1"))


def severity_zones(rms_mm_s: npt.ArrayLike, vibration_class: VibrationClass | Sequence[VibrationClass]) -> Zones:
    """ISO 10816-1 zone letters of velocity RMS values (mm/s); a boundary value is in the better zone.

    >>> severity_zones([0.5, 1.12, 1.13, 2.81, 7.2], "II").tolist()
    ['A', 'A', 'B', 'C', 'D']
    """
    rms = np.asarray(rms_mm_s, dtype=np.float64)
    if isinstance(vibration_class, str):
        limits = np.broadcast_to(np.asarray(ISO10816_LIMITS_MM_S[vibration_class]), (*rms.shape, 3))
    else:
        limits = _LIMITS[[_CLASSES.index(c) for c in vibration_class]]
    codes: I64 = (rms[..., None] > limits).sum(axis=-1)
    zones: Zones = _ZONE_LETTERS[codes]
    return zones


@dataclass(slots=True)
class _Carry:
    t0_ns: int  # time of the first carried sample
    dt_ns: int
    values: F64

    @property
    def next_ns(self) -> int:
        return self.t0_ns + int(self.values.shape[0]) * self.dt_ns


class FeatureExtractor:
    """Cuts waveform blocks into windows and computes their features.

    Parameters
    ----------
    config
        The ``[features]`` section.
    machines
        ``[machines."<name>"]`` entries keyed by machine name (for ``vibration_class``).

    Attributes
    ----------
    dropped_samples
        Samples of incomplete windows discarded because their series did not continue.

    Examples
    --------
    Four 250-sample blocks make one 1000-sample window:

    >>> import numpy as np
    >>> from gateway.batch import MachineKey, WaveformBlock
    >>> m = MachineKey("plant1", "assembly", "line1", "press1")
    >>> rng = np.random.default_rng(0)
    >>> accel = rng.normal(0.0, 0.2, 1000)
    >>> fx = FeatureExtractor(FeaturesConfig(), {})
    >>> blocks = [WaveformBlock(3, i * 250_000_000, 1_000_000, accel[i * 250:(i + 1) * 250]) for i in range(4)]
    >>> [len(fx.process([b], ["accel_g"], [m])) for b in blocks]
    [0, 0, 0, 1]
    >>> rows = fx.process([], [], [])
    >>> len(rows), rows.zone.tolist()
    (0, [])
    """

    def __init__(self, config: FeaturesConfig, machines: Mapping[str, HasVibrationClass]) -> None:
        self.config = config
        self._machines = machines
        self._window = config.window_samples
        self._carry: dict[int, _Carry] = {}
        self._is_velocity: dict[str, bool] = {}
        self._end_ns: dict[int, int] = {}  # per series: end of the newest block taken (a redelivery is older)
        self.dropped_samples = 0
        self.repeated_blocks = 0

    def snapshot(self) -> State:
        """Carry-over buffers and block ends per series (see :mod:`gateway.checkpoint`)."""
        sids = sorted(self._carry)
        c = [self._carry[s] for s in sids]
        ends = sorted(self._end_ns.items())
        return State(
            {"dropped_samples": self.dropped_samples, "repeated_blocks": self.repeated_blocks},
            {"carry_series": np.asarray(sids, np.int64), "carry_t0": np.asarray([x.t0_ns for x in c], np.int64),
             "carry_dt": np.asarray([x.dt_ns for x in c], np.int64),
             "carry_len": np.asarray([x.values.shape[0] for x in c], np.int64),
             "carry_values": np.concatenate([x.values for x in c]) if c else np.empty(0, np.float64),
             "end_series": np.asarray([k for k, _ in ends], np.int64),
             "end_ns": np.asarray([v for _, v in ends], np.int64)},
        )

    def restore(self, state: State) -> None:
        sids, t0, dt, lens = (state.array(k).tolist() for k in ("carry_series", "carry_t0", "carry_dt", "carry_len"))
        values = np.asarray(state.array("carry_values"), np.float64)
        bounds = np.cumsum([0, *lens]).tolist()
        if bounds[-1] != values.shape[0]:
            raise ValueError("feature carry-over lengths do not match the saved values")
        self._carry = {s: _Carry(a, d, values[bounds[i] : bounds[i + 1]].copy())
                       for i, (s, a, d) in enumerate(zip(sids, t0, dt, strict=True))}
        self._end_ns = dict(zip(state.array("end_series").tolist(), state.array("end_ns").tolist(), strict=True))
        self.dropped_samples = int(state.meta["dropped_samples"])
        self.repeated_blocks = int(state.meta["repeated_blocks"])

    def _class_code(self, metric: str, machine: MachineKey) -> int:
        is_velocity = self._is_velocity.get(metric)
        if is_velocity is None:
            is_velocity = any(fnmatchcase(metric, g) for g in self.config.velocity_metrics)
            self._is_velocity[metric] = is_velocity
        if not is_velocity:
            return _NO_ZONE
        cfg = self._machines.get(machine.machine)
        cls = cfg.vibration_class if cfg is not None and cfg.vibration_class else None
        return _CLASSES.index(cls or self.config.default_vibration_class)

    def process(
        self, blocks: Sequence[WaveformBlock], metrics: Sequence[str], machine_of: Sequence[MachineKey]
    ) -> FeatureRows:
        """Features of every window completed by ``blocks`` (``metrics``/``machine_of``: one per block)."""
        if not len(blocks) == len(metrics) == len(machine_of):
            raise ValueError(
                f"blocks, metrics and machine_of differ in length ({len(blocks)}, {len(metrics)}, {len(machine_of)})"
            )
        w = self._window
        windows: list[F64] = []
        series: list[I64] = []
        starts: list[I64] = []
        classes: list[I64] = []
        metric_rows: list[str] = []
        machine_rows: list[MachineKey] = []
        for block, metric, machine in zip(blocks, metrics, machine_of, strict=True):
            values = np.asarray(block.values, dtype=np.float64)
            if values.shape[0] == 0:
                continue
            sid, dt = block.series, block.dt_ns
            end = block.t0_ns + values.shape[0] * dt
            if end <= self._end_ns.get(sid, _NO_END):
                self.repeated_blocks += 1  # nothing newer than what was taken: a redelivered block
                continue
            self._end_ns[sid] = end
            carry = self._carry.pop(sid, None)
            if carry is not None and carry.dt_ns == dt and abs(block.t0_ns - carry.next_ns) <= dt // 2:
                data, t0 = np.concatenate((carry.values, values)), carry.t0_ns
            else:
                if carry is not None:
                    self.dropped_samples += carry.values.shape[0]
                data, t0 = values, block.t0_ns
            k = data.shape[0] // w
            if k:
                windows.append(data[: k * w].reshape(k, w))
                series.append(np.full(k, sid, dtype=np.int64))
                starts.append(t0 + np.arange(k, dtype=np.int64) * (w * dt))
                classes.append(np.full(k, self._class_code(metric, machine), dtype=np.int64))
                metric_rows.extend([metric] * k)
                machine_rows.extend([machine] * k)
            if data.shape[0] > k * w:
                self._carry[sid] = _Carry(t0 + k * w * dt, dt, data[k * w :].copy())
        if not windows:
            return FeatureRows.empty()
        x = np.concatenate(windows)
        rms, peak, crest, kurt = self._features(x)
        return FeatureRows(
            series=np.concatenate(series),
            ts_ns=np.concatenate(starts),
            rms=rms,
            peak=peak,
            crest=crest,
            kurtosis=kurt,
            zone=self._zones(rms, np.concatenate(classes)),
            metric=metric_rows,
            machine=machine_rows,
        )

    def _features(self, x: F64) -> tuple[F64, F64, F64, F64]:
        raw_ms = np.einsum("ij,ij->i", x, x) / x.shape[1]
        mean = x.mean(axis=1, keepdims=True)
        centred = x - mean
        sq = centred * centred
        m2 = sq.mean(axis=1)
        m4 = (sq * sq).mean(axis=1)
        if self.config.remove_mean:
            rms = np.sqrt(m2)
            peak = np.abs(centred).max(axis=1)
        else:
            rms = np.sqrt(raw_ms)
            peak = np.abs(x).max(axis=1)
        crest = np.full_like(rms, np.nan)
        np.divide(peak, rms, out=crest, where=rms > 0)
        # a constant window leaves only rounding noise in m2: call its kurtosis undefined
        spread = m2 > 1e-24 * np.maximum(raw_ms, np.finfo(np.float64).tiny)
        kurt = np.full_like(rms, np.nan)
        np.divide(m4, m2 * m2, out=kurt, where=spread)
        if self.config.remove_mean:
            rms = np.where(spread, rms, 0.0)
            peak = np.where(spread, peak, 0.0)
            crest = np.where(spread, crest, np.nan)
        return rms, peak, crest, kurt

    @staticmethod
    def _zones(rms: F64, classes: I64) -> Zones:
        has_zone = classes != _NO_ZONE
        codes = np.full(rms.shape[0], 4, dtype=np.int64)  # 4 → ""
        if has_zone.any():
            limits = _LIMITS[classes[has_zone]]
            codes[has_zone] = (rms[has_zone, None] > limits).sum(axis=1)
        zones: Zones = _ZONE_LETTERS[codes]
        return zones


@dataclass(slots=True)
class SeverityEvents:
    """Samples where a velocity metric's ISO 10816 zone worsened into C or D (parallel arrays)."""

    series: I64
    ts_ns: I64
    value: F64
    zone: I64  # 2 = C, 3 = D
    limit: F64  # the zone's lower boundary (mm/s) for the machine's class

    def __len__(self) -> int:
        return int(self.series.shape[0])


class SeverityMonitor:
    """ISO 10816-1 severity of scalar velocity-RMS telemetry (e.g. ``vibration_mm_s`` from a sensor).

    Reports a sample when its series enters zone C ("restricted long-term operation") or zone D
    ("damage"), latched: an episode of a series is its samples in C or D with less than
    ``severity_rearm_s`` (a day) between one and the next, and it reports its first C and its first D.
    A stop (zone A) ends no episode: a machine whose running vibration sits in zone C reports once, not at
    every start, and again once it has been out of C and D for a day. Zone boundaries come from the
    machine's class (``[machines."<m>"] vibration_class``, default ``[features] default_vibration_class``).

    >>> import numpy as np
    >>> from gateway.batch import MachineKey
    >>> mon = SeverityMonitor(FeaturesConfig(), {})
    >>> v = np.array([1.0, 2.0, 3.0, 2.9, 3.1, 8.0, 7.5, 0.5, 3.0])  # class II: 1.12 / 2.8 / 7.1
    >>> day = 86_400 * 10**9
    >>> ts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8]) * 3600 * 10**9  # hourly
    >>> ev = mon.process(np.zeros(9, np.int64), ts, v, ["vibration_mm_s"], [MachineKey("s", "a", "l", "m")])
    >>> (ev.ts_ns // (3600 * 10**9)).tolist(), ev.zone.tolist()  # C at 2 h, D at 5 h; C at 8 h is the same episode
    ([2, 5], [2, 3])
    >>> ev = mon.process(np.zeros(1, np.int64), ts[8:] + 2 * day, v[8:], ["vibration_mm_s"],
    ...                  [MachineKey("s", "a", "l", "m")])
    >>> ev.zone.tolist()  # two days later: a new episode
    [2]
    """

    def __init__(self, config: FeaturesConfig, machines: Mapping[str, HasVibrationClass]) -> None:
        self._zones = FeatureExtractor(config, machines)  # shares the velocity-metric and class rules
        self._class: I64 = np.zeros(0, np.int64)  # per series id: class index, or _NO_ZONE
        self._latch: I64 = np.zeros(0, np.int64)  # per series id: worst zone of its current episode
        self._last: I64 = np.zeros(0, np.int64)  # per series id: time of its last sample in C or D (ns)
        self._rearm_ns = int(config.severity_rearm_s * 1e9)

    def snapshot(self) -> State:
        """Class, latch and last C/D time per series id (see :mod:`gateway.checkpoint`)."""
        return State({}, {"class": self._class.copy(), "latch": self._latch.copy(), "last": self._last.copy()})

    def restore(self, state: State) -> None:
        cls, latch = np.array(state.array("class"), np.int64), np.array(state.array("latch"), np.int64)
        last = np.array(state.array("last"), np.int64)
        if cls.shape != latch.shape or cls.shape != last.shape or cls.ndim != 1:
            raise ValueError("severity state arrays do not match")
        self._class, self._latch, self._last = cls, latch, last

    def _classes(self, n: int, metrics: Sequence[str], machine_of: Sequence[MachineKey]) -> I64:
        known = self._class.shape[0]
        if n > known:
            new = [self._zones._class_code(metrics[s], machine_of[s]) for s in range(known, n)]
            self._class = np.concatenate([self._class, np.asarray(new, np.int64)])
            self._latch = np.concatenate([self._latch, np.zeros(n - known, np.int64)])
            self._last = np.concatenate([self._last, np.full(n - known, _LONG_AGO, np.int64)])
        return self._class

    def process(
        self, series: I64, ts_ns: I64, values: F64, metrics: Sequence[str], machine_of: Sequence[MachineKey]
    ) -> SeverityEvents:
        """Scan one batch (arrival order; ``metrics``/``machine_of`` indexed by series id)."""
        empty = SeverityEvents(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64),
                               np.empty(0))
        if series.shape[0] == 0:
            return empty
        classes = self._classes(int(series.max()) + 1, metrics, machine_of)
        sel = np.flatnonzero(classes[series] != _NO_ZONE)
        if sel.shape[0] == 0:
            return empty
        order = sel[np.argsort(series[sel], kind="stable")]  # by series, arrival order within one
        limits = _LIMITS[classes[series[order]]]
        code = (values[order][:, None] > limits).sum(axis=1)
        hi = code >= 2  # only samples in C or D start, extend or worsen an episode
        if not hi.any():
            return empty
        order, code, limits = order[hi], code[hi], limits[hi]
        s = series[order]
        t = ts_ns[order]
        start = np.r_[True, s[1:] != s[:-1]]
        first = np.flatnonzero(start)
        prev_t = np.empty_like(t)
        prev_t[1:] = t[:-1]
        prev_t[first] = self._last[s[first]]
        new_episode = (t - prev_t) > self._rearm_ns
        # latch = worst zone since the episode began: a running max that restarts at every new episode
        seg = np.cumsum(start | new_episode)
        carried = np.where(new_episode[first], 0, self._latch[s[first]])  # the previous batch's latch
        key = seg * 4 + code
        key[first] = np.maximum(key[first], seg[first] * 4 + carried)
        latch = np.maximum.accumulate(key) - seg * 4
        prev = np.empty_like(latch)
        prev[1:] = latch[:-1]
        prev[first] = carried
        prev[new_episode & ~start] = 0
        hit = np.flatnonzero(latch > prev)
        last = np.r_[first[1:] - 1, s.shape[0] - 1]
        self._latch[s[last]] = latch[last]
        self._last[s[last]] = np.maximum(np.maximum.reduceat(t, first), self._last[s[last]])  # the newest
        by_arrival = np.argsort(order[hit], kind="stable")
        hit = hit[by_arrival]
        idx = order[hit]
        return SeverityEvents(series[idx], ts_ns[idx], values[idx], latch[hit], limits[hit, latch[hit] - 1])
