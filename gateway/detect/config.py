"""The ``[detect]`` configuration section: which detectors run on which metrics, and their parameters.

Every model forbids unknown keys, so a typo is an error that names the key. Rules map metric-name globs
(:func:`fnmatch.fnmatchcase`) to detector sets and parameter overrides; every matching rule applies, in
order, later rules overriding earlier ones. Only the keys a rule actually sets override.

>>> cfg = DetectionConfig.model_validate(
...     {"rules": [{"metrics": ["*_count"], "detectors": ["flatline"]},
...                {"metrics": ["vib*"], "ewma": {"alpha": 0.1}}]})
>>> cfg.resolve("part_count").detectors
('flatline',)
>>> p = cfg.resolve("vib_rms")
>>> p.params["ewma"].alpha, p.params["ewma"].z_alarm
(0.1, 4.0)
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.detect.likelihood import LikelihoodParams
from gateway.detect.machine import MODEL_DETECTORS, MachineModelParams
from gateway.detect.seasonal import SeasonalParams

__all__ = [
    "CLASSIC_DETECTORS",
    "DEFAULT_DETECTORS",
    "DETECTOR_NAMES",
    "CusumParams",
    "DetectRule",
    "DetectionConfig",
    "DetectorName",
    "EwmaParams",
    "FlatlineParams",
    "FusionParams",
    "ResolvedProfile",
    "RobustParams",
    "SpikeParams",
    "WesternElectricParams",
]

DetectorName = Literal[
    "ewma", "cusum", "western_electric", "robust", "flatline", "spike",
    "residual_spike", "residual_cusum", "residual_variance", "stuck", "seasonal",
]
# Event codes index this tuple: new detectors go at the end (stored codes keep their meaning).
DETECTOR_NAMES: tuple[str, ...] = (
    "ewma", "cusum", "western_electric", "robust", "flatline", "spike", *MODEL_DETECTORS, "seasonal",
)
CLASSIC_DETECTORS: tuple[DetectorName, ...] = ("ewma", "cusum", "western_electric", "robust", "flatline", "spike")
DEFAULT_DETECTORS: tuple[DetectorName, ...] = (
    "residual_spike", "residual_cusum", "residual_variance", "stuck", "seasonal",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EwmaParams(_Section):
    """EWMA mean/variance z-score (``ewma``)."""

    alpha: float = Field(0.02, gt=0, le=1, description="EWMA smoothing factor (≈ 2/(span+1)).")
    z_alarm: float = Field(4.0, gt=0, description="|z| that maps to score 0.5 (the alarm point).")


class CusumParams(_Section):
    """Tabular two-sided CUSUM on the standardised stream (``cusum``)."""

    alpha: float = Field(
        0.005, ge=0, le=1,
        description="EWMA factor of the in-control mean/σ estimate; 0 freezes them after the grace period.",
    )
    k: float = Field(0.5, ge=0, description="Allowance (slack) in σ units.")
    h: float = Field(5.0, gt=0, description="Decision interval in σ units; S = h maps to score 0.5.")


class WesternElectricParams(_Section):
    """Western Electric rules 1–4 on the EWMA-standardised stream (``western_electric``)."""

    alpha: float = Field(0.02, gt=0, le=1, description="EWMA factor of the centre line and σ.")
    rules: tuple[int, ...] = Field((1, 2, 3, 4), description="Which rules (1..4) are active.")
    rule_scores: tuple[float, float, float, float] = Field(
        (1.0, 0.9, 0.8, 0.7), description="Score given when rule 1, 2, 3, 4 fires (highest fired wins)."
    )

    @field_validator("rules")
    @classmethod
    def _known(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [r for r in v if r not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"unknown rule(s) {bad}; allowed 1, 2, 3, 4")
        return v


class RobustParams(_Section):
    """Streaming Huber-type centre/scale, outliers clipped at 3 scales when learning (``robust``)."""

    window: int = Field(32, ge=2, description="Memory in samples: EWMA factor 1/window (running mean while younger).")
    n_sigmas: float = Field(4.0, gt=0, description="|x - centre| / scale that maps to score 0.5.")


class FlatlineParams(_Section):
    """Stuck sensor: ``n`` identical readings in a row (``flatline``)."""

    n: int = Field(30, ge=2, description="Run length (identical readings) at which the score reaches 0.5.")
    tolerance: float = Field(0.0, ge=0, description="Readings within this absolute distance count as same.")


class SpikeParams(_Section):
    """Spike / rate of change: z-score of the first difference against its EWMA RMS (``spike``)."""

    alpha: float = Field(0.02, gt=0, le=1, description="EWMA factor of the mean squared step.")
    z_alarm: float = Field(6.0, gt=0, description="|step| / RMS step that maps to score 0.5.")


class FusionParams(_Section):
    """How per-detector scores combine into the ``fused`` score, and how repeats are suppressed."""

    method: Literal["max", "noisy_or", "mean"] = Field(
        "max", description="max: max(w·s); noisy_or: 1 - Π(1 - w·s); mean: Σ w·s / Σ w."
    )
    weights: dict[DetectorName, float] = Field(
        default_factory=lambda: dict[DetectorName, float](
            {"ewma": 0.3, "cusum": 0.3, "western_electric": 0.3, "robust": 0.3, "flatline": 0.3}
        ),
        description="Per-detector weight in [0, 1]; missing detectors weigh 1. By default only the spike "
        "(onset) score can reach the threshold; the level/state detectors stay high for the whole of a "
        "persistent condition, saturate at 1 on quantised data, and raise their own events anyway.",
    )
    holdoff: float = Field(
        70.0, ge=0,
        description="Half-life in samples of the peak a fused score must beat to be reported; 0 = off. "
        "After a peak P the fused score is reported as 0 until it exceeds P·2**(-k/holdoff), so one "
        "anomaly yields one alarm, not a train of them.",
    )

    @field_validator("weights")
    @classmethod
    def _unit(cls, v: dict[DetectorName, float]) -> dict[DetectorName, float]:
        for name, w in v.items():
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"weights.{name} = {w} is outside [0, 1]")
        return v


class DetectRule(_Section):
    """Per-metric overrides; a rule applies to metrics whose name matches any glob in ``metrics``."""

    metrics: tuple[str, ...] = Field(min_length=1, description="Metric-name globs (fnmatch, case-sensitive).")
    enabled: bool | None = Field(None, description="Turn detection on/off for these metrics.")
    detectors: tuple[DetectorName, ...] | None = Field(None, description="Replace the detector set.")
    ewma: EwmaParams | None = None
    cusum: CusumParams | None = None
    western_electric: WesternElectricParams | None = None
    robust: RobustParams | None = None
    flatline: FlatlineParams | None = None
    spike: SpikeParams | None = None
    fusion: FusionParams | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _one_glob(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v


@dataclass(frozen=True)
class ResolvedProfile:
    """The effective detection settings of one metric."""

    enabled: bool
    detectors: tuple[str, ...]
    params: dict[str, _Section]
    fusion: FusionParams

    @property
    def key(self) -> str:
        """A string equal for equal profiles (detector instances are shared per key)."""
        parts = [f"{k}={v.model_dump_json()}" for k, v in sorted(self.params.items())]
        return f"{self.enabled}|{self.detectors}|{'|'.join(parts)}|{self.fusion.model_dump_json()}"


_PARAM_KEYS = ("ewma", "cusum", "western_electric", "robust", "flatline", "spike")


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's ``--cpus``, a
    systemd ``CPUQuota=``), which the affinity does not show. Quotas are read from the process's cgroup
    and its ancestors (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     root = Path(d)
    ...     (root / "gw.slice").mkdir()
    ...     _ = (root / "gw.slice" / "cpu.max").write_text("150000 100000\\n")
    ...     _ = (root / "self").write_text("0::/gw.slice\\n")
    ...     usable_cpus(root, root / "self") == min(2, len(os.sched_getaffinity(0)))
    True
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return cpus
    files: tuple[str, ...]
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1
            base = next((cgroup_root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (cgroup_root / n).is_dir()),
                        cgroup_root / "cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = Path(path.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):  # the process's own cgroup, then each ancestor up to the root
            quota = _quota(base.joinpath(*parts[:depth]), files)
            if quota is not None:
                cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _quota(d: Path, files: tuple[str, ...]) -> float | None:
    """CPUs of the quota set in cgroup directory ``d`` (None: none set, or unreadable)."""
    try:
        if len(files) == 1:
            limit, period = (d / files[0]).read_text().split()[:2]
        else:
            limit, period = ((d / f).read_text().strip() for f in files)
        if limit in ("max", "-1") or float(period) <= 0:
            return None
        return float(limit) / float(period)
    except (OSError, ValueError):
        return None


class DetectionConfig(_Section):
    """The ``[detect]`` section.

    Scores are in [0, 1]; each detector maps its classic alarm point (|z| = z_alarm, S = h, n identical
    readings, any Western Electric rule) to 0.5, so the default ``threshold`` of 0.5 flags exactly there.

    >>> DetectionConfig().threshold, DetectionConfig().detectors[:2]
    (0.5, ('residual_spike', 'residual_cusum'))
    """

    enabled: bool = Field(True, description="Run anomaly detection at all.")
    threshold: float = Field(0.5, gt=0, le=1, description="Score at or above which a sample is flagged.")
    grace_samples: int = Field(30, ge=0, description="Per-series warm-up: scores are 0 for the first N.")
    events: Literal["fused", "onset", "all"] = Field(
        "fused",
        description=(
            "'fused': an event where the fused score rises over the threshold, with the rules that fired"
            " there, plus the onsets of the always_report detectors; 'onset': an event where any detector's"
            " flag turns on for a series; 'all': every sample any detector flags."
        ),
    )
    state_change_holdoff_s: float = Field(
        120.0,
        ge=0,
        description=(
            "Events of a machine within this many seconds after its state changed (RUNNING, IDLE, DOWN, ...)"
            " are not reported: starting and stopping moves every signal. Scoring and learning go on;"
            " always_report detectors are still reported. 0 turns this off."
        ),
    )
    always_report: tuple[DetectorName, ...] = Field(
        ("flatline", "stuck"),
        description="Detectors whose own onsets are always events (a stuck sensor is a fault by itself).",
    )
    learn_flagged: bool = Field(
        True, description="Learn from flagged samples too (False keeps them out of the baselines)."
    )
    detectors: tuple[DetectorName, ...] = Field(
        DEFAULT_DETECTORS,
        description="Detectors run on every metric unless a rule replaces the set. The default is the machine"
        " model's four (gateway.detect.machine) and, for lone series (no sibling metric), their time-of-day"
        " profile (seasonal, gateway.detect.seasonal; it needs the machine model's detectors in the set); the"
        " classic per-series detectors stay available by name.",
    )
    threads: int = Field(
        0, ge=0, le=64,
        description="Threads the machine model's step runs on: a batch is split by site × area (machines of"
        " different areas share no state), so scores are the same bit for bit with any number. 0 (auto): the"
        " CPUs this process may use minus the two the gateway keeps busy (event loop, compute), at least 1"
        " (1 on 2 cores, 2 on a 4-core Raspberry Pi 4/5).",
    )

    def model_threads(self) -> int:
        """``threads``, with 0 resolved for this machine.

        >>> DetectionConfig(threads=3).model_threads(), DetectionConfig().model_threads() >= 1
        (3, True)
        """
        if self.threads:
            return self.threads
        return max(1, usable_cpus() - 2)

    machine: MachineModelParams = MachineModelParams()
    likelihood: LikelihoodParams = LikelihoodParams()
    seasonal: SeasonalParams = SeasonalParams()
    ewma: EwmaParams = EwmaParams()
    cusum: CusumParams = CusumParams()
    western_electric: WesternElectricParams = WesternElectricParams()
    robust: RobustParams = RobustParams()
    flatline: FlatlineParams = FlatlineParams()
    spike: SpikeParams = SpikeParams()
    fusion: FusionParams = FusionParams()
    rules: tuple[DetectRule, ...] = Field((), description="Per-metric overrides, applied in order.")

    def resolve(self, metric: str) -> ResolvedProfile:
        """Return the effective settings for ``metric`` after applying every matching rule in order."""
        enabled = self.enabled
        detectors: tuple[str, ...] = tuple(self.detectors)
        params: dict[str, _Section] = {k: getattr(self, k) for k in _PARAM_KEYS}
        fusion = self.fusion
        for rule in self.rules:
            if not any(fnmatch.fnmatchcase(metric, g) for g in rule.metrics):
                continue
            if rule.enabled is not None:
                enabled = rule.enabled
            if rule.detectors is not None:
                detectors = tuple(rule.detectors)
            for key in _PARAM_KEYS:
                over: _Section | None = getattr(rule, key)
                if over is not None:
                    params[key] = params[key].model_copy(update=over.model_dump(exclude_unset=True))
            if rule.fusion is not None:
                fusion = fusion.model_copy(update=rule.fusion.model_dump(exclude_unset=True))
        return ResolvedProfile(enabled and bool(detectors), detectors, params, fusion)
