"""The gateway's systemd unit passes ``systemd-analyze verify``; the notify protocol over a real datagram socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "factory-gateway.service"


def _verify(unit_text: str, tmp_path: Path, name: str = "factory-gateway.service") -> list[str]:
    """Problems ``systemd-analyze verify`` reports for the unit (it exits 0 on many of them, so read stderr).

    ExecStart= binaries must exist for verify: the venv path is rewritten to an existing executable.
    """
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(exe).exists():
        pytest.fail("systemd-analyze is missing; deploy/dev/setup.sh installs the 'systemd' package", pytrace=False)
    path = tmp_path / name
    path.write_text(unit_text.replace("/opt/factory-gateway/venv/bin/factory-gateway", "/bin/true"))
    proc = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if name in line or proc.returncode != 0]


def test_gateway_unit_verifies_clean(tmp_path: Path) -> None:
    assert _verify(UNIT.read_text(), tmp_path) == []


def test_the_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("WatchdogSec=30", "WatchdogSec=soon")
    problems = _verify(broken, tmp_path)
    assert any("notifyy" in p for p in problems)
    assert any("soon" in p.lower() or "Watchdog" in p for p in problems)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("StateDirectory", "factory-gateway"),
        ("EnvironmentFile", "-/etc/factory-gateway/env"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ],
)
def test_gateway_unit_has(key: str, value: str) -> None:
    assert value in _directives(UNIT.read_text()).get(key, []), f"{key}={value} missing from {UNIT.name}"


def test_watchdog_outlasts_the_ping_interval_and_stop_outlasts_the_drain() -> None:
    from gateway.config import GatewaySection

    d = _directives(UNIT.read_text())
    watchdog_s = int(d["WatchdogSec"][0])
    assert watchdog_s >= 10  # pings every watchdog/2 from the event loop: one slow batch must not kill it
    assert int(d["TimeoutStopSec"][0]) > GatewaySection().shutdown_timeout_s + 5


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notifier_sends_each_state_as_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000"})
    assert n.enabled
    assert n.watchdog_interval_s == 10.0
    assert n.ready("running:\n 5 msgs/s")
    assert _recv(sock) == ["READY=1", "STATUS=running: 5 msgs/s", f"MAINPID={os.getpid()}"]
    n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    n.status("backlog 0")
    assert _recv(sock) == ["STATUS=backlog 0"]
    n.reloading()
    reloading = _recv(sock)
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert reloading[1].removeprefix("MONOTONIC_USEC=").isdigit()
    n.stopping()
    assert _recv(sock)[0] == "STOPPING=1"
    n.close()


def test_notifier_abstract_socket() -> None:
    name = f"fgw-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.watchdog()
        assert _recv(sock) == ["WATCHDOG=1"]
    finally:
        n.close()
        sock.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ],
)
def test_watchdog_interval_from_the_environment(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env=env).watchdog_interval_s == interval


def test_notifier_without_a_manager_or_with_a_dead_socket_never_fails(tmp_path: Path) -> None:
    assert Notifier(env={}).ready("x") is False
    gone = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert gone.enabled
    assert gone.watchdog() is False
    assert gone.status("x") is False
    gone.close()


async def test_watchdog_pings_come_from_the_event_loop_so_a_stalled_loop_stops_them(tmp_path: Path) -> None:
    """A blocked event loop must starve the pings (systemd then restarts the service), not a side thread."""
    import asyncio
    import threading
    import time

    from gateway.config import GatewayConfig
    from gateway.server import Server
    from tests.servers import free_port
    from tests.unit.test_pipeline import FakeSink

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.05)
    pings: list[float] = []  # arrival times, taken by a thread: it runs while the event loop is stuck
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                if sock.recv(4096).startswith(b"WATCHDOG=1"):
                    pings.append(time.monotonic())
            except TimeoutError:
                continue

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    cfg = GatewayConfig.model_validate({
        "mqtt": {"port": free_port()},  # nothing listens: the server keeps retrying, which is fine here
        "buffer": {"dir": str(tmp_path / "wal")},
        "deadletter": {"path": str(tmp_path / "dl.jsonl")},
        "http": {"enabled": False},
        "detect": {"enabled": False},
    })
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"})
    server = Server(cfg, FakeSink(), notifier=notifier, show_status=False)
    task = asyncio.create_task(server.run())
    await asyncio.sleep(0.5)
    before = len(pings)
    stall_start = time.monotonic()
    time.sleep(1.0)  # the whole event loop is stuck here  # noqa: ASYNC251
    stall_end = time.monotonic()
    await asyncio.sleep(0.4)
    server.should_exit.set()
    await asyncio.wait_for(task, 20)
    done.set()
    receiver.join()
    sock.close()
    assert before >= 3  # every 50 ms (WATCHDOG_USEC / 2) while the loop runs
    assert not [t for t in pings if stall_start + 0.05 < t < stall_end - 0.05], "pinged while the loop was stuck"
    assert [t for t in pings if t > stall_end], "pings resume once the loop runs again"
