"""`make run` (deploy/dev/run_local.py): no child outlives the runner — terminal closed or runner killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gwproc import ROOT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["terminal-closed", "runner-killed"])
def test_children_never_outlive_the_runner(tmp_path: Path, sig: int) -> None:
    runner = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "dev" / "run_local.py"), "--state-dir", str(tmp_path / "state"),
         "--machines", "2", "--every", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
    )
    pids: list[int] = []
    try:
        assert runner.stdout is not None
        deadline = time.monotonic() + 60
        for line in runner.stdout:
            pids += [int(p) for p in re.findall(r"pid (\d+)", line)]
            if "simulator pid" in line or time.monotonic() > deadline:
                break
        assert len(pids) == 5, pids  # mosquitto, InfluxDB, gateway, simulator, Sparkplug simulator
        assert all(_alive(p) for p in pids)
        os.kill(runner.pid, sig)
        runner.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "children outlived the runner"
    finally:
        for p in pids:  # only ours, by pid
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if runner.stdout is not None:
            runner.stdout.close()
