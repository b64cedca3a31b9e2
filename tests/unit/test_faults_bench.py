"""The fault bench's scoring (bench/faults.py) on hand-made faults and points: no detectors involved."""

from __future__ import annotations

import asyncio

import pytest

from devices.plant import PlantFault
from tests.scripts import load_script

bench = load_script("bench/faults.py", "bench_faults")
P = bench.AnomalyPoint
DAY = 86_400.0


def fault(machine: str, metric: str, kind: str, start: float, end: float, window: float) -> PlantFault:
    return PlantFault(machine, "plant1", "hall1", "line1", metric, kind, start, end, window, 0.1, 0.25)


FAULTS = [
    fault("m1", "power_kw", "step", DAY + 13_600, DAY + 17_200, 1800),
    fault("m2", "vibration_mm_s", "spike", DAY + 33_600, DAY + 33_600, 60),
    fault("m3", "spindle_temp_c", "stuck", DAY + 50_000, DAY + 57_200, 7200),
]


def test_caught_delay_and_false_alarms() -> None:
    t = DAY
    points = [
        P("m1", "power_kw", "fused", t + 13_600 + 600),  # caught after 10 min
        P("m1", "power_kw", "spike", t + 13_600 + 700),  # later in the same fault: neither caught twice nor FA
        P("m1", "power_kw", "fused", t + 17_200 + 500),  # after the end but within 10 min of it: not an FA
        P("m1", "power_kw", "fused", t + 17_200 + 700),  # past end + 10 min: FA (bucket 1)
        P("m1", "power_kw", "ewma", t + 17_200 + 750),  # same bucket: still one FA, but ewma gets one too
        P("m1", "spindle_temp_c", "fused", t + 14_000),  # another metric of the faulty machine: FA (2)
        P("m2", "vibration_mm_s", "fused", t + 33_600 + 61),  # outside the spike's 1-min window: not caught, not FA
        P("m3", "spindle_temp_c", "flatline", t + 50_000 - 10),  # before the onset: FA (3), not caught
        P("m3", "spindle_temp_c", "flatline", t + 50_000 + 7200),  # exactly onset + window: caught
        P("m3", "power_kw", "fused", 1_000.0),  # warm-up (first day): ignored
        P("m3", "power_kw", "fused", t + 1_200.0),  # FA (4)
        P("m3", "power_kw", "fused", t + 1_799.0),  # same 10-minute bucket as the one before
        P("m3", "power_kw", "fused", t + 1_800.0),  # next bucket: FA (5)
    ]
    r = bench.score(FAULTS, points, start_s=0.0, days=3.0, machines=3)
    assert (r["caught"], r["total"]) == (2, 3)
    assert r["caught_pct"] == pytest.approx(200 / 3)
    step, spike, stuck = r["kinds"]["step"], r["kinds"]["spike"], r["kinds"]["stuck"]
    assert (step["caught"], step["total"], step["median_delay_min"]) == (1, 1, 10.0)
    assert (spike["caught"], spike["total"], spike["median_delay_min"], spike["missed"]) == (
        0, 1, None, ["m2/vibration_mm_s"]
    )
    assert (stuck["caught"], stuck["median_delay_min"]) == (1, 120.0)
    assert r["kinds"]["dropout"]["total"] == 0
    assert r["false_alarms"] == 5
    assert r["machine_days"] == 6.0
    assert r["fa_per_machine_day"] == pytest.approx(5 / 6)
    assert r["fa_by_detector"] == {"ewma": 1, "flatline": 1, "fused": 4}
    assert r["fa_by_metric"] == {"power_kw": 3, "spindle_temp_c": 2}


def test_no_points_nothing_caught_no_false_alarms() -> None:
    r = bench.score(FAULTS, [], start_s=0.0, days=3.0, machines=3)
    assert (r["caught"], r["false_alarms"], r["fa_per_machine_day"]) == (0, 0, 0.0)
    assert all(k["median_delay_min"] is None for k in r["kinds"].values())


def test_median_delay_over_faults_of_a_kind() -> None:
    faults = [fault(f"m{i}", "power_kw", "dropout", DAY + 1000 * i, DAY + 1000 * i + 1200, 1200) for i in range(3)]
    points = [P(f"m{i}", "power_kw", "fused", DAY + 1000 * i + 60 * d) for i, d in enumerate((1, 5, 9))]
    r = bench.score(faults, points, start_s=0.0, days=2.0, machines=3)
    assert r["kinds"]["dropout"]["caught"] == 3
    assert r["kinds"]["dropout"]["median_delay_min"] == 5.0
    assert r["false_alarms"] == 0


def test_capture_sink_keeps_anomaly_lines_and_they_parse() -> None:
    sink = bench.CaptureSink()
    body = (
        b"telemetry,site=plant1,area=hall1,line=line1,machine=m001 power_kw=1.5 1764547200000000000\n"
        b"anomaly,site=plant1,area=hall1,line=line1,machine=m\\ 1,metric=power_kw,detector=fused "
        b"score=0.9,value=1.5,expected=1.0,zscore=5.0 1764547210000000000"
    )
    asyncio.run(sink.write(body))
    assert len(sink.anomaly_lines) == 1
    assert bench.parse_anomalies(sink.anomaly_lines) == [P("m 1", "power_kw", "fused", 1764547210.0)]


def test_summary_over_seeds() -> None:
    runs = [
        {"mode": "state", "seed": s, "caught_pct": c, "fa_per_machine_day": fa,
         "kinds": {"step": {"caught": c // 50, "total": 2}},
         "metrics": {"power_kw": {"caught": 1, "total": 1}, **({"spindle_temp_c": {"caught": 0, "total": 1}}
                                                                if s == 2 else {})}}
        for s, c, fa in ((1, 100, 0.5), (2, 50, 1.0))
    ]
    s = bench.summarise(runs)["state"]
    assert (s["caught_pct"], s["fa_per_machine_day"], s["meets_target"]) == (75, 0.75, False)
    assert s["caught_per_kind_pct"] == {"step": 75.0}
    # per metric, summed over the seeds (a metric with no fault in a seed counts nothing there)
    assert s["caught_per_metric"] == {"power_kw": [2, 2], "spindle_temp_c": [0, 1]}


@pytest.mark.parametrize(("text", "expected"), [
    ("spindle_temp_c=0.1,vibration_mm_s=0.01", {"spindle_temp_c": 0.1, "vibration_mm_s": 0.01}),
    (" power_kw = 0.5 ", {"power_kw": 0.5}),
    ("", {}),
])
def test_resolution_option_parses(text: str, expected: dict[str, float]) -> None:
    assert bench._resolution(text) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--resolution", "spindle_temp_c"], "'spindle_temp_c': expected metric=step with step > 0"),
    (["--resolution", "power_kw=-1"], "'power_kw=-1': expected metric=step with step > 0"),
    (["--resolution", "power_kw=x"], "'power_kw=x': expected metric=step"),
    (["--resolution", "rpm=1"], "resolution: rpm is not a metric"),
    (["--interval", "0"], "interval_s must be > 0"),
    (["--jitter", "5"], "clock_jitter_s must be in [0, interval_s / 2), got 5.0"),
    (["--sensors", "some"], "argument --sensors: invalid choice: 'some'"),
])
def test_bad_plant_options_are_refused_with_the_option_and_why(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_fault_window_opens_the_clock_jitter_early() -> None:
    """Devices' timestamps off the grid the faults are labelled on: a spike reported 0.4 s before its onset is
    caught, and not a false alarm, when the plant's jitter is 0.5 s (and is both without it)."""
    onset = FAULTS[1].start_ts
    points = [P("m2", "vibration_mm_s", "fused", onset - 0.4)]
    strict = bench.score(FAULTS, points, start_s=0.0, days=3.0, machines=3)
    assert (strict["kinds"]["spike"]["caught"], strict["false_alarms"]) == (0, 1)
    tolerant = bench.score(FAULTS, points, start_s=0.0, days=3.0, machines=3, clock_jitter_s=0.5)
    assert (tolerant["kinds"]["spike"]["caught"], tolerant["false_alarms"]) == (1, 0)
    assert tolerant["kinds"]["spike"]["median_delay_min"] == 0.0
