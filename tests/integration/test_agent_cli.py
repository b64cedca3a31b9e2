"""`factory-devices agent` and `simulate` as processes against the real broker: signals, exit codes, stderr."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from gateway.schema import StateMessage, TelemetrySample
from tests.integration.test_agent_broker import Subscriber, fake_sysfs
from tests.servers import Mosquitto

ROOT = Path(__file__).resolve().parents[2]


def test_agent_process_stops_cleanly_on_sigterm(mosquitto: Mosquitto, tmp_path: Path) -> None:
    root = f"cli{uuid.uuid4().hex[:8]}"
    sysfs = fake_sysfs(tmp_path / "sys")
    cfg = tmp_path / "pi-agent.toml"
    cfg.write_text(
        f"""
[device]
site = "plant1"
area = "lab"
line = "bench"
machine = "pi02"
interval_s = 0.1

[mqtt]
broker = "127.0.0.1:{mosquitto.port}"
root = "{root}"

[buffer]
path = "{tmp_path / "state" / "queue.sqlite3"}"

[sensors]
thermal_dir = "{sysfs["thermal_dir"]}"
loadavg_path = "{sysfs["loadavg_path"]}"
w1_dir = "{sysfs["w1_dir"]}"
"""
    )
    sub = Subscriber(mosquitto.port, root)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devices.cli", "agent", "--config", str(cfg)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            sub.wait_for(lambda: len(sub.got("telemetry")) >= 3, what="telemetry from the agent process")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        taken = int(re.search(r"agent took (\d+) samples", out).group(1))  # type: ignore[union-attr]
        sub.wait_for(lambda: len(sub.got("state")) >= 2, what="PLANNED_STOP")
    finally:
        sub.close()
    assert "received SIGTERM, stopping" in err
    telemetry = [TelemetrySample.model_validate(t) for t in sub.got("telemetry")]
    assert [t.seq for t in telemetry] == list(range(1, taken + 1)), "all samples delivered before exit"
    assert "cpu_temp_c" in telemetry[0].values
    assert [StateMessage.model_validate(s).reason for s in sub.got("state")] == ["agent_started", "agent_stopped"]


def test_simulate_reports_progress_on_stderr(mosquitto: Mosquitto) -> None:
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "devices.cli", "simulate", "--broker", f"127.0.0.1:{mosquitto.port}",
         "--machines", "3", "--rate", "10", "--duration", "2.5", "--progress", "0.5",
         "--root", f"sim{uuid.uuid4().hex[:8]}", "--fault-at", "m002:spike:0.3", "--log-level", "WARNING"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 20
    lines = res.stderr.splitlines()  # stderr is a pipe here: plain lines, no carriage returns
    assert "\r" not in res.stderr
    pattern = re.compile(r"^elapsed (\d+) s, (\d+) messages sent, [\d.]+ msg/s, 3 machines, (\d+) faults? injected$")
    matches = [m for line in lines if (m := pattern.match(line))]
    assert len(matches) >= 3, res.stderr
    sent = [int(m.group(2)) for m in matches]
    assert sent == sorted(sent)
    assert sent[-1] > 0
    assert matches[-1].group(3) == "1"
    assert "published" in res.stdout  # the summary stays on stdout
