"""OEE engine: the Vorne worked example, shift calendars, counters, windows, idle close and replay."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from gateway.batch import CountEvent, MachineKey, StateEvent
from gateway.oee import MachineConfig, OeeConfig, OeeEngine, OeeRecord, ShiftConfig, parse_duration_ns
from gateway.schema import MachineState

S = 1_000_000_000
MIN = 60 * S
H = 60 * MIN
R, D, I, SU, P = (  # noqa: E741 - one-letter state names keep the timelines readable
    MachineState.RUNNING,
    MachineState.DOWN,
    MachineState.IDLE,
    MachineState.SETUP,
    MachineState.PLANNED_STOP,
)
PRESS = MachineKey("plant1", "assembly", "line1", "press1")
REPLAY = Path(__file__).resolve().parent.parent / "data" / "replay" / "vorne_shift.jsonl"


def at(text: str) -> int:
    """``"2025-11-20T06:00"`` (UTC) → ns."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * S


def engine(
    windows: Sequence[str] = (),
    shifts: Sequence[tuple[str, str, str]] = (),
    tz: str = "UTC",
    ideal: float = 1.0,
    idle_close_s: float = 120.0,
) -> OeeEngine:
    cfg = OeeConfig(
        windows=list(windows),
        shifts=[ShiftConfig(name=n, start=s, end=e) for n, s, e in shifts],
        timezone=tz,
        idle_close_s=idle_close_s,
    )
    return OeeEngine(cfg, {"press1": MachineConfig(ideal_cycle_s=ideal)})


def states(*pairs: tuple[int, MachineState], machine: MachineKey = PRESS) -> list[StateEvent]:
    return [StateEvent(machine, t, s) for t, s in pairs]


def by_window(records: Iterable[OeeRecord], window: str) -> list[OeeRecord]:
    return sorted((r for r in records if r.window == window), key=lambda r: r.start_ns)


# --- the worked example (oee.com / Vorne) -------------------------------------------------------------

DAY = "2025-11-20"
VORNE_TIMELINE = [  # 480 min shift: 60 min planned stops (15 + 30 + 15), 47 min down (20 + 27)
    ("05:50", "PLANNED_STOP"),
    ("06:00", "RUNNING"),
    ("08:00", "PLANNED_STOP"),
    ("08:15", "RUNNING"),
    ("09:30", "DOWN"),
    ("09:50", "RUNNING"),
    ("10:00", "PLANNED_STOP"),
    ("10:30", "RUNNING"),
    ("11:40", "DOWN"),
    ("12:07", "RUNNING"),
    ("12:15", "PLANNED_STOP"),
    ("12:30", "RUNNING"),
    ("14:01", "PLANNED_STOP"),  # after the shift's end: closes the shift window by event time
]
VORNE_TOTAL, VORNE_REJECTS = 19_271, 423
BASE_TOTAL, BASE_GOOD = 52_000, 51_000  # the device's counters did not start at this shift


def _sec(hhmm: str) -> int:
    return at(f"{DAY}T{hhmm}") // S


def vorne_messages() -> list[dict[str, Any]]:
    """The worked example as replay lines: state changes plus a cumulative count every 30 minutes."""
    changes = [(_sec(hhmm), state) for hhmm, state in VORNE_TIMELINE]

    def run_until(t: int) -> int:
        run = 0
        for (t0, s), (t1, _) in itertools.pairwise(changes):
            if s == "RUNNING":
                run += max(0, min(t1, t) - t0)
        return run

    shift_start, shift_end = _sec("06:00"), _sec("14:00")
    run_total = run_until(shift_end) - run_until(shift_start)
    lines: list[tuple[int, int, dict[str, Any]]] = [
        (t, 1, {"topic": "state", "payload": {"ts": t, "state": s}}) for t, s in changes
    ]
    lines.append(
        (_sec("05:55"), 0, {"topic": "count", "payload": {"ts": _sec("05:55"), "total": BASE_TOTAL, "good": BASE_GOOD}})
    )
    for t in range(shift_start + 1800, shift_end + 1, 1800):
        frac = (run_until(t) - run_until(shift_start)) / run_total
        total = round(VORNE_TOTAL * frac)
        rejects = round(VORNE_REJECTS * frac)
        payload = {"ts": t, "total": BASE_TOTAL + total, "good": BASE_GOOD + total - rejects}
        lines.append((t, 0, {"topic": "count", "payload": payload}))
    lines.sort(key=lambda x: (x[0], x[1]))
    root = "factory/plant1/assembly/line1/press1/"
    return [{"topic": root + msg["topic"], "payload": msg["payload"]} for _, _, msg in lines]


def parse_replay(lines: Iterable[dict[str, Any]]) -> tuple[list[StateEvent], list[CountEvent]]:
    st: list[StateEvent] = []
    ct: list[CountEvent] = []
    for msg in lines:
        _, site, area, line, machine, channel = msg["topic"].split("/")
        key = MachineKey(site, area, line, machine)
        p = msg["payload"]
        ts = round(p["ts"] * S)
        if channel == "state":
            st.append(StateEvent(key, ts, MachineState(p["state"])))
        else:
            ct.append(CountEvent(key, ts, p["total"], p["good"]))
    return st, ct


def test_replay_file_matches_the_generator() -> None:
    on_disk = [json.loads(line) for line in REPLAY.read_text().splitlines() if line.strip()]
    assert on_disk == vorne_messages()


def test_vorne_worked_example_from_the_replay_file() -> None:
    st, ct = parse_replay(json.loads(line) for line in REPLAY.read_text().splitlines())
    eng = engine(shifts=[("early", "06:00", "14:00")])
    records = eng.update(st, ct, now_wall_ns=0)
    (rec,) = records
    assert (rec.window, rec.shift, rec.machine) == ("shift", "early", PRESS)
    assert (rec.start_ns, rec.end_ns) == (at(f"{DAY}T06:00"), at(f"{DAY}T14:00"))
    assert rec.planned_s == 420 * 60
    assert rec.run_s == 373 * 60
    assert rec.down_s == 47 * 60
    assert (rec.total_count, rec.good_count) == (19_271, 19_271 - 423)
    assert rec.availability == pytest.approx(0.8881, abs=5e-4)
    assert rec.performance == pytest.approx(0.8611, abs=5e-4)
    assert rec.quality == pytest.approx(0.9780, abs=5e-4)
    assert rec.oee == pytest.approx(0.7479, abs=5e-4)
    assert rec.oee == pytest.approx(rec.availability * rec.performance * rec.quality)  # type: ignore[operator]
    assert rec.mtbf_s == pytest.approx(373 * 60 / 2)
    assert rec.mttr_s == pytest.approx(47 * 60 / 2)
    assert rec.throughput_per_h == pytest.approx(19_271 / 7)
    assert eng.late_events == 0
    assert eng.flush() == []  # nothing open: the 14:01 message opened no window (none configured)


def test_vorne_with_tumbling_windows_sums_up() -> None:
    st, ct = parse_replay(vorne_messages())
    eng = engine(windows=["1m", "1h"], shifts=[("early", "06:00", "14:00")])
    records = eng.update(st, ct, now_wall_ns=0) + eng.flush()
    hours = [r for r in by_window(records, "1h") if at(f"{DAY}T06:00") <= r.start_ns < at(f"{DAY}T14:00")]
    minutes = [r for r in by_window(records, "1m") if at(f"{DAY}T06:00") <= r.start_ns < at(f"{DAY}T14:00")]
    assert len(hours) == 8
    assert sum(1 for r in minutes if r.planned_s > 0) == 420  # PLANNED_STOP-only minutes emit only if parts came
    for part in (hours, minutes):
        assert sum(r.run_s for r in part) == 373 * 60
        assert sum(r.planned_s for r in part) == 420 * 60
        assert sum(r.total_count for r in part) == 19_271
        assert sum(r.good_count for r in part) == 19_271 - 423


# --- shift calendar -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("night_of", "hours"),
    [
        ("2025-11-20", 8),  # CET all night
        ("2025-03-29", 7),  # spring forward at 02:00 local
        ("2025-10-25", 9),  # fall back at 03:00 local
    ],
)
def test_night_shift_crosses_midnight_in_berlin(night_of: str, hours: int) -> None:
    eng = engine(shifts=[("night", "22:00", "06:00")], tz="Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    start = int(datetime.fromisoformat(f"{night_of}T22:00").replace(tzinfo=berlin).timestamp()) * S
    end = start + hours * H
    out = eng.update(states((start - 2 * H, R)), [], now_wall_ns=0)
    out += eng.update(states((start + H, D), (start + H + 30 * MIN, R), (end + MIN, P)), [], now_wall_ns=0)
    (rec,) = out
    assert (rec.shift, rec.start_ns, rec.end_ns) == ("night", start, end)
    assert rec.planned_s == hours * 3600
    assert rec.run_s == hours * 3600 - 1800
    assert rec.mttr_s == 1800


def test_time_between_shifts_belongs_to_no_window() -> None:
    eng = engine(shifts=[("early", "06:00", "14:00"), ("late", "14:00", "22:00")])
    d0 = at("2025-11-20T00:00")
    out = eng.update(
        states((d0 + 4 * H, R), (d0 + 23 * H, D), (d0 + 30 * H + 24 * MIN, R), (d0 + 38 * H + 1, P)), [], now_wall_ns=0
    )
    assert [(r.shift, r.run_s, r.down_s) for r in out] == [
        ("early", 8 * 3600, 0),
        ("late", 8 * 3600, 0),
        ("early", 8 * 3600 - 24 * 60, 24 * 60),  # the DOWN from 23:00 reaches into the next early shift ...
    ]
    assert out[2].mtbf_s is None  # ... but its failure started between shifts, so it counts in neither


# --- counters -----------------------------------------------------------------------------------------


def test_first_count_is_baseline_and_decrease_is_restart() -> None:
    eng = engine(windows=["1h"])
    t0 = at("2025-11-20T10:00")
    counts = [
        CountEvent(PRESS, t0 + 1 * MIN, 1_000, 990),  # baseline: production before it is unknown
        CountEvent(PRESS, t0 + 10 * MIN, 1_050, 1_030),  # +50 / +40
        CountEvent(PRESS, t0 + 20 * MIN, 20, 19),  # restart: +20 / +19
        CountEvent(PRESS, t0 + 30 * MIN, 50, 45),  # +30 / +26
    ]
    out = eng.update(states((t0, R)), counts, now_wall_ns=0)
    out += eng.update(states((t0 + H + 1, R)), [], now_wall_ns=0)
    (rec,) = out
    assert (rec.total_count, rec.good_count) == (100, 85)
    assert rec.performance == pytest.approx(100 / 3600)


def test_count_at_window_end_belongs_to_that_window() -> None:
    eng = engine(windows=["1m"])
    t0 = at("2025-11-20T10:00")
    out = eng.update(
        states((t0, R)),
        [CountEvent(PRESS, t0, 0, 0), CountEvent(PRESS, t0 + MIN, 60, 60), CountEvent(PRESS, t0 + 2 * MIN, 90, 90)],
        now_wall_ns=0,
    )
    out += eng.flush()
    assert [(r.start_ns - t0, r.total_count) for r in out] == [(0, 60), (MIN, 30)]


def test_counts_before_the_first_state_have_no_known_time() -> None:
    eng = engine(windows=["1m"])
    t0 = at("2025-11-20T10:00")
    out = eng.update([], [CountEvent(PRESS, t0 + 1, 0, 0), CountEvent(PRESS, t0 + 30 * S, 30, 29)], now_wall_ns=0)
    out += eng.update(states((t0 + 90 * S, R)), [], now_wall_ns=0)
    (rec,) = out
    assert (rec.planned_s, rec.total_count, rec.good_count) == (0, 30, 29)
    assert rec.quality == pytest.approx(29 / 30)
    assert rec.availability is rec.performance is rec.oee is rec.throughput_per_h is None


# --- tumbling windows ---------------------------------------------------------------------------------


def test_tumbling_windows_are_aligned_to_the_epoch() -> None:
    eng = engine(windows=["1m", "1h", "15m"])
    t0 = at("2025-11-20T10:59:30")
    out = eng.update(states((t0, R), (t0 + 45 * S, I), (t0 + 200 * S, SU)), [], now_wall_ns=0)
    out += eng.flush()
    for rec in out:
        assert rec.start_ns % parse_duration_ns(rec.window) == 0
    minutes = by_window(out, "1m")
    assert [r.start_ns - at("2025-11-20T10:59") for r in minutes] == [0, MIN, 2 * MIN, 3 * MIN]
    assert [r.planned_s for r in minutes] == [30, 60, 60, 50]  # the last one is partial (flush) ...
    assert minutes[-1].end_ns == t0 + 200 * S  # ... and says so by its end
    assert [r.run_s for r in minutes] == [30, 15, 0, 0]
    assert [r.availability for r in minutes] == [1.0, 0.25, 0.0, 0.0]
    hours = by_window(out, "1h")
    assert [(r.start_ns, r.planned_s) for r in hours] == [(at("2025-11-20T10:00"), 30), (at("2025-11-20T11:00"), 170)]
    assert [r.start_ns for r in by_window(out, "15m")] == [at("2025-11-20T10:45"), at("2025-11-20T11:00")]


def test_a_window_closes_only_when_event_time_passes_its_end() -> None:
    eng = engine(windows=["1m"])
    t0 = at("2025-11-20T10:00")
    assert eng.update(states((t0, R), (t0 + MIN, D)), [], now_wall_ns=0) == []
    (rec,) = eng.update([], [CountEvent(PRESS, t0 + MIN + 1, 5, 5)], now_wall_ns=0)
    assert (rec.start_ns, rec.end_ns, rec.run_s) == (t0, t0 + MIN, 60)


def test_planned_stop_only_windows_emit_nothing_unless_parts_were_made() -> None:
    eng = engine(windows=["1m"])
    t0 = at("2025-11-20T10:00")
    assert eng.update(states((t0, P), (t0 + MIN + 1, P)), [], now_wall_ns=0) == []
    eng.update([], [CountEvent(PRESS, t0 + MIN + 2, 0, 0), CountEvent(PRESS, t0 + MIN + 3, 5, 5)], now_wall_ns=0)
    (rec,) = eng.flush()
    assert (rec.planned_s, rec.total_count) == (0, 5)
    assert rec.availability is rec.performance is rec.oee is rec.mtbf_s is rec.mttr_s is None


def test_a_machine_that_ran_but_made_nothing_has_oee_zero() -> None:
    eng = engine(windows=["1m"])
    t0 = at("2025-11-20T10:00")
    (rec,) = eng.update(states((t0, R), (t0 + MIN + 1, R)), [], now_wall_ns=0)
    assert (rec.availability, rec.performance, rec.quality, rec.oee) == (1.0, 0.0, None, 0.0)


def test_failures_mtbf_mttr() -> None:
    eng = engine(windows=["1h"])
    t0 = at("2025-11-20T10:00")
    events = states(
        (t0, D),  # first message DOWN: failed at an unknown time, not counted
        (t0 + 5 * MIN, R),
        (t0 + 20 * MIN, D),
        (t0 + 25 * MIN, D),  # repeated DOWN: same failure
        (t0 + 30 * MIN, R),
        (t0 + 40 * MIN, D),
        (t0 + 40 * MIN, R),  # zero-length DOWN: no failure
        (t0 + 50 * MIN, D),
        (t0 + 56 * MIN, I),
        (t0 + 3 * H + 1, R),
    )
    out = eng.update(events, [], now_wall_ns=0)
    first, second, third = by_window(out, "1h")
    assert first.down_s == 21 * 60
    assert first.run_s == 35 * 60
    assert first.mtbf_s == 35 * 60 / 2
    assert first.mttr_s == 21 * 60 / 2
    assert second.mtbf_s is second.mttr_s is None  # IDLE all hour: no failure
    assert third.planned_s == 3600


def test_ideal_cycle_from_machine_config_or_default() -> None:
    cfg = OeeConfig(windows=["1m"], default_ideal_cycle_s=2.0)
    eng = OeeEngine(cfg, {"press1": MachineConfig(ideal_cycle_s=0.5), "lathe": MachineConfig(vibration_class="I")})
    t0 = at("2025-11-20T10:00")
    out: list[OeeRecord] = []
    for name in ("press1", "lathe", "unknown"):
        key = MachineKey("plant1", "assembly", "line1", name)
        out += eng.update(
            states((t0, R), (t0 + MIN + 1, R), machine=key),
            [CountEvent(key, t0, 0, 0), CountEvent(key, t0 + MIN, 30, 30)],
            now_wall_ns=0,
        )
    assert {r.machine.machine: r.performance for r in out} == {"press1": 0.25, "lathe": 1.0, "unknown": 1.0}


# --- idle close, late events, replay ------------------------------------------------------------------


def test_idle_close_extends_the_state_to_the_window_end() -> None:
    eng = engine(windows=["1m", "1h"], idle_close_s=30)
    t0 = at("2025-11-20T10:00:20")
    wall = 5_000 * S
    assert eng.update(states((t0, R)), [], now_wall_ns=wall) == []
    # the 1m window ends 40 s (event time) after the last message; close 30 s after that
    assert eng.update([], [], now_wall_ns=wall + 69 * S) == []
    (rec,) = eng.update([], [], now_wall_ns=wall + 70 * S)
    assert (rec.window, rec.start_ns, rec.end_ns, rec.run_s) == ("1m", t0 - 20 * S, t0 + 40 * S, 40)
    assert eng.update([], [], now_wall_ns=wall + 70 * S) == []  # once only
    # a silent machine keeps its state: every minute closes idle_close_s after its end
    (rec,) = eng.update([], [], now_wall_ns=wall + 130 * S)
    assert (rec.start_ns, rec.run_s) == (t0 + 40 * S, 60)
    # a message after the silence continues from there; the count belongs to an idle-closed minute
    out = eng.update(states((t0 + 3 * MIN, D)), [CountEvent(PRESS, t0 + 10 * S, 1, 1)], now_wall_ns=wall + 200 * S)
    assert [(r.start_ns - t0 + 20 * S, r.run_s) for r in out] == [(2 * MIN, 60)]
    assert eng.late_events == 1
    hour_ends = wall + 200 * S + (at("2025-11-20T11:00") - (t0 + 3 * MIN)) + 30 * S
    out = eng.update([], [], now_wall_ns=hour_ends - 1)
    assert {r.window for r in out} == {"1m"}
    assert len(out) == 56
    hour, last_minute = sorted(eng.update([], [], now_wall_ns=hour_ends), key=lambda r: r.window)
    assert (last_minute.window, last_minute.start_ns) == ("1m", at("2025-11-20T10:59"))
    assert (hour.window, hour.run_s, hour.down_s, hour.mtbf_s) == ("1h", 180, 3400, 180)


def test_late_events_are_counted_and_dropped_from_closed_windows() -> None:
    eng = engine(windows=["1m", "1h"])
    t0 = at("2025-11-20T10:00")
    out = eng.update(
        states((t0, R)), [CountEvent(PRESS, t0, 0, 0), CountEvent(PRESS, t0 + 90 * S, 10, 10)], now_wall_ns=0
    )
    assert [r.total_count for r in out] == [0]
    out = eng.update(states((t0 + 30 * S, D)), [CountEvent(PRESS, t0 + 50 * S, 12, 11)], now_wall_ns=0)
    assert out == []
    assert eng.late_events == 1  # the DOWN: newer than the last state, older than the last count
    assert eng.repeated_events == 1  # the count older than the last count: a repeat, dropped whole
    out = eng.update(states((t0 + 2 * H, R)), [], now_wall_ns=0)
    first_hour = by_window(out, "1h")[0]
    assert (first_hour.total_count, first_hour.good_count) == (10, 10)
    assert first_hour.run_s == 90  # the late DOWN applies from the last accounted time on


def test_repeated_messages_count_once() -> None:
    """A broker redelivery (same messages again, after newer ones) moves neither state nor counters."""
    t0 = at("2025-11-20T10:00")
    msgs = (states((t0, R), (t0 + 20 * S, D), (t0 + 40 * S, R)),
            [CountEvent(PRESS, t0, 0, 0), CountEvent(PRESS, t0 + 30 * S, 30, 29),
             CountEvent(PRESS, t0 + 50 * S, 50, 48)])
    once, twice = engine(windows=["1m"]), engine(windows=["1m"])
    once.update(*msgs, now_wall_ns=0)
    twice.update(*msgs, now_wall_ns=0)
    assert twice.update(msgs[0][1:], msgs[1][1:], now_wall_ns=0) == []  # the last two of each, again
    assert twice.repeated_events == 4
    end = states((t0 + 61 * S, R))
    assert once.update(end, [], now_wall_ns=0) == twice.update(end, [], now_wall_ns=0)


def _random_stream(seed: int, n_machines: int = 4) -> list[StateEvent | CountEvent]:
    rng = random.Random(seed)
    stream: list[StateEvent | CountEvent] = []
    for i in range(n_machines):
        key = MachineKey("plant1", "area", "line", f"m{i}")
        t = at("2025-11-20T21:00") + rng.randrange(0, 600) * S
        total = good = rng.randrange(0, 1000)
        for _ in range(150):
            t += rng.choice([0, 1, 7, 30, 61, 300, 3600]) * S + rng.randrange(0, S)
            if rng.random() < 0.4:
                stream.append(StateEvent(key, t, rng.choice(list(MachineState))))
            else:
                if rng.random() < 0.05:
                    total = good = 0
                made = rng.randrange(0, 100)
                total += made
                good += made - rng.randrange(0, made + 1) // 10
                stream.append(CountEvent(key, t, total, good))
    rng.shuffle(stream)
    stream.sort(key=lambda e: (e.machine.machine, e.ts_ns))  # per-machine event-time order
    return stream


def _feed(eng: OeeEngine, batch: Sequence[StateEvent | CountEvent]) -> list[OeeRecord]:
    st = [e for e in batch if isinstance(e, StateEvent)]
    ct = [e for e in batch if isinstance(e, CountEvent)]
    return eng.update(st, ct, now_wall_ns=0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_is_deterministic_whatever_the_batching(seed: int) -> None:
    stream = _random_stream(seed)
    make = lambda: engine(  # noqa: E731
        windows=["1m", "1h"], shifts=[("night", "22:00", "06:00"), ("day", "08:00", "16:00")], tz="America/Chicago"
    )
    whole = make()
    expected = sorted(_feed(whole, stream) + whole.flush(), key=repr)
    assert len(expected) > 100
    rng = random.Random(seed)
    for _ in range(3):
        eng = make()
        got: list[OeeRecord] = []
        interleaved = sorted(stream, key=lambda e: e.ts_ns)  # machines interleaved, as live
        i = 0
        while i < len(interleaved):
            n = rng.randrange(1, 50)
            got += _feed(eng, interleaved[i : i + n])
            i += n
        got += eng.flush()
        assert sorted(got, key=repr) == expected
        assert eng.late_events == whole.late_events == 0


def test_flush_emits_partial_windows_and_forgets() -> None:
    eng = engine(windows=["1h"], shifts=[("early", "06:00", "14:00")])
    t0 = at("2025-11-20T10:00")
    eng.update(states((t0, R), (t0 + 10 * MIN, D)), [], now_wall_ns=0)
    out = eng.flush()
    assert sorted((r.window, r.start_ns, r.end_ns, r.run_s, r.down_s) for r in out) == [
        ("1h", t0, t0 + 10 * MIN, 600, 0),
        ("shift", at("2025-11-20T06:00"), t0 + 10 * MIN, 600, 0),
    ]
    assert eng.machine_count == 0
    assert eng.flush() == []


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"windows": ["1x"]}, "bad duration '1x'"),
        ({"windows": ["0m"]}, "longer than zero"),
        ({"windows": ["60s", "1m"]}, "same length"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
        ({"shifts": [{"name": "a", "start": "6:00", "end": "14:00"}]}, "bad time of day '6:00'"),
        ({"shifts": [{"name": "a", "start": "06:00", "end": "24:00"}]}, "bad time of day '24:00'"),
        ({"shifts": [{"name": "a", "start": "06:00", "end": "14:00"}] * 2}, "names must be unique"),
        ({"default_ideal_cycle_s": 0}, "greater than 0"),
        ({"idle_close": 5}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_problem(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OeeConfig.model_validate(kwargs)


def test_machine_config_validation() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        MachineConfig(ideal_cycle_s=-1)
    with pytest.raises(ValidationError, match="'I', 'II', 'III' or 'IV'"):
        MachineConfig.model_validate({"vibration_class": "V"})
    assert MachineConfig().ideal_cycle_s is None


@pytest.mark.parametrize(
    ("text", "ns"), [("30s", 30 * S), ("1m", MIN), ("15m", 15 * MIN), ("1h", H), ("8h", 8 * H), ("1d", 24 * H)]
)
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


def test_saved_state_continues_windows_across_a_restart() -> None:
    """A gateway restart in the middle of a shift: the restored engine closes the same windows."""
    from gateway.batch import CountEvent, MachineKey, StateEvent
    from gateway.oee import OeeConfig, OeeEngine
    from gateway.schema import MachineState

    cfg = OeeConfig(windows=["1h"], shifts=[{"name": "early", "start": "06:00", "end": "14:00"}])
    m = MachineKey("s", "a", "l", "press1")
    t0 = 1_763_618_400 * 10**9  # 2025-11-20T06:00Z
    first = ([StateEvent(m, t0, MachineState.RUNNING)], [CountEvent(m, t0, 1000, 990)])
    second = ([StateEvent(m, t0 + 8 * 3600 * 10**9 + 1, MachineState.IDLE)],
              [CountEvent(m, t0 + 4 * 3600 * 10**9, 5000, 4900), CountEvent(m, t0 + 8 * 3600 * 10**9, 9000, 8800)])
    live = OeeEngine(cfg, {})
    live.update(*first, now_wall_ns=t0)
    expected = live.update(*second, now_wall_ns=t0)

    before = OeeEngine(cfg, {})
    before.update(*first, now_wall_ns=t0)
    after = OeeEngine(cfg, {})
    after.restore(before.snapshot())
    assert after.update(*second, now_wall_ns=t0) == expected
    shift = [r for r in expected if r.window == "shift"]
    assert shift
    assert shift[0].total_count == 8000
    with pytest.raises(ValueError, match="do not fit"):  # other windows: the arrays do not fit
        OeeEngine(OeeConfig(windows=["1m", "1h"], shifts=cfg.shifts), {}).restore(before.snapshot())


def test_open_records_are_the_shift_so_far_and_change_nothing() -> None:
    st, ct = parse_replay(vorne_messages())
    noon = at(f"{DAY}T12:00")
    eng = engine(shifts=[("early", "06:00", "14:00")])
    assert eng.update([e for e in st if e.ts_ns <= noon], [c for c in ct if c.ts_ns <= noon], now_wall_ns=0) == []
    (so_far,) = eng.open_records(PRESS)
    assert (so_far.shift, so_far.start_ns) == ("early", at(f"{DAY}T06:00"))
    assert at(f"{DAY}T06:00") < so_far.end_ns <= noon  # partial: up to the last accounted event
    assert 0 < so_far.total_count < 19_271
    assert eng.open_records(PRESS) == [so_far]  # asking again changes nothing
    assert eng.open_records(MachineKey("x", "y", "z", "unknown")) == []
    (rec,) = eng.update([e for e in st if e.ts_ns > noon], [c for c in ct if c.ts_ns > noon], now_wall_ns=0)
    assert (rec.total_count, rec.good_count) == (19_271, 19_271 - 423)  # the same shift as without asking
    assert eng.open_records(PRESS) == []
