"""The machine model's handling of what a shop floor does every day: products, level-dependent noise, stuck runs."""

from __future__ import annotations

import numpy as np
import pytest

from devices.plant import Plant, PlantConfig, generate_plant
from gateway.batch import MachineKey, StateEvent
from gateway.detect.machine import MachineModel, MachineModelParams
from gateway.schema import MachineState

KEY = MachineKey("s", "a", "l", "m1")
DT_NS = 10 * 10**9


def _run(values: np.ndarray, states: list[StateEvent] = (), batch: int = 60) -> dict[str, np.ndarray]:  # type: ignore[assignment]
    """Score one series in batches of ``batch`` samples, state events delivered with their batch."""
    mm = MachineModel(MachineModelParams(), grace=30)
    n = values.shape[0]
    ts = np.arange(n, dtype=np.int64) * DT_NS
    out: dict[str, list[np.ndarray]] = {}
    for a in range(0, n, batch):
        b = min(n, a + batch)
        ev = [e for e in states if ts[a] <= e.ts_ns <= ts[b - 1]]
        r = mm.run(np.zeros(b - a, np.int64), ts[a:b], values[a:b], machines=[KEY], states=ev)
        for d, s in r.scores.items():
            out.setdefault(d, []).append(s)
    return {d: np.concatenate(s) for d, s in out.items()}


def _flags(scores: dict[str, np.ndarray], lo: int = 0) -> dict[str, list[int]]:
    return {d: (np.flatnonzero(s[lo:] >= 0.5) + lo).tolist() for d, s in scores.items()}


def _products(rng: np.random.Generator, visits: int, run_len: int = 240, stop_len: int = 60) -> tuple[
        np.ndarray, list[StateEvent], list[int]]:
    """Running visits at a new product's load each (offsets up to ±5 σ of the running noise), stopped between."""
    vals: list[np.ndarray] = []
    states: list[StateEvent] = []
    starts: list[int] = []
    t = 0
    for _ in range(visits):
        offset = rng.uniform(-0.5, 0.5)  # σ 0.1: ±5 σ
        states.append(StateEvent(KEY, t * DT_NS, MachineState.RUNNING))
        starts.append(t)
        vals.append(8.0 + offset + rng.normal(0, 0.1, run_len))
        t += run_len
        states.append(StateEvent(KEY, t * DT_NS, MachineState.PLANNED_STOP))
        vals.append(0.4 + rng.normal(0, 0.01, stop_len))
        t += stop_len
    return np.round(np.concatenate(vals), 3), states, starts


def test_a_new_product_at_each_visit_is_normal_and_a_step_inside_one_is_not() -> None:
    rng = np.random.default_rng(4)
    values, states, starts = _products(rng, 30)
    quiet = _flags(_run(values, states), lo=starts[3])
    alarmed_visits = {np.searchsorted(starts, i, side="right") for v in quiet.values() for i in v}
    # a visit's offset is a mean of samples, its error σ/4 to start with: a CUSUM of k = 1 σ may still
    # cross in the odd visit (1 of 27 here); without visit offsets every one of them would
    assert len(alarmed_visits) <= 2, quiet
    step_at = starts[25] + 100
    values[step_at: step_at + 120] += 0.3  # 3 σ for 20 minutes, well after the visit's offset is learned
    flagged = _flags(_run(values, states), lo=starts[3])
    in_step = [i for i in flagged["residual_cusum"] if step_at <= i < step_at + 130]
    assert in_step, flagged
    assert in_step[0] < step_at + 10, flagged


def test_a_spike_that_lands_near_another_known_level_is_caught_at_the_next_sample() -> None:
    """No state channel; two products run at loads 7 σ apart, each its own level. An 8 σ spike while the
    lower one runs lands next to the upper level (1 σ from its mean: no spike there): the next sample,
    back in the lower level, scores it against its two neighbours. Readings that chatter between two close
    levels (here a stop quantised to two values) are no spike."""
    rng = np.random.default_rng(7)
    parts = []
    for v in range(12):  # stop, then product A (8.90) or B (9.60), alternately
        parts.append(np.where(rng.random(60) < 0.5, 0.040, 0.050))
        parts.append((8.90 if v % 2 == 0 else 9.60) + rng.normal(0, 0.1, 240))
    values = np.round(np.concatenate(parts), 3)
    quiet = _flags(_run(values), lo=600)
    assert quiet["residual_spike"] == [], quiet
    at = 10 * 300 + 60 + 120  # the middle of the 11th visit, product A
    values[at] = 8.90 + 0.8
    flagged = _flags(_run(values), lo=600)
    assert flagged["residual_spike"] == [at + 1], flagged


def test_a_new_level_learns_its_noise_from_its_own_samples() -> None:
    """A level opened by samples far from every level learns its fast noise (the difference variance) from
    its own samples, not from the jump into it (before, the jump's squared size sat in its first mean, and
    the level's noise read 60 times too large for a day)."""
    from gateway.detect import kernels as K

    rng = np.random.default_rng(3)
    values = np.round(np.concatenate([0.045 + rng.normal(0, 0.003, 300), 8.9 + rng.normal(0, 0.1, 600)]), 3)
    mm = MachineModel(MachineModelParams(), grace=30)
    mm.run(np.zeros(values.size, np.int64), np.arange(values.size, dtype=np.int64) * DT_NS, values, machines=[KEY])
    lev = mm.s_lev[0]
    running = int(np.argmin(np.abs(lev[:, K.L_MEAN] - 8.9)))
    assert 0.5 * 0.01 < lev[running, K.L_DV] < 2.0 * 0.01, lev[running]


def test_noise_is_judged_against_its_own_level() -> None:
    """Idle is ten times quieter than running; no state channel. Tripled running noise is an alarm."""
    rng = np.random.default_rng(7)
    n = 6000
    run = (np.arange(n) // 300) % 2 == 1
    sd = np.where(run, 0.1, 0.01)
    values = np.where(run, 8.0, 1.0) + rng.normal(0, 1, n) * sd
    quiet = _flags(_run(np.round(values, 3)), lo=900)
    assert not quiet["residual_variance"], quiet
    noisy = values.copy()
    seg = slice(4500, 4800)  # a running visit
    assert run[seg].all()
    noisy[seg] += 2.0 * (values[seg] - 8.0)
    flagged = _flags(_run(np.round(noisy, 3)), lo=900)
    assert flagged["residual_variance"], flagged
    assert all(4500 <= i < 4830 for i in flagged["residual_variance"]), flagged


def test_a_stuck_run_teaches_its_level_nothing() -> None:
    """After a sensor stuck for an hour the normal noise is not an alarm (the level kept its σ)."""
    rng = np.random.default_rng(11)
    values = np.round(5.0 + rng.normal(0, 0.05, 3000), 3)
    values[1500:1860] = values[1500]
    flagged = _flags(_run(values), lo=300)
    assert flagged["stuck"], flagged
    assert all(1500 <= i < 1860 for i in flagged["stuck"]), flagged
    after = {d: [i for i in v if i >= 1870] for d, v in flagged.items()}
    assert all(not v for v in after.values()), after


def test_scores_do_not_depend_on_where_batches_are_cut() -> None:
    """Four machines of one area (peers, siblings), timestamps offset per machine, cut at messages two ways.

    A message is one machine's metrics at one time (the JSON contract); 39 rows is 13 messages, so most
    batches end inside a timestamp's round of machines."""
    rng = np.random.default_rng(2)
    machines = [MachineKey("s", "a", "l", f"m{i}") for i in range(4)]
    metrics = ["power_kw", "spindle_temp_c", "vibration_mm_s"]
    n = 1500
    rows = [(t * DT_NS + m * 10**9, m * 3 + k, m, k) for t in range(n) for m in range(4) for k in range(3)]
    ts = np.array([r[0] for r in rows], np.int64)
    sid = np.array([r[1] for r in rows], np.int64)
    step = ts // DT_NS
    run = (step // 200) % 2 == 1
    k = np.array([r[3] for r in rows])
    base = np.array([[1.0, 0.0, 0.1], [8.0, 0.0, 2.0]])[run.astype(int), k]
    # temperature: a 15-minute thermal lag of the load over a hall ambient that wanders (the peers' common mode)
    lag = np.zeros(n)
    for t in range(1, n):
        lag[t] = lag[t - 1] + (1 - np.exp(-10 / 900)) * ((((t // 200) % 2) == 1) - lag[t - 1])
    ambient = 20.0 + np.cumsum(rng.normal(0, 0.02, n))
    temp = ambient[step] + 25.0 * lag[step]
    values = np.where(k == 1, temp, base) + rng.normal(0, 0.05, ts.shape[0])
    names = [machines[s // 3] for s in range(12)]
    mets = [metrics[s % 3] for s in range(12)]

    def scores(batch: int) -> np.ndarray:
        mm = MachineModel(MachineModelParams(), grace=30)
        out = []
        for a in range(0, ts.shape[0], batch):
            r = mm.run(sid[a:a + batch], ts[a:a + batch], values[a:a + batch], machines=names, metrics=mets)
            out.append(np.stack([r.zscore, *r.scores.values()]))
        return np.concatenate(out, axis=1)

    np.testing.assert_array_equal(scores(60), scores(39))


def test_threads_give_the_same_scores_and_state_bit_for_bit() -> None:
    """A plant of three areas, run on one thread and split over three (also after a restart from a snapshot),
    and its parts run one after another on one thread or on two.

    Each part of the plant (a site × area) runs on its own thread; state events arrive with their spans, a
    few of them late (older than the machine's current state); and the same without a state channel."""
    from devices.plant import PlantConfig, generate_plant

    p = generate_plant(PlantConfig(machines=12, days=1.2, interval_s=60.0, seed=3, machines_per_area=4))
    n_m, n_k, n = p.values.shape
    keys = [MachineKey(s.site, s.area, s.line, s.name) for s in p.specs]
    assert len({(k.site, k.area) for k in keys}) >= 3
    names = [keys[s // n_k] for s in range(n_m * n_k)]
    mets = [p.metrics[s % n_k] for s in range(n_m * n_k)]
    events = [(m, t, st, i % 7 == 0) for i, (m, t, st) in
              enumerate((m, t, st) for m in range(n_m) for t, st, _ in p.states[m])]

    def run(threads: int, restart_at: int = -1, with_states: bool = True, run_rows: int = 1 << 40) -> tuple[
            list[np.ndarray], dict[str, np.ndarray]]:
        mm = MachineModel(MachineModelParams(), grace=30, threads=threads)
        mm.parallel_min_rows = 1
        mm.run_rows = run_rows  # (1: a run per part)
        out = []
        for a in range(0, n, 30):
            if a == restart_at:  # a restart from a checkpoint, onto threads
                saved = mm.snapshot()
                mm = MachineModel(MachineModelParams(), grace=30, threads=threads)
                mm.parallel_min_rows = 1
                mm.run_rows = run_rows
                mm.restore(saved)
            b = min(n, a + 30)
            lo, hi = p.ts_s[a], p.ts_s[b] if b < n else np.inf
            sid, ts, x, states, rows = [], [], [], [], []
            for m in range(n_m):
                for em, t, st, again in events:  # this span's events, and every 7th one again a span late
                    if with_states and em == m and (lo <= t < hi or (again and lo - 1800.0 <= t < lo)):
                        states.append(StateEvent(keys[m], int(t * 1e9), st))
                        rows.append(len(sid))
                for j in range(a, b):
                    for k in range(n_k):
                        sid.append(m * n_k + k)
                        ts.append(int(p.ts_s[j] * 1e9))
                        x.append(p.values[m, k, j])
            r = mm.run(np.array(sid), np.array(ts, np.int64), np.array(x), machines=names, metrics=mets,
                       states=states, state_rows=rows, machine_list=keys)
            out += [r.zscore, r.expected, *r.scores.values()]
        return out, mm.snapshot().arrays

    half = 30 * (n // 60)
    for one, one_state, three, three_state in (
        (*run(1), *run(3)),
        (*run(1), *run(3, restart_at=half)),
        (*run(1, with_states=False), *run(3, restart_at=half, with_states=False)),
        (*run(1), *run(1, run_rows=1)),
        (*run(1), *run(2, run_rows=1)),
    ):
        for a, b in zip(one, three, strict=True):
            assert a.tobytes() == b.tobytes()
        assert one_state.keys() == three_state.keys()
        for name, arr in one_state.items():
            assert arr.tobytes() == three_state[name].tobytes(), name


def _first_seen_at_night(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[StateEvent]]:
    """One machine at 60 s, first seen stopped for 6 h, then shifts of runs, idles and stops: power (a base
    load when on, another when off, plus the load) and a spindle temperature 20 min behind the load."""
    t = np.arange(n)
    hour = (t / 60.0) % 24
    cycle = (t // 45) % 4  # run, run, idle, stop: 45 min each
    on = (hour >= 6) & (hour < 22)
    state = np.where(~on | (cycle == 3), 0, np.where(cycle == 2, 2, 1))  # 0 stopped, 1 running, 2 idle
    load = np.array([0.0, 0.8, 0.1])[state]
    power = np.where(state == 0, 0.4, 1.2) + 8.0 * load + rng.normal(0, 0.05, n)
    lagged = np.zeros(n)
    for i in range(1, n):
        lagged[i] = lagged[i - 1] + (1 - np.exp(-60 / 1200)) * (load[i - 1] - lagged[i - 1])
    temp = 20.0 + 35.0 * lagged + rng.normal(0, 0.1, n)
    named = {0: MachineState.PLANNED_STOP, 1: MachineState.RUNNING, 2: MachineState.IDLE}
    at = np.flatnonzero(np.r_[True, state[1:] != state[:-1]])
    return power, temp, [StateEvent(KEY, int(i) * 6 * DT_NS, named[int(state[i])]) for i in at]


def test_a_machine_first_seen_stopped_teaches_its_temperature_fit_what_stopped_means() -> None:
    """The lag fit's stopped indicator is the state channel's stopped regime, else the sibling's lowest level
    also while it is the only one: hours of a stopped machine before its first start are stopped hours, so
    on the second day the temperature's RMS error is below 2.5× the sensor's noise (σ 0.1; it was 4.3-4.8×
    when the indicator was 0 while the sibling had one level), with or without a state channel.
    """
    n = 2 * 1440
    power, temp, states = _first_seen_at_night(np.random.default_rng(5), n)
    sid = np.tile(np.array([0, 1], np.int64), n)
    ts = np.repeat(np.arange(n, dtype=np.int64) * 6 * DT_NS, 2)
    x = np.column_stack([power, temp]).reshape(-1)
    rows = [int(np.searchsorted(ts, e.ts_ns)) for e in states]
    for with_states in (True, False):
        mm = MachineModel(MachineModelParams(), grace=30)
        errors = []
        for a in range(0, 2 * n, 120):
            ev = [(e, r - a) for e, r in zip(states, rows, strict=True) if with_states and a <= r < a + 120]
            r = mm.run(sid[a:a + 120], ts[a:a + 120], x[a:a + 120], machines=[KEY, KEY],
                       metrics=["power_kw", "spindle_temp_c"], states=[e for e, _ in ev], state_rows=[q for _, q in ev])
            errors.append(x[a:a + 120] - r.expected)
        err = np.concatenate(errors)[1::2][1440:]  # the temperature, second day
        assert np.sqrt(np.mean(err**2)) < 0.25, (with_states, np.sqrt(np.mean(err**2)))  # was 0.43-0.48


def test_the_jump_cusums_first_sample_moves_its_prior_by_one_part_in_its_memory_plus_one() -> None:
    """The jump CUSUM's σ² starts from its level's noise (hp_gain × L_DV, worth the trend's memory of
    n = HP_T_S / dt samples): its first learned sample moves it 1/(n + 1) of the way, not all the way (one
    squared error, often ~0, made every sample a 5 σ jump for the next minutes). 60-second samples here: the
    trend's weight is 60 / 160, its memory 2.7 samples."""
    from gateway.detect import kernels as K

    n = 1440
    power, temp, _ = _first_seen_at_night(np.random.default_rng(5), n)
    a = min(K.HP_A_MAX, 60.0 / K.HP_T_S)
    mm = MachineModel(MachineModelParams(), grace=30)
    prior = None
    for i in range(n):
        mm.run(np.array([0, 1], np.int64), np.full(2, i * 6 * DT_NS, np.int64), np.array([power[i], temp[i]]),
               machines=[KEY, KEY], metrics=["power_kw", "spindle_temp_c"])
        st = mm.s_state[1]
        if st[K.S_HVN] == 0.0 and st[K.S_HN] > 0.0:  # the prior the next sample starts from: its noise now
            prior = float(mm.s_lev[1, int(st[K.S_LEVEL]), K.L_DV]) * K.hp_gain(a)
        elif st[K.S_HVN] == 1.0:
            assert prior is not None
            keep = (1.0 / a) / (1.0 / a + 1.0)
            assert float(st[K.S_HV]) >= prior * keep - 1e-300, (prior, float(st[K.S_HV]))
            return
    raise AssertionError("the jump CUSUM never learned")


def test_two_close_levels_merge_into_one_with_pooled_statistics() -> None:
    """Levels within z_join / 2 σ of each other are one noisy level split in two: merged, the samples' mean
    and the pooled variance (within plus between), the current visit's reading unchanged; far ones stay."""
    from gateway.detect import kernels as K

    st = np.zeros(K.N_S)
    lev = np.zeros((K.K_LEVELS, K.N_L))
    for q, (mean, n) in enumerate(((0.05, 500.0), (0.80, 300.0), (1.20, 400.0), (0.85, 100.0))):
        lev[q, K.L_MEAN], lev[q, K.L_VAR], lev[q, K.L_N], lev[q, K.L_DV] = mean, 0.05**2, n, 0.05**2
    st[K.S_NLEV], st[K.S_LEVEL], st[K.S_VISIT] = 4, 3, 0.01  # in the young 0.85 level, 0.01 above its mean
    K._merge_close(st, lev, 3, 3.0)
    assert st[K.S_NLEV] == 3
    assert st[K.S_LEVEL] == 1  # 0.80 absorbed into the current level, which (the last) moved into its slot
    merged = lev[1]
    assert merged[K.L_N] == 400.0
    assert np.isclose(merged[K.L_MEAN], (0.80 * 300 + 0.85 * 100) / 400)
    assert np.isclose(merged[K.L_VAR], 0.05**2 + 0.75 * 0.25 * 0.05**2)
    assert np.isclose(merged[K.L_MEAN] + st[K.S_VISIT], 0.86)
    assert lev[3].tolist() == [0.0] * K.N_L
    assert np.isclose(lev[2, K.L_MEAN], 1.20)
    K._merge_close(st, lev, 1, 3.0)  # 0.8125 against 0.05 and 1.20: nothing close
    assert st[K.S_NLEV] == 3


def test_after_an_alarm_the_visit_learns_its_offset_anew_so_a_drift_s_return_is_no_new_alarm() -> None:
    """A 4 σ drift over 6 h inside one long running visit (no state channel): its CUSUM alarms while it
    grows; each alarm has the visit learn its offset anew, so when the drift ends its return is one alarm,
    not one every few minutes for the rest of the visit (a running mean of the whole visit had followed the
    drift and held the return against the series)."""
    rng = np.random.default_rng(11)
    parts = []
    for _ in range(6):  # stopped, running: a day of visits to learn the levels
        parts += [0.4 + rng.normal(0, 0.01, 120), 8.0 + rng.normal(0, 0.1, 360)]
    base = sum(p.size for p in parts)
    parts += [0.4 + rng.normal(0, 0.01, 120), 8.0 + rng.normal(0, 0.1, 4000)]
    values = np.concatenate(parts)
    start, n = base + 120 + 200, 2160
    values[start: start + n] += np.linspace(0.0, 0.4, n)  # 0 -> 4 σ, then back at once
    flagged = _flags(_run(np.round(values, 3)), lo=base)["residual_cusum"]
    assert any(start < i < start + n for i in flagged), flagged  # the drift is caught
    after = [i for i in flagged if i >= start + n + 60]  # 10 min after its end, to the visit's end
    assert len(after) <= 1, after


def test_a_sibling_s_odd_far_reading_pauses_the_jump_cusum_without_restarting_its_trend() -> None:
    """Temperature 20 min behind the load, power the load at once (10-second samples). A single far power
    reading (a pending new level: the load input is not settled) right before a 3 σ temperature step: the jump
    CUSUM holds its sums for that sample but keeps its trend, so it still sees the step (restarted, its trend
    learns the step over its first samples and misses it)."""
    rng = np.random.default_rng(5)
    day = 8640
    n = 3 * day
    t = np.arange(n)
    run = (t % 1440) < 1080  # 3 h running, 1 h stopped
    load = np.zeros(n)
    for i in range(1, n):  # first-order lag, τ 20 min
        load[i] = load[i - 1] + (float(run[i]) - load[i - 1]) / 120.0
    power = 1.0 + 7.0 * run + rng.normal(0, 0.05, n)
    temp = 20.0 + 30.0 * load + rng.normal(0, 0.1, n)
    at = 2 * day + 1440 * 2 + 900  # deep in a run, the temperature settled
    assert run[at - 360: at + 120].all()
    power[at] += 1.0  # 20 σ: far from every level, one sample
    temp[at + 2: at + 362] += 0.3  # 3 σ for an hour
    mm = MachineModel(MachineModelParams(), grace=30)
    flagged: list[int] = []
    for a in range(0, n, 360):
        b = min(n, a + 360)
        sid = np.tile(np.array([0, 1]), b - a)
        ts = np.repeat(t[a:b].astype(np.int64) * DT_NS, 2)
        x = np.stack([temp[a:b], power[a:b]], axis=1).reshape(-1)
        r = mm.run(sid, ts, np.round(x, 3), machines=[KEY, KEY], metrics=["temp_c", "power_kw"])
        rows = np.flatnonzero((sid == 0) & (r.scores["residual_cusum"] >= 0.5))
        flagged += (a + rows // 2).tolist()
    assert any(at + 2 <= i < at + 62 for i in flagged), [i - at for i in flagged if i > at - 600]


def _plant_run(p: Plant, values: np.ndarray, span: int = 60, *, states: bool = False,
               mm: MachineModel | None = None, skew_ns: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The machine model's z (``"z"``), prediction (``"expected"``) and scores of every sample of a generated
    plant, each shaped like ``values``, fed ``span`` timestamps a batch; ``states``: with its state channel
    (each span's events with it); ``mm``: the model to run (default a new one); ``skew_ns[t]``: added to the
    telemetry's timestamps (not the state events'), as another clock would stamp them."""
    n_m, n_k, n = values.shape
    keys = [MachineKey(s.site, s.area, s.line, s.name) for s in p.specs]
    names = [keys[s // n_k] for s in range(n_m * n_k)]
    mets = [p.metrics[s % n_k] for s in range(n_m * n_k)]
    mm = MachineModel(MachineModelParams(), grace=30) if mm is None else mm
    out: dict[str, np.ndarray] = {}
    sid = np.tile(np.arange(n_m * n_k, dtype=np.int64), span)
    for a in range(0, n, span):
        b = min(n, a + span)
        m = b - a
        ts = np.repeat((p.ts_s[a:b] * 1e9).astype(np.int64) + (0 if skew_ns is None else skew_ns[a:b]), n_m * n_k)
        x = values[:, :, a:b].reshape(n_m * n_k, m).T.reshape(-1)
        lo, hi = p.ts_s[a], p.ts_s[b] if b < n else np.inf
        events = [StateEvent(keys[q], int(t * 1e9), st) for q in range(n_m) for t, st, _ in p.states[q]
                  if lo <= t < hi] if states else []
        r = mm.run(sid[: m * n_m * n_k], ts, x, machines=names, metrics=mets, machine_list=keys, states=events)
        for name, v in (("z", r.zscore), ("expected", r.expected), *r.scores.items()):
            out.setdefault(name, np.empty_like(values))[:, :, a:b] = v.reshape(m, n_m, n_k).transpose(1, 2, 0)
    return out


def _pair(first: np.ndarray, second: np.ndarray, metrics: tuple[str, str], dt_ns: int = DT_NS,
          chunk: int = 360) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two series of one machine sampled together every ``dt_ns`` from 0, fed ``chunk`` samples a batch: the
    z (``"z"``) and scores of each."""
    n = first.shape[0]
    sid = np.tile(np.array([0, 1], np.int64), n)
    ts = np.repeat(np.arange(n, dtype=np.int64) * dt_ns, 2)
    x = np.column_stack([first, second]).reshape(-1)
    mm = MachineModel(MachineModelParams(), grace=30)
    out: tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]] = ({}, {})
    for a in range(0, 2 * n, 2 * chunk):
        r = mm.run(sid[a:a + 2 * chunk], ts[a:a + 2 * chunk], x[a:a + 2 * chunk], machines=[KEY, KEY],
                   metrics=list(metrics))
        for name, v in (("z", r.zscore), *r.scores.items()):
            out[0].setdefault(name, []).append(v[0::2])
            out[1].setdefault(name, []).append(v[1::2])
    return ({k: np.concatenate(v) for k, v in out[0].items()}, {k: np.concatenate(v) for k, v in out[1].items()})


def test_one_machine_s_dropout_does_not_move_its_peers_scores() -> None:
    """Four machines of one hall (no state channel). One machine's temperature drops out to 0 for 20 minutes
    on the second day: the hall's common mode is what the peers agree on, so the other three machines'
    temperature z moves by less than 0.2 σ in the hour from the dropout's start (0.06 σ; it moved 0.55 σ
    when the far readings fed the common mode and widened its clip: on the 24-machine plant of
    bench/faults.py seed 1, one 20-minute dropout raised 5 false alarms on its peers)."""
    from devices.plant import PlantConfig, generate_plant

    p = generate_plant(PlantConfig(machines=4, days=1.5, interval_s=60.0, seed=2, machines_per_area=4))
    k = p.metrics.index("spindle_temp_c")
    at = int(np.searchsorted(p.ts_s, p.ts_s[0] + 86400.0 + 10 * 3600.0))
    broken = p.values.copy()
    broken[0, k, at: at + 20] = 0.0
    clean, faulty = _plant_run(p, p.values)["z"], _plant_run(p, broken)["z"]
    assert abs(faulty[0, k, at]) > 5.0  # the dropout itself is far out
    moved = np.abs(faulty[1:, k, at: at + 60] - clean[1:, k, at: at + 60]).max()
    assert moved < 0.2, moved


def test_noise_that_doubles_for_good_is_an_alarm_for_hours_then_the_level_s_normal() -> None:
    """A machine's vibration (power its sibling; products and stops) whose running noise doubles for good
    after a day (a new tool, a heavier product mix): the variance statistic alarms in the first hours, and its
    reference, which learns from every difference (clipped) over the level's day-long memory, has taken the
    new noise in by the third day. (It learned only while the short ratio was low, so it stayed at the old
    noise: 17 % of the third day's samples alarmed, and a level whose products differ in noise learned from
    its quiet ones.) A lone series keeps that rule: with no machine to say what it does, its noise change
    stays news while it lasts."""
    rng = np.random.default_rng(7)
    day = 8640
    power: list[np.ndarray] = []
    vib: list[np.ndarray] = []
    while sum(p.size for p in power) < 3 * day:
        sd = 0.05 if sum(p.size for p in power) < day else 0.1
        power += [0.4 + rng.normal(0, 0.01, 60), 8.0 + rng.normal(0, 0.05, 240)]
        vib += [0.05 + rng.normal(0, 0.005, 60), 1.0 + rng.normal(0, sd, 240)]
    n = 3 * day
    _, scores = _pair(np.round(np.concatenate(power)[:n], 3), np.round(np.concatenate(vib)[:n], 3),
                      ("power_kw", "vibration_mm_s"))
    alarmed = scores["residual_variance"] >= 0.5
    assert alarmed[day: day + 1080].mean() > 0.1  # the change is news
    assert alarmed[2 * day:].mean() < 0.01, alarmed[2 * day:].mean()
    lone = _run(np.concatenate(vib)[:n].round(3), batch=360)["residual_variance"] >= 0.5
    assert lone[2 * day:].mean() > 0.1


def _switching_machine(dt: int, days: int = 3, seed: int = 3) -> tuple[list[float], dict[str, np.ndarray]]:
    """A machine sampled every ``dt`` s whose load switches at any second (3 h running, 1 h stopped, each
    ±10 %), its temperature a first-order lag (τ 20 min) of the load in continuous time: the switch times and
    the machine model's temperature z and scores."""
    rng = np.random.default_rng(seed)
    n = days * 86400 // dt
    fine = n * dt
    switches: list[float] = []
    t = 3600.0
    while t < fine:
        switches.append(t)
        t += rng.uniform(2.8, 3.2) * 3600
        switches.append(t)
        t += rng.uniform(0.8, 1.2) * 3600
    on = np.zeros(fine)
    for a, b in zip(switches[::2], switches[1::2], strict=False):
        on[int(a): int(b)] = 1.0
    lagged = np.zeros(fine)
    c = 1 - np.exp(-1 / 1200.0)
    for i in range(1, fine):
        lagged[i] = lagged[i - 1] + c * (on[i - 1] - lagged[i - 1])
    at_s = np.arange(n) * dt
    power = 0.4 + 7.0 * on[at_s] + rng.normal(0, 0.05, n)
    temp = 22.0 + 30.0 * lagged[at_s] + rng.normal(0, 0.15, n)
    return switches, _pair(np.round(power, 3), np.round(temp, 3), ("power_kw", "temp_c"), dt * 10**9)[1]


def test_a_load_switch_between_two_samples_moves_the_temperature_s_prediction_by_half_an_interval() -> None:
    """30-second samples (see _switching_machine). The lag fit's filters take the input's old value for the
    first half of the interval and its new one for the second (where in the interval the switch fell is
    unknown: half way in expectation), so at the switches of the third day the temperature's |z| is 1.05 on
    average, its spike score at most 0.39 (taken at once the new input led the reading: 1.75 and 0.54)."""
    dt = 30
    switches, out = _switching_machine(dt)
    zz, sp = out["z"], out["residual_spike"]
    rows = [int(np.ceil(s / dt)) for s in switches if 2 * 86400 < s < 3 * 86400 - 60]
    assert len(rows) >= 10
    assert np.mean([np.abs(zz[i: i + 2]).max() for i in rows]) < 1.3
    assert max(sp[i: i + 2].max() for i in rows) < 0.45


def test_a_fault_free_plant_sampled_every_minute_raises_few_temperature_alarms() -> None:
    """Eight machines of one hall, no faults, one sample a minute (no state channel). The jump CUSUM's trend
    spans 160 s and the spike statistic's local error mean 50 s, not 16 and 5 samples: at 60 s those were
    16 and 5 minutes, both lagged the warm-ups' curve, and the second day's temperature alarmed on 36
    samples as jumps and 52 as spikes (seeds 1 and 2); now 0 and 22."""
    from devices.plant import PlantConfig, generate_plant

    alarms = {"residual_cusum": 0, "residual_spike": 0}
    for seed in (1, 2):
        p = generate_plant(PlantConfig(machines=8, days=2, interval_s=60.0, seed=seed, inject_faults=False))
        k = p.metrics.index("spindle_temp_c")
        scores = _plant_run(p, p.values)
        for name in alarms:
            alarms[name] += int((scores[name][:, k, 1440:] >= 0.5).sum())
    assert alarms["residual_cusum"] < 10, alarms
    assert alarms["residual_spike"] < 32, alarms


def _coarse_sensor_machine(days: int = 2, seed: int = 4, freeze: tuple[int, int] | None = None) -> dict[
        str, np.ndarray]:
    """A machine at 10-second samples, 3 h running and 1 h stopped, read by coarse sensors (0.01 kW, 0.01
    mm/s): stopped, the vibration (0.05 mm/s, σ 0.002) reads 0.05 for long runs and flips by a step now and
    then. ``freeze = (at, n)`` holds the vibration's reading at sample ``at`` for ``n`` samples. The
    vibration's scores."""
    rng = np.random.default_rng(seed)
    n = days * 8640
    run = (np.arange(n) % 1440) < 1080
    power = np.round(np.where(run, 8.0, 0.4) + rng.normal(0, 0.05, n), 2)
    vib = np.round(np.where(run, 1.0 + rng.normal(0, 0.05, n), 0.05 + rng.normal(0, 0.002, n)), 2)
    if freeze is not None:
        vib[freeze[0]: freeze[0] + freeze[1]] = vib[freeze[0]]
    return _pair(power, vib, ("power_kw", "vibration_mm_s"))[1]


def test_a_coarse_sensor_s_flip_by_one_step_is_no_spike() -> None:
    """No noise statistic is finer than the series' resolution (the smallest change between two readings):
    stopped, the coarse vibration sensor of _coarse_sensor_machine reads 0.05 with σ 0.001 learned, and each
    flip to 0.04 or 0.06 was a 10 σ spike (1,847 samples of the second day alarmed); now it is 1 σ."""
    scores = _coarse_sensor_machine()
    assert int((scores["residual_spike"][8640:] >= 0.5).sum()) == 0
    assert int((scores["residual_cusum"][8640:] >= 0.5).sum()) == 0


def test_a_coarse_sensor_s_long_runs_are_no_stuck_sensor_and_a_frozen_reading_still_is() -> None:
    """Stopped, the coarse vibration sensor of _coarse_sensor_machine repeats its reading for minutes. Every
    run shorter than an alarm teaches the level's repeat rate (only each run's first stuck_min samples did:
    the rate read as ~0.9, and 107 samples of the second day alarmed as stuck); a reading frozen while the
    machine runs (its noise 5 steps) is still a stuck sensor within minutes."""
    scores = _coarse_sensor_machine()
    assert int((scores["stuck"][8640:] >= 0.5).sum()) == 0
    at = 8640 + 1440 * 2 + 300  # running
    flagged = np.flatnonzero(_coarse_sensor_machine(freeze=(at, 300))["stuck"] >= 0.5).tolist()
    assert any(at < i < at + 60 for i in flagged), [i - at for i in flagged if i > at - 100][:5]


def test_a_sensor_stuck_in_a_young_level_does_not_teach_itself_that_repeats_are_normal() -> None:
    """A machine's first minutes (its levels young, learning at weights 1/n): the power reading freezes
    from the 10th sample for 30 samples. A young level learns its repeat rate from runs' first stuck_min
    samples only, so the run is a stuck sensor after 10 samples (learned from the whole run, the repeat
    rate grew with it and the run never reached its own alarm length)."""
    rng = np.random.default_rng(2)
    n = 60
    power = np.round(8.0 + rng.normal(0, 0.05, n), 3)
    power[10:40] = power[10]
    vib = np.round(1.0 + rng.normal(0, 0.05, n), 3)
    stuck = _pair(power, vib, ("power_kw", "vibration_mm_s"))[0]["stuck"]
    assert (stuck[19:40] >= 0.5).any(), stuck[10:40].round(2)


def test_a_first_start_does_not_teach_the_lag_fit_its_runaway_errors() -> None:
    """A plant first seen stopped, with a state channel: at each machine's first start its temperature's lag fit
    has never seen its load move, and its prediction runs away for a minute (tens of °C). Its error variance E2
    (the floor of z's σ) learned those errors clipped at 3 σ of the transient-widened σ (itself from E2 and the
    transient's share), so E2 stayed several times the fit's error for the next day (seed 2, m001 of the
    24-machine plant: σ 2.04 °C against an rms error of 0.39): a step read as a fraction of its size. E2 now
    clips at 3 times its own σ, like the model's other learned spreads."""
    import gateway.detect.kernels as K
    from devices.plant import PlantConfig, generate_plant

    p = generate_plant(PlantConfig(machines=8, days=1.6, seed=2, machines_per_area=8))
    n_k = p.values.shape[1]
    mm = MachineModel(MachineModelParams(), grace=30)
    expected = _plant_run(p, p.values, states=True, mm=mm)["expected"]
    k = p.metrics.index("spindle_temp_c")
    ratios = []
    for m in range(p.values.shape[0]):
        j = m * n_k + k
        use = int(mm.s_state[j, K.S_USE]) - 1
        assert use >= 0  # the lag model is in use
        err = p.values[m, k, 8640:] - expected[m, k, 8640:]  # its errors on the second day
        ratios.append(float(np.sqrt(mm.s_lag[j, use, K.J_E2] / np.mean(err**2))))
    assert max(ratios) < 3.0, np.round(ratios, 2)


def test_a_lag_modelled_sensor_s_drift_is_summed_and_a_fault_of_its_input_is_not_put_on_it() -> None:
    """Sixteen machines of the generated plant (seed 2, with a state channel): m014's temperature sensor drifts
    to 4 σ over 6 hours, m013's power sensor steps by 2 σ for an hour. A lag-modelled series' CUSUM used to be
    the jump one only, which follows a drift by design: the drift was missed. Its plain CUSUM now sums the
    error that every fit of it agrees on (against the power and against the vibration): the drift is found,
    and m013's temperature, whose prediction from the faulty power reading is off by the step's share for the
    hour, raises nothing (summed on the fit in use alone, it alarmed there); the power's own CUSUM finds the
    step."""
    from devices.plant import PlantConfig, generate_plant

    p = generate_plant(PlantConfig(machines=16, days=3.0, seed=2))
    cusum = _plant_run(p, p.values, states=True)["residual_cusum"]
    names = [s.name for s in p.specs]
    kt, kp = p.metrics.index("spindle_temp_c"), p.metrics.index("power_kw")

    def window(machine: str, kind: str, extra_s: float = 0.0) -> slice:
        f = next(f for f in p.faults if f.machine == machine)
        assert f.kind == kind
        return slice(int(np.searchsorted(p.ts_s, f.start_ts)), int(np.searchsorted(p.ts_s, f.end_ts + extra_s)))

    drift = window("m014", "drift")
    assert (cusum[names.index("m014"), kt, drift] >= 0.5).any()
    step = window("m013", "step")
    assert (cusum[names.index("m013"), kp, step] >= 0.5).any()
    after = window("m013", "step", extra_s=3600.0)
    assert cusum[names.index("m013"), kt, after].max() < 0.5, cusum[names.index("m013"), kt, after].max()


def test_a_memory_spans_at_least_100_samples_when_readings_are_sparse() -> None:
    """``level_memory_s`` (a day) is 8,640 samples at 10 s but would be 24 at one reading an hour, too few for a
    level's σ and shorter than the noise ratio's 30-sample EWMA it anchors: the memory then spans 100 samples."""
    import math

    from gateway.detect import kernels as K

    row = np.zeros(K.N_D)
    for dt, samples in ((10.0, 8640.0), (300.0, 288.0), (3600.0, 100.0), (86400.0, 100.0)):
        K._decays(row, dt, 86400.0, 86400.0, 900.0, 1.0, 5.0, 14 * 86400.0)
        assert math.isclose(row[K.D_LEVEL], -math.expm1(-1.0 / samples)), dt  # learning weight of one sample
        assert math.isclose(row[K.D_FIT], math.exp(-1.0 / samples)), dt  # the lag fits' forgetting


def test_the_cusum_decision_interval_follows_the_sampling_interval() -> None:
    """A fixed ``h`` in samples alarms twice as often a day at twice the rate: ``h`` is the one whose in-control
    run length is ``cusum_arl_days`` per side at each interval (Siegmund's approximation), checked here against
    simulated CUSUMs of independent N(0, 1); below ``CUSUM_BLOCK_S`` the CUSUMs sum one block of that length at
    a time, and ``h`` is the block's; with ``arl_s`` 0 it is ``cusum_h`` at every interval."""
    import math

    from gateway.detect import kernels as K

    row = np.zeros(K.N_D)
    hs = []
    for dt in (1.0, 5.0, 10.0, 60.0, 3600.0):
        K._decays(row, dt, 86400.0, 86400.0, 900.0, 1.0, 5.0, 14 * 86400.0)
        hs.append(row[K.D_H])
        b = row[K.D_H] + K.SIEGMUND_B
        step = dt if dt >= K.CUSUM_BLOCK_S * 2 / 3 else K.CUSUM_BLOCK_S
        assert math.isclose((math.exp(2 * b) - 2 * b - 1) / 2, 14 * 86400.0 / step, rel_tol=1e-9), dt
    assert hs[0] == hs[1] == hs[2] > hs[3] > hs[4], hs
    K._decays(row, 9.5, 86400.0, 86400.0, 900.0, 1.0, 5.0, 14 * 86400.0)  # a sample of its own: its interval's h
    assert row[K.D_H] > hs[2], (row[K.D_H], hs[2])
    assert 4.9 < hs[2] < 5.1, hs
    K._decays(row, 5.0, 86400.0, 86400.0, 900.0, 1.0, 5.0, 0.0)
    assert row[K.D_H] == 5.0
    # the approximation against simulation: a one-sided CUSUM (k = 1) of N(0, 1) restarting at h = cusum_h(1, 300)
    h = K.cusum_h(1.0, 300.0)
    z = np.random.default_rng(7).standard_normal(600_000).tolist()
    s, crossings = 0.0, 0
    for v in z:
        s = max(0.0, s + v - 1.0)
        if s >= h:
            crossings += 1
            s = 0.0
    assert 255 < len(z) / crossings < 345, len(z) / crossings  # (simulated: 278)


@pytest.mark.parametrize("skew_s", [-0.4, 10.4])
def test_a_state_change_near_a_sample_of_another_clock_takes_the_regime_that_explains_it(skew_s: float) -> None:
    """The state channel and the telemetry come from different clocks: with the telemetry's 0.4 s behind, the
    first reading of a new regime is stamped 0.4 s before its state event; 10.4 s ahead, the last reading of
    the old regime is stamped 0.4 s after it. Scored against the regime its timestamp falls in, every start
    and stop was an 8-20 σ spike (and on the bench's plant ~27 false alarms per machine-day); a sample within
    one interval of a change takes the regime whose level explains it better (a regime not seen yet, if
    it is far from the other's)."""
    p = generate_plant(PlantConfig(machines=4, days=2.0, seed=3, inject_faults=False))
    n = p.values.shape[2]
    on_grid = _plant_run(p, p.values, states=True)
    skewed = _plant_run(p, p.values, states=True, skew_ns=np.full(n, int(skew_s * 1e9), np.int64))
    kp = p.metrics.index("power_kw")
    day2 = slice(8640, None)
    changes = sum(1 for st in p.states for t, _, _ in st if t >= p.ts_s[8640])
    assert changes > 20
    assert (on_grid["residual_spike"][:, kp, day2] >= 0.5).sum() <= 2
    assert (skewed["residual_spike"][:, kp, day2] >= 0.5).sum() <= 2, skew_s


def test_a_cusum_sums_one_block_of_ten_seconds_at_a_time() -> None:
    """``_block``: samples 10 s apart or more (or 2/3 of that: within half a sample) are each a block of their own,
    their value itself; closer ones are averaged, weighted by the time each covers, until the block spans 10 s
    to within half a sample; a sample with no interval (the first) opens no block."""
    from gateway.detect import kernels as K

    assert K.CUSUM_BLOCK_S == 10.0
    st = np.zeros(K.N_S)
    assert K._block(st, K.S_BTZ, 2.5, 10.0) == (True, 2.5)
    assert K._block(st, K.S_BTZ, 2.5, 7.0) == (True, 2.5)
    assert K._block(st, K.S_BTZ, -1.0, 0.0) == (True, -1.0)
    got = [K._block(st, K.S_BTZ, float(v), 1.0) for v in range(1, 21)]
    assert [d for d, _ in got] == [i % 10 == 9 for i in range(20)]
    assert [v for d, v in got if d] == [5.5, 15.5]
    got = [K._block(st, K.S_BTZ, v, 5.0) for v in (1.0, 3.0, 1.0)]
    assert got == [(False, 0.0), (True, 2.0), (False, 0.0)]
    assert st[K.S_BTZ] == 5.0
    assert st[K.S_BZ] == 5.0


def test_one_sample_a_second_raises_no_more_alarms_than_one_every_ten() -> None:
    """Eight machines of one hall, no state channel, sampled every 10 s and every second: the CUSUMs sum 10-s
    blocks, so a second's samples add no sums of the fits' slow misfit. The second day's temperature CUSUM
    alarmed in 28 ten-minute buckets at 1 s when they summed every sample (the 10-s plant: 1); now in no more
    than at 10 s. A 2 σ step of a running machine's power for an hour is still found within minutes at 1 s.
    The spike statistic's local error mean starts anew with each visit of a level: a stopped vibration spiked
    16-30 s after each stop at 1 s (12 buckets; the visit's 16 samples left 72 % of the running level's errors
    in the 50-s mean), now in no more buckets than at 10 s."""
    from devices.plant import POWER_SD_KW, RUN, PlantConfig, generate_plant

    buckets = {}
    for dt in (10.0, 1.0):
        p = generate_plant(PlantConfig(machines=8, days=2, interval_s=dt, seed=1, inject_faults=False))
        per_day, per_bucket = int(86400 / dt), int(600 / dt)
        temp, power, vib = (p.metrics.index(m) for m in ("spindle_temp_c", "power_kw", "vibration_mm_s"))
        values = p.values.copy()
        at = per_day + int(11 * 3600 / dt)  # 11:00 on the second day, machine m004 running
        values[3, power, at: at + int(3600 / dt)] += 2.0 * POWER_SD_KW[RUN]
        out = _plant_run(p, values, span=per_bucket)
        scores = out["residual_cusum"][:, :, per_day:] >= 0.5
        hit = np.flatnonzero(scores[3, power, at - per_day: at - per_day + int(1800 / dt)])
        assert hit.size, dt
        assert hit[0] * dt < 600, (dt, hit[:3])
        spikes = out["residual_spike"][:, vib, per_day:] >= 0.5
        buckets[dt] = (int(scores[:, temp].reshape(8, -1, per_bucket).any(-1).sum()),
                       int(spikes.reshape(8, -1, per_bucket).any(-1).sum()))
    assert buckets[1.0][0] <= buckets[10.0][0], buckets
    assert buckets[1.0][1] <= buckets[10.0][1], buckets
