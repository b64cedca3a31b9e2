"""run_agent without a broker: it starts anyway, samples into the disk buffer and says so in the log."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import orjson
import pytest

import devices.agent
from devices.agent import AgentConfig, run_agent
from devices.diskqueue import DiskQueue


def test_agent_samples_into_the_buffer_while_the_broker_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("51000\n")
    cfg = AgentConfig.model_validate(
        {
            "device": {"site": "s", "area": "a", "line": "l", "machine": "pi", "interval_s": 0.05},
            "mqtt": {"broker": f"127.0.0.1:{port}", "reconnect_max_s": 0.1},
            "sensors": {"thermal_dir": str(tmp_path / "thermal"), "loadavg": False, "w1": False},
            "buffer": {"path": str(tmp_path / "q.db"), "drain_timeout_s": 5.0},
        }
    )
    monkeypatch.setattr(devices.agent, "_OFFLINE_WARN_S", 0.2)
    stop = threading.Event()
    timer = threading.Timer(0.6, stop.set)
    timer.start()
    with caplog.at_level(logging.WARNING):
        taken = run_agent(cfg, stop)
    timer.join()
    assert taken >= 5
    assert f"broker 127.0.0.1:{port} unreachable for" in caplog.text
    assert "stay in the disk buffer" in caplog.text
    with DiskQueue(cfg.buffer.path, max_bytes=10**6) as q:
        msgs = [(m.topic, orjson.loads(m.payload)) for m in q.read_after(0, 1000)]
    assert [t.rpartition("/")[2] for t, _ in msgs] == ["state", *["telemetry"] * taken, "state"]
    assert [p["seq"] for _, p in msgs[1:-1]] == list(range(1, taken + 1))
    assert msgs[1][1]["values"] == {"cpu_temp_c": 51.0}
    assert (msgs[0][1]["reason"], msgs[-1][1]["reason"]) == ("agent_started", "agent_stopped")
