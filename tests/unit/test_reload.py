"""Config reload (SIGHUP): the OEE engine, the pipeline and the server apply new settings or refuse them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
import pytest

from gateway.batch import CountEvent, MachineKey, StateEvent
from gateway.config import GatewayConfig
from gateway.oee import MachineConfig, OeeConfig, OeeEngine, OeeRecord, ShiftConfig
from gateway.pipeline import Pipeline
from gateway.schema import MachineState
from gateway.server import Server
from tests.unit.test_pipeline import FakeSink

S = 1_000_000_000
MIN = 60 * S
PRESS = MachineKey("s", "a", "l", "press1")
R = MachineState.RUNNING


def _run(eng: OeeEngine, t0: int, minutes: int, parts_per_min: int) -> list[OeeRecord]:
    """One state event, then a count every minute; return every record emitted."""
    out = list(eng.update([StateEvent(PRESS, t0, R)], [CountEvent(PRESS, t0, 0, 0)], 0))
    for k in range(1, minutes + 1):
        n = k * parts_per_min
        out += eng.update([], [CountEvent(PRESS, t0 + k * MIN, n, n)], 0)
    return out


def test_oee_reconfigure_with_the_same_settings_changes_nothing() -> None:
    cfg = OeeConfig(windows=["1m", "1h"])
    a, b = OeeEngine(cfg, {}), OeeEngine(cfg, {})
    first = _run(a, 0, 30, 50)
    _run(b, 0, 30, 50)
    assert b.reconfigure(OeeConfig(windows=["1m", "1h"]), {}) == []
    more_a = a.update([], [CountEvent(PRESS, 90 * MIN, 5000, 5000)], 0)
    more_b = b.update([], [CountEvent(PRESS, 90 * MIN, 5000, 5000)], 0)
    assert first
    assert more_a == more_b


def test_oee_reconfigure_keeps_common_windows_closes_removed_and_starts_added() -> None:
    eng = OeeEngine(OeeConfig(windows=["1m", "1h"]), {})
    _run(eng, 0, 30, 60)  # 30 min at 1 part/s, ideal 1 s
    closed = eng.reconfigure(OeeConfig(windows=["1h", "15m"]), {"press1": MachineConfig(ideal_cycle_s=0.5)})
    # The removed 1m window still open (29-30 min: a count at a window's end belongs to it) is emitted;
    # the 1h window stays open.
    assert [(r.window, r.start_ns) for r in closed] == [("1m", 29 * MIN)]
    later = eng.update([], [CountEvent(PRESS, 60 * MIN, 3600, 3600), CountEvent(PRESS, 61 * MIN, 3660, 3660)], 0)
    by = {r.window: r for r in later}
    hour = by["1h"]
    assert hour.start_ns == 0
    assert hour.run_s == 3600
    assert hour.performance == pytest.approx(0.5 * 3600 / 3600)  # the new ideal cycle time applies
    quarter = [r for r in later if r.window == "15m"]
    assert quarter
    assert quarter[0].start_ns == 30 * MIN


def test_oee_reconfigure_adds_a_shift() -> None:
    eng = OeeEngine(OeeConfig(windows=["1h"]), {})
    _run(eng, 0, 10, 60)
    eng.reconfigure(OeeConfig(windows=["1h"], shifts=[ShiftConfig(name="early", start="00:00", end="08:00")]), {})
    out = eng.update([], [CountEvent(PRESS, 8 * 60 * MIN + MIN, 30000, 30000)], 0)
    shift = [r for r in out if r.window == "shift"]
    assert len(shift) == 1
    assert shift[0].shift == "early"
    assert shift[0].run_s == pytest.approx(8 * 3600 - 10 * 60)  # accounted from the reload on


def _cfg(**sections: object) -> GatewayConfig:
    base: dict[str, object] = {"influx": {"batch_size": 1000}, "detect": {"enabled": False}}
    return GatewayConfig.model_validate({**base, **sections})


def _msg(i: int, metric: str = "t") -> bytes:
    return orjson.dumps({"ts": time.time() - 10 + i * 0.001, "values": {metric: float(i)}})


async def test_pipeline_reconfigure_applies_at_once_without_waiting_for_the_database() -> None:
    sink = FakeSink()
    sink.gate.clear()  # the database hangs: a reload must not wait for it
    line = f"env,probe=n humidity=40.5 {time.time_ns() - 10**9}".encode()
    old = _cfg(mqtt={"topics": [{"topic": "factory/#", "format": "json"}]})
    p = Pipeline(old, sink, emit_stats=False)
    p.submit("factory/s1/a/l/m1/telemetry", _msg(1), None)
    p.submit("factory/s1/a/l/m1/telemetry", line, None)  # JSON expected under the old config: rejected
    new = _cfg(mqtt={"topics": [{"topic": "factory/#", "format": "line"}]}, gateway={"max_series": 7},
               detect={"enabled": True, "state_change_holdoff_s": 5})
    changed = p.reconfigure(new)  # synchronous
    assert changed == ["gateway", "mqtt", "detect"]
    assert p.stats.decode_errors == 1
    assert p.batch_full()  # the flusher is woken to write the open batch under the new settings
    p.submit("factory/s1/a/l/m1/telemetry", line, None)  # the reloaded subscription says line protocol
    assert p.stats.decode_errors == 1
    assert p.anomaly is not None
    assert p.registry.max_series == 7
    assert p.state_filter.holdoff_ns == 5 * S
    assert p.reconfigure(new) == []  # the same config again: nothing to do
    sink.gate.set()
    await p.flush()
    body = b"\n".join(sink.bodies)
    assert b"telemetry,area=a" in body  # read before the reload: nothing lost
    assert b"\nenv," in body or body.startswith(b"env,")


async def test_pipeline_reconfigure_writes_the_windows_it_closes_and_forgets_a_disabled_oee(tmp_path: Path) -> None:
    sink = FakeSink()
    p = Pipeline(_cfg(oee={"windows": ["1h"]}), sink, emit_stats=False)
    now = time.time()
    t = max(now // 3600 * 3600, now - 600)  # inside the current hour: one 1h window, whatever the time
    later = t + min(300.0, (now - t) / 2)
    p.submit("factory/s/a/l/press1/state", orjson.dumps({"ts": t, "state": "RUNNING"}), None)
    p.submit("factory/s/a/l/press1/count", orjson.dumps({"ts": t, "total": 0, "good": 0}), None)
    p.submit("factory/s/a/l/press1/count", orjson.dumps({"ts": later, "total": 300, "good": 290}), None)
    await p.flush()
    assert p.reconfigure(_cfg(oee={"enabled": False})) == ["oee"]
    assert p.oee is None
    assert p._checkpoint_soon  # a later start must find a checkpoint made with the new settings
    await p.flush()
    oee_lines = [ln for b in sink.bodies for ln in b.split(b"\n") if ln.startswith(b"oee,")]
    assert len(oee_lines) == 1
    assert b"window=1h" in oee_lines[0]
    assert b"total_count=300i" in oee_lines[0]


async def test_pipeline_reconfigure_keeps_detector_state_when_detect_is_unchanged() -> None:
    sink = FakeSink()
    cfg = _cfg(detect={"enabled": True})
    p = Pipeline(cfg, sink, emit_stats=False)
    engine = p.anomaly
    p.reconfigure(_cfg(detect={"enabled": True}, oee={"windows": ["5m"]}))
    assert p.anomaly is engine
    p.reconfigure(_cfg(detect={"enabled": True, "threads": 2}, oee={"windows": ["5m"]}))
    assert p.anomaly is engine  # threads change no state: it is kept
    assert engine is not None
    assert engine.model.threads == 2
    assert engine.config.threads == 2
    p.reconfigure(_cfg(detect={"enabled": True, "threshold": 0.9}, oee={"windows": ["5m"]}))
    assert p.anomaly is not engine


def _server(tmp_path: Path, body: str) -> tuple[Server, Path, FakeSink]:
    path = tmp_path / "gw.toml"
    path.write_text(body)
    from gateway.config import load_config

    sink = FakeSink()
    return Server(load_config(path), sink, config_path=path, show_status=False), path, sink


_BASE = """
[buffer]
dir = "{dir}/wal"
[deadletter]
path = "{dir}/dl.jsonl"
[detect]
enabled = false
"""


async def test_server_reload_refuses_an_invalid_file_and_keeps_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, path, _ = _server(tmp_path, _BASE.format(dir=tmp_path))
    before = server.cfg
    path.write_text(_BASE.format(dir=tmp_path) + '[oee]\ntimezone = "Mars/Olympus"\nwindows = ["90x"]\n')
    with caplog.at_level(logging.ERROR):
        assert server.reload() is False
    assert server.cfg is before
    assert server.reloads == 0
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert any("oee.timezone" in m for m in refused), refused
    assert any("oee.windows" in m for m in refused), refused
    if server.wal:
        server.wal.close()
    server.deadletter.close()


async def test_server_reload_applies_and_defers_restart_only_sections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, path, _ = _server(tmp_path, _BASE.format(dir=tmp_path))
    path.write_text(_BASE.format(dir=tmp_path) + '[influx]\nurl = "http://10.0.0.1:8086"\n'
                    '[machines."press1"]\nideal_cycle_s = 2.5\n')
    with caplog.at_level(logging.INFO):
        assert server.reload() is True
    assert server.reloads == 1
    assert server.cfg.machines["press1"].ideal_cycle_s == 2.5
    assert server.pipeline.cfg.machines["press1"].ideal_cycle_s == 2.5
    assert server.cfg.influx.url == "http://127.0.0.1:8086"  # needs a restart: kept, and said so
    assert any("[influx] changed" in r.getMessage() and "next restart" in r.getMessage() for r in caplog.records)
    if server.wal:
        server.wal.close()
    server.deadletter.close()


async def test_server_reload_refuses_an_unreadable_file_and_says_ready_again(tmp_path: Path) -> None:
    import socket

    from gateway.notify import Notifier

    server, path, _ = _server(tmp_path, _BASE.format(dir=tmp_path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n.sock"))
    sock.settimeout(2)
    server.notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")  # Latin-1: not UTF-8
    assert server.reload() is False
    got = [sock.recv(4096).decode().split("\n")[0] for _ in range(2)]
    assert got == ["RELOADING=1", "READY=1"]
    sock.close()
    server.notifier.close()
    if server.wal:
        server.wal.close()
    server.deadletter.close()


async def test_a_reload_requested_while_stopping_is_ignored(tmp_path: Path) -> None:
    server, path, _ = _server(tmp_path, _BASE.format(dir=tmp_path))
    before = server.cfg
    path.write_text(_BASE.format(dir=tmp_path) + '[machines."press1"]\nideal_cycle_s = 2.5\n')
    server._stopping = True
    server.request_reload()
    assert server.reloads == 0
    assert server.cfg is before
    if server.wal:
        server.wal.close()
    server.deadletter.close()
