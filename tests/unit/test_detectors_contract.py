"""One generic contract, run over every detector class and the fused engine."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.batch import F64, I64
from gateway.checkpoint import State, read_checkpoint, write_checkpoint
from gateway.detect import (
    AnomalyEngine,
    CusumDetector,
    DetectionConfig,
    EwmaDetector,
    FlatlineDetector,
    RobustDetector,
    SpikeDetector,
    WesternElectricDetector,
)
from gateway.detect.config import CLASSIC_DETECTORS
from gateway.detect.machine import MachineModel, MachineModelParams

GRACE = 20
Scorer = Callable[[I64, F64], F64]
METRICS = [f"m{i}" for i in range(16)]


class Run:
    """A detector under test: scores a batch; saves and restores its state (the checkpoint protocol)."""

    def __init__(self, obj: Any, score: Callable[[Any, I64, F64], F64]) -> None:
        self.obj = obj
        self.score = score

    def __call__(self, s: I64, v: F64) -> F64:
        return self.score(self.obj, s, v)

    def snapshot(self) -> State:
        st: State = self.obj.snapshot()
        return st

    def restore(self, st: State) -> None:
        if isinstance(self.obj, AnomalyEngine):
            self.obj.restore(st, METRICS)
        else:
            self.obj.restore(st)


@dataclass
class Case:
    name: str
    make: Callable[[], Run]
    anomaly: Callable[[F64, int], None]  # injects an obvious anomaly at index i (in place)


def _det(cls: type, **kw: Any) -> Callable[[], Run]:
    def make() -> Run:
        return Run(cls(grace_samples=GRACE, **kw), lambda det, s, v: det.score_learn(s, v))
    return make


def _model(name: str) -> Callable[[], Run]:
    def make() -> Run:
        mm = MachineModel(MachineModelParams(), grace=GRACE)
        return Run(mm, lambda mm, s, v: mm.run(s, np.zeros(s.shape[0], np.int64), v).scores[name])
    return make


def _classic_engine() -> Run:
    eng = AnomalyEngine(DetectionConfig(grace_samples=GRACE, detectors=CLASSIC_DETECTORS))
    return Run(eng, lambda eng, s, v: eng.score(s, np.zeros(s.shape[0], np.int64), v, METRICS))


def _engine() -> Run:
    eng = AnomalyEngine(DetectionConfig(grace_samples=GRACE))
    return Run(eng, lambda eng, s, v: eng.score(s, np.zeros(s.shape[0], np.int64), v, METRICS))


def _spike(x: F64, i: int) -> None:
    x[i] += 40.0


def _shift(x: F64, i: int) -> None:
    x[i:] += 4.0


def _stuck(x: F64, i: int) -> None:
    x[i - 40 : i + 1] = x[i - 40]


def _noisier(x: F64, i: int) -> None:
    # the noise 5x for one variance memory (30 samples): the variance statistic is an EWMA over that memory
    x[i - 30 : i + 1] += 4.9 * np.random.default_rng(7).standard_normal(31)


def _shift_before(x: F64, i: int) -> None:
    x[i - 1 :] += 5.0  # below z_join (6 σ): a shift inside the level, two samples of CUSUM


CASES = [
    Case("ewma", _det(EwmaDetector), _spike),
    Case("cusum", _det(CusumDetector), _shift),
    Case("western_electric", _det(WesternElectricDetector), _spike),
    Case("robust", _det(RobustDetector, window=16), _spike),
    Case("flatline", _det(FlatlineDetector, n=20), _stuck),
    Case("spike", _det(SpikeDetector), _spike),
    Case("residual_spike", _model("residual_spike"), _spike),
    Case("residual_cusum", _model("residual_cusum"), _shift_before),
    Case("residual_variance", _model("residual_variance"), _noisier),
    Case("stuck", _model("stuck"), _stuck),
    Case("fused_classic", _classic_engine, _spike),
    Case("fused", _engine, _spike),
]


def _data(n_series: int = 4, per: int = 250, seed: int = 0) -> tuple[I64, F64]:
    """Interleaved series, each with its own level and noise; arrival order shuffled within blocks."""
    rng = np.random.default_rng(seed)
    series = np.tile(np.arange(n_series, dtype=np.int64), per)
    # shuffle inside blocks of one round so per-series order is kept but series interleave irregularly
    for a in range(0, series.shape[0], n_series):
        rng.shuffle(series[a : a + n_series])
    level = rng.uniform(-50, 50, n_series)
    noise = rng.uniform(0.5, 3.0, n_series)
    values = level[series] + noise[series] * rng.standard_normal(series.shape[0])
    return series, values


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    c: Case = request.param
    return c


def test_shapes_and_range(case: Case) -> None:
    series, values = _data()
    s = case.make()(series, values)
    assert s.shape == values.shape
    assert s.dtype == np.float64
    assert np.all(np.isfinite(s))
    assert np.all((s >= 0.0) & (s <= 1.0))


def test_warm_up_returns_zero(case: Case) -> None:
    series, values = _data()
    values[:: 7] += 100.0  # anomalies everywhere, including during the grace period
    s = case.make()(series, values)
    for sid in range(4):
        assert np.all(s[series == sid][:GRACE] == 0.0)


def test_deterministic(case: Case) -> None:
    series, values = _data()
    np.testing.assert_array_equal(case.make()(series, values), case.make()(series, values))


def test_state_isolated_between_series(case: Case) -> None:
    series, values = _data()
    base = case.make()(series, values)
    other = values.copy()
    other[series == 1] = np.random.default_rng(9).normal(1e3, 50.0, int((series == 1).sum()))
    changed = case.make()(series, other)
    keep = series != 1
    np.testing.assert_array_equal(base[keep], changed[keep])


def test_batch_size_invariance(case: Case) -> None:
    series, values = _data(n_series=4, per=250)
    assert series.shape[0] == 1000
    whole = case.make()(series, values)
    scorer = case.make()
    parts = np.concatenate([scorer(series[a : a + 100], values[a : a + 100]) for a in range(0, 1000, 100)])
    np.testing.assert_array_equal(whole, parts)
    ragged = case.make()
    cuts = [0, 1, 7, 130, 131, 500, 999, 1000]
    pieces = np.concatenate([ragged(series[a:b], values[a:b]) for a, b in itertools.pairwise(cuts)])
    np.testing.assert_array_equal(whole, pieces)


def test_obvious_anomaly_scores_high(case: Case) -> None:
    rng = np.random.default_rng(3)
    n = 300
    series = np.zeros(n, np.int64)
    values = 10.0 + rng.standard_normal(n)
    case.anomaly(values, 200)
    s = case.make()(series, values)
    assert s[200] >= 0.5
    assert s[200] >= np.quantile(s[GRACE:200], 0.99)


@pytest.mark.parametrize("cut", [1, 333, 999])
def test_checkpoint_round_trip_continues_as_if_never_stopped(case: Case, cut: int, tmp_path: Path) -> None:
    """Save (through a checkpoint file), load into a fresh detector, continue: the same scores and state."""
    series, values = _data(n_series=4, per=250)
    never = case.make()
    whole = never(series, values)
    first = case.make()
    head = first(series[:cut], values[:cut])
    path = tmp_path / "checkpoint.npz"
    write_checkpoint(path, first.snapshot(), fingerprint="f", wal_id=1)
    second = case.make()
    second.restore(read_checkpoint(path, fingerprint="f").state)
    tail = second(series[cut:], values[cut:])
    np.testing.assert_array_equal(whole, np.concatenate([head, tail]))
    a, b = never.snapshot(), second.snapshot()
    assert a.meta == b.meta
    assert a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def test_restore_refuses_state_of_another_shape(case: Case) -> None:
    series, values = _data()
    run = case.make()
    run(series, values)
    st = run.snapshot()
    key = max((k for k, v in st.arrays.items() if v.ndim >= 1 and v.shape[0] > 1), key=lambda k: st.arrays[k].ndim)
    st.arrays[key] = st.arrays[key][..., :1] if st.arrays[key].ndim > 1 else st.arrays[key].astype(np.int8)
    with pytest.raises(ValueError, match=r"shape|match|not"):
        case.make().restore(st)


def test_machine_model_regimes_do_not_depend_on_batch_boundaries() -> None:
    """A state message holds from its own time: where the batch cuts between it and the samples is moot."""
    from gateway.batch import MachineKey, StateEvent
    from gateway.schema import MachineState

    rng = np.random.default_rng(5)
    m = MachineKey("s", "a", "l", "m1")
    n = 1200
    t = np.arange(n, dtype=np.int64) * 10**10
    running = (np.arange(n) // 150) % 2 == 1
    power = np.where(running, 8.0, 1.0) + rng.normal(0, 0.05, n)
    # a state message arrives 30 samples ahead of the samples it is about (a PLC ahead of the sensor)
    changes = [int(i) for i in np.flatnonzero(np.diff(running.astype(int))) + 1]
    states = {max(0, i - 30): StateEvent(m, int(t[i]), MachineState.RUNNING if running[i] else MachineState.IDLE)
              for i in changes}

    def run(cuts: list[int]) -> F64:
        mm = MachineModel(MachineModelParams(), grace=GRACE)
        out = []
        for a, b in itertools.pairwise([0, *cuts, n]):
            evs = [e for i, e in states.items() if a <= i < b]
            res = mm.run(np.zeros(b - a, np.int64), t[a:b], power[a:b], machines=[m], metrics=["power_kw"],
                         states=evs)
            out.append(res.scores["residual_spike"])
        return np.concatenate(out)

    whole = run([])
    np.testing.assert_array_equal(whole, run(list(range(7, n, 7))))
    np.testing.assert_array_equal(whole, run([5, 130, 131, 600, 1100]))


def test_state_change_hold_off_does_not_depend_on_batch_boundaries() -> None:
    """A batch spanning hours keeps every change its own events need (they were trimmed too early)."""
    from gateway.batch import MachineKey, StateEvent
    from gateway.detect.context import StateChangeFilter
    from gateway.detect.fusion import AnomalyEvents
    from gateway.schema import MachineState

    m = MachineKey("s", "a", "l", "m1")
    h = 3600 * 10**9
    changes = [StateEvent(m, k * h // 2, (MachineState.RUNNING, MachineState.IDLE)[k % 2]) for k in range(12)]
    ts = np.array([k * h // 2 + 10**9 for k in range(12)] + [k * h // 2 + 120 * 10**9 for k in range(12)])
    ev = AnomalyEvents(np.zeros(24, np.int64), ts, np.zeros(24, np.int64), *(np.ones(24) for _ in range(4)))

    def kept(cuts: list[int]) -> list[int]:
        f = StateChangeFilter(holdoff_s=60)
        out: list[int] = []
        for a, b in itertools.pairwise([0, *cuts, 12]):
            f.observe(changes[a:b])
            sel = (ts >= a * h // 2) & (ts < b * h // 2)
            part = AnomalyEvents(*(x[sel] for x in (ev.series, ev.ts_ns, ev.code, ev.score, ev.value, ev.expected,
                                                      ev.zscore)))
            out += f.keep(part, [m]).ts_ns.tolist()
        return sorted(out)

    whole = kept([])
    assert whole == sorted([int(ts[0]), *ts[12:].tolist()])  # 1 s after a change: held off (the first state is none)
    assert kept([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]) == whole
