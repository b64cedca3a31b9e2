"""The ahead-of-time kernels (gateway/detect/aot.py, gateway/detect/jit.py): the same results as numba's JIT,
bit for bit, without numba in the process; a stale build is never used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.detect import jit

ROOT = Path(__file__).resolve().parents[2]


def _current() -> bool:
    try:
        from gateway.detect.aot import built_digest

        return built_digest() == jit.source_digest()
    except Exception:  # not built, or built for another Python
        return False


needs_aot = pytest.mark.skipif(not _current(), reason="the AOT extension is not built for the current sources "
                               "(run: python -m gateway.detect.aot, or deploy/dev/setup.sh)")


def _python(code: str, *args: str, jit_mode: bool = False, path: Path = ROOT) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FACTORY_GATEWAY_JIT"}
    env["PYTHONPATH"] = str(path)
    if jit_mode:
        env["FACTORY_GATEWAY_JIT"] = "1"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=path, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    return out.stdout


# A plant of 12 machines in two areas (power with stop/idle/run levels, vibration, a temperature lagging the
# power, state events on half of them, a spike, a step and a stuck run), cut into batches; then the machine
# model's statistics calibrated (every series) and lone daily-cycle series profiled. Saves every output and
# every state array.
_RUN = r"""
import sys
import numpy as np
from gateway.batch import MachineKey, StateEvent
from gateway.detect import jit
from gateway.detect.base import BatchLayout
from gateway.detect.likelihood import LikelihoodParams, ScoreLikelihood
from gateway.detect.machine import MachineModel, MachineModelParams
from gateway.detect.seasonal import SeasonalParams, SeasonalProfile
from gateway.schema import MachineState

rng = np.random.default_rng(7)
n_m, steps, dt = 12, 3000, 10 * 10**9
keys = [MachineKey("s", f"a{m % 2}", "l", f"m{m}") for m in range(n_m)]
machines = [k for k in keys for _ in range(3)]
metrics = ["power_kw", "vibration_mm_s", "temp_c"] * n_m
t = np.arange(steps)
level = np.stack([np.select([(t + 97 * m) % 900 < 200, (t + 97 * m) % 900 < 300], [0.2, 2.0], 8.0 + m % 3)
                  for m in range(n_m)])
temp = np.empty_like(level)
temp[:, 0] = 20.0
for i in range(1, steps):
    temp[:, i] = temp[:, i - 1] + (20.0 + level[:, i] - temp[:, i - 1]) * (1.0 - np.exp(-10.0 / 1200.0))
ambient = 0.5 * np.sin(2 * np.pi * t / 8640.0)
x = np.empty((n_m, 3, steps))
x[:, 0] = level + rng.normal(0, 0.05, level.shape)
x[:, 1] = 0.3 * level + rng.normal(0, 0.02, level.shape)
x[:, 2] = temp + ambient + rng.normal(0, 0.05, level.shape)
x[3, 0, 2000] += 5.0
x[5, 2, 2200:] += 1.0
x[7, 1, 2500:2600] = x[7, 1, 2500]
series = np.tile(np.arange(3 * n_m, dtype=np.int64), steps)
ts = np.repeat(t.astype(np.int64) * dt, 3 * n_m)
values = np.ascontiguousarray(x.transpose(2, 0, 1)).ravel()
states = []
for m in range(0, n_m, 2):
    for i in range(0, steps, 50):
        lv = level[m, i]
        st = MachineState.DOWN if lv < 1 else MachineState.IDLE if lv < 5 else MachineState.RUNNING
        states.append((i * 3 * n_m, StateEvent(keys[m], int(i * dt), st)))
mm = MachineModel(MachineModelParams(), grace=30)
cuts = list(range(0, series.shape[0], 5000)) + [series.shape[0]]
res = {}
for a, b in zip(cuts[:-1], cuts[1:]):
    ev = [(r - a, e) for r, e in states if a <= r < b]
    r = mm.run(series[a:b], ts[a:b], values[a:b], machines=machines, metrics=metrics, machine_list=keys,
               states=[e for _, e in ev], state_rows=[p for p, _ in ev])
    for k, v in [*r.scores.items(), ("expected", r.expected), ("z", r.zscore), ("lone", r.lone)]:
        res.setdefault(k, []).append(v)
out = {f"model_{k}": np.concatenate(v) for k, v in res.items()}
out.update({f"model_state_{k}": v for k, v in mm.snapshot().arrays.items()})

lay = BatchLayout.build(series)
raw = np.stack([lay.pack(out[f"model_{d}"]) for d in ("residual_spike", "residual_cusum", "residual_variance",
                                                       "stuck")], axis=1)
raw[::97, 2] = np.nan
cal = ScoreLikelihood(LikelihoodParams(), grace=30, channels=4)
use = np.arange(lay.rows.shape[0]) % 5 != 0
out["calib_out"] = cal.run(lay, raw, use, np.arange(raw.shape[0]) % 11 != 0)
out["calib_state"] = cal.state

n_s, per = 4, 12 * 96
s_series = np.tile(np.arange(n_s, dtype=np.int64), per)
step = np.repeat(np.arange(per), n_s)
s_t = (step * 900).astype(np.float64)
s_x = 10.0 * s_series + 3.0 * np.sin(2 * np.pi * step / 96) + rng.normal(0, 0.1, s_series.shape[0])
s_x[(10 * 96 + 30) * n_s:][:n_s] += 2.5
sp = SeasonalProfile(SeasonalParams(), grace=30)
s_lay = BatchLayout.build(s_series)
outs = [sp.run(s_lay, s_lay.pack(s_x), s_lay.pack(s_t), np.array([True, True, False, True]))]
outs.append(sp.run(s_lay, s_lay.pack(s_x + 0.1), s_lay.pack(s_t + per * 900.0), np.ones(n_s, np.bool_)))
out["seasonal_out"] = np.concatenate(outs)
out["seasonal_buckets"], out["seasonal_head"] = sp.buckets, sp.head

if jit.MODE == "jit":  # every signature the call sites compiled is the one the AOT build exports
    from gateway.detect import kernels, likelihood, seasonal
    for mod, fn in ((kernels, kernels.step_batch), (likelihood, likelihood._calibrate),
                    (seasonal, seasonal._seasonal)):
        spec = jit.ENTRY_POINTS[f"{mod.__name__}.{fn.__name__}"]
        for sig in fn.signatures:
            got = [(str(np.dtype(a.dtype.name)), a.ndim, a.layout) for a in sig]
            assert got == [(str(np.dtype(d)), nd, "C") for d, nd, _ in spec], (fn.__name__, sig)
np.savez(sys.argv[1], **out)
print(jit.MODE, "numba" in sys.modules)
"""


@needs_aot
def test_aot_kernels_give_the_jit_results_bit_for_bit(tmp_path: Path) -> None:
    assert _python(_RUN, str(tmp_path / "aot.npz")).split() == ["aot", "False"]
    assert _python(_RUN, str(tmp_path / "jit.npz"), jit_mode=True).split() == ["jit", "True"]
    with np.load(tmp_path / "aot.npz") as a, np.load(tmp_path / "jit.npz") as j:
        assert sorted(a.files) == sorted(j.files)
        assert {"model_residual_cusum", "model_state_s_lag", "calib_state", "seasonal_buckets"} <= set(a.files)
        for k in a.files:
            assert a[k].dtype == j[k].dtype, k
            assert a[k].shape == j[k].shape, k
            assert a[k].tobytes() == j[k].tobytes(), k
        # the inputs exercise the kernels: alarms raised, lag fits and calibration states learned
        assert (a["model_residual_spike"] >= 0.5).any()
        assert (a["model_stuck"] >= 0.5).any()
        assert np.count_nonzero(a["model_state_s_lag"]) > 0
        assert np.count_nonzero(a["calib_state"]) > 0
        assert (a["seasonal_out"] >= 0.5).any()


_LEAN = r"""
import sys, threading, time
import numpy as np
import gateway.detect
from gateway.detect import jit
assert jit.MODE == "aot" and "numba" not in sys.modules
from gateway.detect.machine import MachineModel, MachineModelParams, warm_up
warm_up()
import gateway.pipeline
assert "numba" not in sys.modules and "llvmlite" not in sys.modules, sorted(m for m in sys.modules if "numba" in m)

# a call with an argument the kernel was not compiled for is refused (a compiled function checks nothing)
from gateway.detect import seasonal
good = [np.zeros(1, np.int64)] * 3 + [np.zeros(1), np.zeros(1), np.zeros((1, 24, 3)), np.zeros((1, 3)),
        np.array([0.0, 86400.0, 24.0, 28.0, 5.0, 8.0]), np.zeros(1), np.ones(1, np.bool_)]
seasonal._seasonal(*good)
frozen = np.zeros(1)
frozen.flags.writeable = False
for i, bad in ((3, np.zeros(4)[::2]), (0, np.zeros(1)), (5, np.zeros((1, 24))), (8, frozen), (9, np.ones(1))):
    try:
        seasonal._seasonal(*good[:i], bad, *good[i + 1:])
    except TypeError as e:
        assert f"argument {i} " in str(e), e
    else:
        raise AssertionError(f"argument {i}: {bad.dtype} {bad.shape} accepted")
seasonal._seasonal(*good[:3], frozen, *good[4:])  # a read-only input is fine

# the GIL is released while the step runs (nogil=True): another thread goes on meanwhile
from gateway.detect import kernels
n = 600_000
rng = np.random.default_rng(0)
mm = MachineModel(MachineModelParams(), grace=30)
mm.run_rows = n  # (one step call, not one per run of parts)
sid, ts, x = rng.integers(0, 2000, n), np.arange(n, dtype=np.int64) * 10**8, rng.normal(0, 1, n)
took = []
compiled = kernels.step_batch


def timed(*args):
    t0 = time.perf_counter()
    compiled(*args)
    took.append(time.perf_counter() - t0)


kernels.step_batch = timed
th = threading.Thread(target=mm.run, args=(sid, ts, x))
last = time.perf_counter()
gap = 0.0
th.start()
while th.is_alive():
    now = time.perf_counter()
    gap, last = max(gap, now - last), now
th.join()
assert len(took) == 1 and gap < took[0] / 4, (gap, took)
print("ok")
"""


@needs_aot
def test_aot_mode_never_imports_numba_and_checks_arguments() -> None:
    assert _python(_LEAN).split() == ["ok"]


_MODE = r"""
import sys
from gateway.detect import jit, kernels
print(jit.MODE, "numba" in sys.modules, type(kernels.step_batch).__name__)
"""


@needs_aot
def test_an_edited_kernel_falls_back_to_jit_until_rebuilt(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    assert _python(_MODE, path=copy).split() == ["aot", "False", "function"]  # the copy itself is current
    with (copy / "gateway" / "detect" / "seasonal.py").open("a") as f:
        f.write("# an edit\n")
    assert _python(_MODE, path=copy).split() == ["jit", "True", "CPUDispatcher"]
    assert _python(_MODE, jit_mode=True).split() == ["jit", "True", "CPUDispatcher"]  # and forced


def test_without_the_extension_the_kernels_are_jit_compiled(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("__pycache__", "_kernels_aot*"))
    assert _python(_MODE, path=copy).split() == ["jit", "True", "CPUDispatcher"]
