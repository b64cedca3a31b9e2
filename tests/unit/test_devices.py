"""Unit tests for the devices package: machine model, faults, fleet, agent and CLI (no broker needed)."""

from __future__ import annotations

import io
import itertools
import logging
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

from devices.agent import (
    AgentConfig,
    AgentConfigError,
    DeviceAgent,
    SensorReader,
    SensorsSection,
    load_config,
)
from devices.cli import SimulationProgress, _CountingFleet, main, parse_fault_at
from devices.fleet import BrokerAddress, Fleet, MqttPublisher, PublishError, fleet_layout, run_fleet
from devices.machine import (
    METRICS,
    FaultKind,
    FaultPlan,
    Machine,
    MachineSpec,
    ScheduledFault,
)
from devices.sensors import W1CrcError, read_ds18b20
from gateway.schema import (
    CHANNELS,
    CountMessage,
    MachineState,
    StateMessage,
    TelemetryFixedRate,
    TelemetrySample,
)

T0 = 1763900000.0
SPEC = MachineSpec("m001", "plant1", "assembly", "line1", 0)


def _run(machine: Machine, seconds: float, step: float = 1.0) -> list[tuple[str, bytes]]:
    out = []
    for k in range(round(seconds / step)):
        out.extend((e.channel, e.payload()) for e in machine.step(T0 + k * step))
    return out


def _telemetry(machine: Machine, seconds: int) -> list[dict[str, float]]:
    rows = []
    for k in range(seconds):
        rows.extend(dict(e.message.values) for e in machine.step(T0 + k) if isinstance(e.message, TelemetrySample))
    return rows


def _validate(channel: str, payload: bytes) -> object:
    if channel == "telemetry":
        if b'"t0"' in payload:
            return TelemetryFixedRate.model_validate_json(payload)
        return TelemetrySample.model_validate_json(payload)
    if channel == "state":
        return StateMessage.model_validate_json(payload)
    assert channel == "count"
    return CountMessage.model_validate_json(payload)


# -- machine model --------------------------------------------------------------------------------


def test_same_seed_and_times_give_same_messages() -> None:
    plan = FaultPlan(tuple(FaultKind), rate_per_hour=20.0)
    a = _run(Machine(SPEC, seed=42, time_scale=60, faults=plan), 600)
    b = _run(Machine(SPEC, seed=42, time_scale=60, faults=plan), 600)
    c = _run(Machine(SPEC, seed=43, time_scale=60, faults=plan), 600)
    assert a == b
    assert a != c


def test_machines_in_a_fleet_differ() -> None:
    m1, m2 = (Machine(s, seed=1) for s in fleet_layout(2))
    assert m1.cycle_time_s != m2.cycle_time_s
    assert _run(m1, 10) != _run(m2, 10)


def test_every_payload_validates_against_the_wire_schema() -> None:
    plan = FaultPlan(tuple(FaultKind), rate_per_hour=30.0)
    fleet = Fleet(fleet_layout(6), seed=5, time_scale=60, faults=plan)
    seen: Counter[str] = Counter()
    for k in range(300):
        items = list(fleet.tick(T0 + k))
        if k % 60 == 0:
            items += list(fleet.waveforms(T0 + k, 1000.0))
        for topic, channel, payload in items:
            parts = topic.split("/")
            assert len(parts) == 6
            assert parts[0] == "factory"
            assert parts[-1] == channel
            assert channel in CHANNELS
            _validate(channel, payload)
            seen[channel] += 1
    assert seen["telemetry"] == 6 * 300 + 6 * 5
    assert seen["state"] > 6  # one at start per machine, then transitions at time scale 60
    assert seen["count"] == 6 * 60  # every 5 s


def test_telemetry_sample_shape() -> None:
    m = Machine(SPEC, seed=0, initial_state=MachineState.RUNNING)
    msgs = m.step(T0)
    assert [e.channel for e in msgs] == ["state", "count", "telemetry"]
    tel = orjson.loads(msgs[-1].payload())
    assert tel["ts"] == T0
    assert tel["seq"] == 1
    assert set(tel["values"]) == set(METRICS)
    assert orjson.loads(m.step(T0 + 1)[-1].payload())["seq"] == 2
    state = orjson.loads(msgs[0].payload())
    assert state == {"ts": T0, "state": "RUNNING"}


def test_waveform_block() -> None:
    m = Machine(SPEC, seed=0, initial_state=MachineState.RUNNING)
    m.step(T0)
    em = m.waveform(T0 + 1, 1000.0)
    block = TelemetryFixedRate.model_validate_json(em.payload())
    assert block.dt == pytest.approx(0.001)
    assert block.t0 == pytest.approx(T0)
    assert len(block.values["accel_g"]) == 1000


def test_state_fractions_and_dwell_times_are_plausible_over_a_simulated_hour() -> None:
    spent: Counter[str] = Counter()
    dwell: defaultdict[str, list[float]] = defaultdict(list)
    hours = 1
    specs = fleet_layout(20)
    for spec in specs:
        m = Machine(spec, seed=11)
        current: tuple[float, str] | None = None
        for k in range(0, 3600 * hours, 5):
            for e in m.step(T0 + k):
                if isinstance(e.message, StateMessage):
                    ts = float(e.message.ts or 0.0)
                    if current is not None:
                        spent[current[1]] += ts - current[0]
                        dwell[current[1]].append(ts - current[0])
                    current = (ts, e.message.state.value)
        assert current is not None
        spent[current[1]] += T0 + 3600 * hours - 5 - current[0]
    total = sum(spent.values())
    assert total == pytest.approx(20 * (3600 * hours - 5))
    frac = {k: v / total for k, v in spent.items()}
    assert 0.55 < frac["RUNNING"] < 0.95
    assert frac.get("DOWN", 0.0) < 0.25
    # Completed dwells land in realistic ranges (minutes, not seconds or days).
    assert 300 < sum(dwell["RUNNING"]) / len(dwell["RUNNING"]) < 3600
    assert 30 < sum(dwell["DOWN"]) / len(dwell["DOWN"]) < 900
    reasons = {
        msg.reason
        for spec in specs[:5]
        for msg in _states(Machine(spec, seed=11, time_scale=60), 3600)
        if msg.state is MachineState.DOWN
    }
    assert reasons <= {"jam", "tool_break", "no_material", "electrical_fault"}
    assert len(reasons) >= 2


def _states(m: Machine, seconds: int) -> list[StateMessage]:
    return [e.message for k in range(seconds) for e in m.step(T0 + k) if isinstance(e.message, StateMessage)]


def test_time_scale_compresses_state_changes() -> None:
    slow = len(_states(Machine(SPEC, seed=3), 600))
    fast = len(_states(Machine(SPEC, seed=3, time_scale=60), 600))
    assert fast > 10 * max(slow, 1)


def test_counters_are_monotonic_and_good_never_exceeds_total() -> None:
    m = Machine(SPEC, seed=9, time_scale=30, count_every_s=2.0)
    prev = (0, 0)
    counts = []
    for k in range(3600):
        for e in m.step(T0 + k):
            if isinstance(e.message, CountMessage):
                total, good = e.message.total, e.message.good
                assert total >= prev[0]
                assert good >= prev[1]
                assert good <= total
                prev = (total, good)
                counts.append(e.message)
    assert len(counts) == 1800
    assert prev[0] > 100
    assert 0.9 < prev[1] / prev[0] < 1.0


def test_parts_are_made_only_while_running() -> None:
    m = Machine(SPEC, seed=2, initial_state=MachineState.DOWN, time_scale=1e-6)
    _run(m, 120)
    assert m.total == 0
    r = Machine(SPEC, seed=2, initial_state=MachineState.RUNNING, time_scale=1e-6)
    _run(r, 120)
    assert 120 / 3.5 < r.total < 120 / 0.9


# -- fault signatures (a faulted machine vs. a clean twin with the same seed) ---------------------


def _twins(fault: ScheduledFault, seconds: int = 200) -> tuple[list[dict[str, float]], list[dict[str, float]], Machine]:
    running = MachineState.RUNNING  # with dwell times a million times longer it stays RUNNING throughout
    clean = Machine(SPEC, seed=21, initial_state=running, time_scale=1e-6)
    faulty = Machine(SPEC, seed=21, initial_state=running, time_scale=1e-6, faults=FaultPlan(scheduled=(fault,)))
    return _telemetry(clean, seconds), _telemetry(faulty, seconds), faulty


def test_stuck_sensor_repeats_the_exact_same_value() -> None:
    clean, faulty, m = _twins(ScheduledFault(FaultKind.STUCK, at_s=50, duration_s=20, metric="power_kw"))
    window = [row["power_kw"] for row in faulty[50:71]]
    assert len(set(window)) == 1
    assert len({row["power_kw"] for row in clean[50:71]}) > 10
    assert faulty[49] == clean[49]
    assert faulty[71] == clean[71]
    (rec,) = m.pop_finished_faults()
    assert (rec.kind, rec.metric, rec.start_ts, rec.end_ts) == (FaultKind.STUCK, "power_kw", T0 + 50, T0 + 70)


def test_spike_is_a_single_outlier() -> None:
    clean, faulty, m = _twins(ScheduledFault(FaultKind.SPIKE, at_s=30, metric="vibration_mm_s"))
    diffs = [i for i, (a, b) in enumerate(zip(clean, faulty, strict=True)) if a != b]
    assert diffs == [30]
    assert faulty[30]["vibration_mm_s"] - clean[30]["vibration_mm_s"] >= 9.0  # ≥ 6 × 1.5 mm/s
    (rec,) = m.pop_finished_faults()
    assert rec.start_ts == rec.end_ts == T0 + 30


def test_drift_is_a_slow_temperature_ramp() -> None:
    clean, faulty, m = _twins(ScheduledFault(FaultKind.DRIFT, at_s=20, duration_s=100))
    offset = [f["spindle_temp_c"] - c["spindle_temp_c"] for c, f in zip(clean, faulty, strict=True)]
    ramp = offset[20:121]
    assert all(abs(x) < 1e-9 for x in offset[:20])
    assert all(b >= a - 0.002 for a, b in itertools.pairwise(ramp))  # rounding slack
    assert 8.0 <= ramp[-1] <= 15.0
    assert ramp[50] == pytest.approx(ramp[-1] / 2, abs=0.05)
    assert all(abs(x) < 1e-9 for x in offset[121:])
    assert all(f["power_kw"] == c["power_kw"] for c, f in zip(clean, faulty, strict=True))
    (rec,) = m.pop_finished_faults()
    assert (rec.metric, rec.start_ts, rec.end_ts) == ("spindle_temp_c", T0 + 20, T0 + 120)


def test_bearing_wear_raises_vibration_over_time() -> None:
    clean, faulty, m = _twins(ScheduledFault(FaultKind.BEARING_WEAR, at_s=0, duration_s=300), seconds=300)
    ratio = [f["vibration_mm_s"] / c["vibration_mm_s"] for c, f in zip(clean, faulty, strict=True)]
    first, last = sum(ratio[:30]) / 30, sum(ratio[-30:]) / 30
    assert first < 1.3
    assert last > 2.5
    m.step(T0 + 300)  # still inside the window (end is inclusive)
    assert m.pop_finished_faults() == []
    m.step(T0 + 301)
    assert m.pop_finished_faults()[0].kind is FaultKind.BEARING_WEAR


def test_random_faults_follow_the_rate_and_are_recorded() -> None:
    plan = FaultPlan((FaultKind.SPIKE, FaultKind.STUCK), rate_per_hour=60.0)
    m = Machine(SPEC, seed=4, faults=plan)
    _run(m, 7200)
    records = m.close_faults()
    assert 60 < len(records) < 180  # ~120 expected over two hours
    assert {r.kind for r in records} == {FaultKind.SPIKE, FaultKind.STUCK}
    assert all(r.end_ts >= r.start_ts for r in records)


def test_scheduled_fault_rejects_wrong_metric() -> None:
    with pytest.raises(ValueError, match="drift applies to spindle_temp_c"):
        ScheduledFault(FaultKind.DRIFT, at_s=1, metric="power_kw")


# -- fleet ----------------------------------------------------------------------------------------


def test_fleet_layout_is_deterministic_and_unique() -> None:
    specs = fleet_layout(50)
    assert specs == fleet_layout(50)
    assert len({s.name for s in specs}) == 50
    assert specs[0].name == "m001"
    assert specs[-1].name == "m050"
    lines = {(s.site, s.area, s.line) for s in specs}
    assert len(lines) == 10
    assert ("plant2", "assembly", "line1") in lines
    with pytest.raises(ValueError, match="at least one"):
        fleet_layout(0)


def test_run_fleet_paces_ticks_and_writes_the_fault_log(tmp_path: Path) -> None:
    specs = fleet_layout(3)
    plans = {"m002": FaultPlan(scheduled=(ScheduledFault(FaultKind.SPIKE, at_s=0.0),))}
    fleet = Fleet(specs, seed=0, faults=plans)
    got: list[tuple[str, bytes, str]] = []
    log_path = tmp_path / "faults.jsonl"
    with log_path.open("wb") as fh:
        summary = run_fleet(
            fleet,
            lambda t, p, c: got.append((t, p, c)),
            rate_hz=20.0,
            duration_s=0.5,
            waveform_hz=200.0,
            waveform_every_s=0.2,
            fault_log=fh,
        )
    assert 8 <= summary.ticks <= 11
    assert summary.per_channel["telemetry"] == 3 * summary.ticks + summary.waveforms
    assert summary.waveforms >= 3
    assert summary.per_channel["state"] >= 3
    assert len(got) == sum(summary.per_channel.values())
    for _, payload, channel in got:
        _validate(channel, payload)
    (line,) = log_path.read_bytes().splitlines()
    rec = orjson.loads(line)
    assert rec["machine"] == "m002"
    assert rec["kind"] == "spike"
    assert rec["start_ts"] == rec["end_ts"]
    assert (rec["site"], rec["area"], rec["line"]) == ("plant1", "assembly", "line1")
    assert "published" in summary.line()


def test_run_fleet_stops_on_event() -> None:
    stop = threading.Event()
    stop.set()
    summary = run_fleet(Fleet(fleet_layout(1), seed=0), lambda t, p, c: None, rate_hz=1.0, stop=stop)
    assert summary.ticks == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", BrokerAddress("localhost", 1883)),
        ("10.0.0.5:8883", BrokerAddress("10.0.0.5", 8883)),
        ("[::1]:1884", BrokerAddress("::1", 1884)),
    ],
)
def test_broker_address_parse(text: str, expected: BrokerAddress) -> None:
    assert BrokerAddress.parse(text) == expected


@pytest.mark.parametrize("text", ["", ":1883", "host:0", "host:99999", "host:abc", "[::1"])
def test_broker_address_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="broker"):
        BrokerAddress.parse(text)


def test_publisher_reports_unreachable_broker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pub = MqttPublisher(BrokerAddress("127.0.0.1", port), "test-client", connect_timeout=2.0)
    with pytest.raises(PublishError, match="cannot connect"), pub:
        pass


# -- CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["simulate", "--machines", "0"],
        ["simulate", "--rate", "-1"],
        ["simulate", "--broker", "host:99999"],
        ["simulate", "--faults", "drift,gremlins"],
        ["simulate", "--fault-at", "m001:spike"],
        ["simulate", "--machines", "5", "--fault-at", "m009:spike:3"],
        ["simulate", "--qos", "3"],
        ["simulate", "--root", "a/b"],
        ["simulate", "--progress", "-1"],
        ["agent"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_parse_fault_at() -> None:
    name, fault = parse_fault_at("m003:drift:12.5")
    assert name == "m003"
    assert fault == ScheduledFault(FaultKind.DRIFT, 12.5)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


PROGRESS_LINE = re.compile(
    r"^elapsed \d+ s, \d+ messages sent, \d+\.\d msg/s, 3 machines, \d+ faults? injected$"
)


def test_progress_line_counts_and_rate() -> None:
    clock = iter([100.0, 102.0, 104.0]).__next__
    progress = SimulationProgress(io.StringIO(), every_s=2, machines=20, clock=clock)
    progress.sent = 300
    assert progress.line() == "elapsed 2 s, 300 messages sent, 150.0 msg/s, 20 machines, 0 faults injected"
    progress.sent, progress.faults = 400, 2
    assert progress.line() == "elapsed 4 s, 400 messages sent, 50.0 msg/s, 20 machines, 2 faults injected"


@pytest.mark.parametrize("tty", [False, True])
def test_progress_reports_while_running(tty: bool) -> None:
    stream = _Tty() if tty else io.StringIO()
    with SimulationProgress(stream, every_s=0.05, machines=3) as progress:
        for _ in range(30):
            progress.sent += 10
            time.sleep(0.01)
    out = stream.getvalue()
    if tty:  # one line rewritten in place, finished with a newline at the end
        assert out.startswith("\r")
        assert out.endswith("\n")
        assert out.count("\n") == 1
        lines = [part.rstrip() for part in out.strip("\n").split("\r")[1:]]
    else:  # plain lines for pipes, files and journald
        assert "\r" not in out
        lines = out.splitlines()
    assert len(lines) >= 2
    assert all(PROGRESS_LINE.match(line) for line in lines), lines


def test_progress_off_writes_nothing() -> None:
    stream = _Tty()
    with SimulationProgress(stream, every_s=0, machines=3):
        time.sleep(0.05)
    assert stream.getvalue() == ""


def test_progress_counts_faults_from_the_fleet() -> None:
    plans = {"m002": FaultPlan(scheduled=(ScheduledFault(FaultKind.SPIKE, at_s=0.0),))}
    fleet = _CountingFleet(fleet_layout(3), seed=0, faults=plans)
    fleet.progress = SimulationProgress(io.StringIO(), every_s=0, machines=3)
    summary = run_fleet(fleet, lambda t, p, c: None, rate_hz=20.0, duration_s=0.2)
    assert fleet.progress.faults == summary.faults == 1


def test_cli_unreachable_broker_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["simulate", "--broker", f"127.0.0.1:{port}", "--duration", "1"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_cli_agent_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[device]\nsite = "s"\narea = "a"\nline = "l"\n')
    assert main(["agent", "--config", str(cfg)]) == 2
    assert "device.machine" in capsys.readouterr().err


# -- Raspberry Pi agent ---------------------------------------------------------------------------

W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
W1_BAD_CRC = "72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


def _sysfs(tmp_path: Path) -> SensorsSection:
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    (tmp_path / "loadavg").write_text("0.52 0.58 0.59 1/123 4567\n")
    for serial, body in [("28-00000a1b2c3d", W1_OK), ("28-00000bad0000", W1_BAD_CRC)]:
        (tmp_path / "w1" / serial).mkdir(parents=True)
        (tmp_path / "w1" / serial / "w1_slave").write_text(body)
    return SensorsSection(
        thermal_dir=tmp_path / "thermal",
        loadavg_path=tmp_path / "loadavg",
        w1_dir=tmp_path / "w1",
        w1_names={"28-00000a1b2c3d": "coolant_temp_c"},
    )


def test_agent_reads_fake_sysfs(tmp_path: Path) -> None:
    values = SensorReader(_sysfs(tmp_path)).read()
    assert values == {
        "cpu_temp_c": 48.312,
        "load_1m": 0.52,
        "load_5m": 0.58,
        "load_15m": 0.59,
        "coolant_temp_c": 23.125,
    }


def test_agent_skips_missing_sensors_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = SensorsSection(
        thermal_dir=tmp_path / "nope",
        loadavg_path=tmp_path / "nope2",
        w1_dir=tmp_path / "none",
    )
    reader = SensorReader(cfg)
    with caplog.at_level(logging.WARNING, logger="devices.agent"):
        assert reader.read() == {}
        assert reader.read() == {}
    assert len(caplog.records) == 3
    agent = DeviceAgent(
        AgentConfig.model_validate(
            {"device": {"site": "s", "area": "a", "line": "l", "machine": "pi"}, "sensors": cfg.model_dump()}
        )
    )
    assert agent.sample(T0) is None


def test_ds18b20_parsing(tmp_path: Path) -> None:
    p = tmp_path / "w1_slave"
    p.write_text(W1_OK.replace("t=23125", "t=-1250"))
    assert read_ds18b20(tmp_path) == -1.25
    p.write_text(W1_OK.replace("t=23125", "t=85000"))  # power-on reset value
    assert read_ds18b20(tmp_path) is None
    p.write_text(W1_BAD_CRC)
    with pytest.raises(W1CrcError):
        read_ds18b20(tmp_path)


def test_agent_config_and_messages(tmp_path: Path) -> None:
    sensors = _sysfs(tmp_path)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f"""
[device]
site = "plant9"
area = "lab"
line = "bench"
machine = "pi01"
interval_s = 2.5

[mqtt]
broker = "127.0.0.1:1883"
qos = 2

[sensors]
thermal_dir = "{sensors.thermal_dir}"
loadavg_path = "{sensors.loadavg_path}"
w1_dir = "{sensors.w1_dir}"
"""
    )
    cfg = load_config(toml)
    assert cfg.device.interval_s == 2.5
    assert cfg.mqtt.qos == 2
    agent = DeviceAgent(cfg)
    assert agent.topic("telemetry") == "factory/plant9/lab/bench/pi01/telemetry"
    s1, s2 = agent.sample(T0), agent.sample(T0 + 2.5)
    assert s1 is not None
    assert s2 is not None
    assert (s1.seq, s2.seq) == (1, 2)
    assert s1.values["ds18b20_00000a1b2c3d_c"] == 23.125
    assert TelemetrySample.model_validate_json(orjson.dumps(s1.model_dump(exclude_none=True))) == s1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[device]\nsite = "s"\narea = "a"\nline = "l"\nmachine = "m/1"\n', "device.machine"),
        ('[device]\nsite = "s"\narea = "a"\nline = "l"\nmachine = "m"\ninterval_s = 0\n', "device.interval_s"),
        ('[device]\nsite = "s"\narea = "a"\nline = "l"\nmachine = "m"\n[mqtt]\nbrokr = "x"\n', "mqtt.brokr"),
        ('[device]\nsite = "s"\narea = "a"\nline = "l"\nmachine = "m"\n[mqtt]\nqos = 0\n', "mqtt.qos"),
        ("[device\n", "not valid TOML"),
    ],
)
def test_agent_config_errors_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    with pytest.raises(AgentConfigError, match=needle.replace(".", r"\.")):
        load_config(path)


def test_agent_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
