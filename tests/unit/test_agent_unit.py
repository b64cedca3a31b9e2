"""deploy/systemd/factory-device-agent.service: passes `systemd-analyze verify` and keeps its hardening.

`verify` refuses a unit whose ExecStart binary does not exist, so the test verifies a copy in a temporary
directory with every Exec* binary replaced by an existing executable (the arguments stay).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "factory-device-agent.service"
STAND_IN = "/bin/true"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _verifiable_copy(tmp_path: Path) -> tuple[Path, list[str]]:
    text = UNIT.read_text()
    binaries = re.findall(r"^Exec\w+=[-@:+!]*(\S+)", text, flags=re.M)
    copy = re.sub(r"^(Exec\w+=[-@:+!]*)\S+", rf"\g<1>{STAND_IN}", text, flags=re.M)
    path = tmp_path / UNIT.name  # verify wants the real unit name (a .service suffix)
    path.write_text(copy)
    return path, binaries


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd); deploy/dev/setup.sh installs it")
    path, binaries = _verifiable_copy(tmp_path)
    assert binaries == ["/opt/factory-agent/venv/bin/factory-devices"]
    res = subprocess.run(
        [analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify reports unknown keys and bad values on stderr but still exits 0: both must be clean.
    problems = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 0, res.stderr
    assert not problems, "\n".join(problems)


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo'd key and a bad value are reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed")
    bad = tmp_path / "broken.service"
    bad.write_text(f"[Service]\nExecStart={STAND_IN}\nProtectSystm=strict\nRestart=sometimes\n")
    res = subprocess.run([analyze, "verify", "--man=no", str(bad)], capture_output=True, text=True, check=False)
    assert "Unknown key" in res.stderr
    assert "restart" in res.stderr.lower()


def test_unit_runs_the_agent_with_the_pi_config() -> None:
    d = _directives(UNIT.read_text())
    (exec_start,) = d["ExecStart"]
    assert exec_start.endswith("factory-devices agent --config /etc/factory-agent/pi-agent.toml")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("User", "factory-agent"),
        ("Group", "factory-agent"),
        ("SupplementaryGroups", "gpio i2c"),
        ("StateDirectory", "factory-agent"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
    ],
)
def test_unit_directive(key: str, value: str) -> None:
    assert _directives(UNIT.read_text()).get(key) == [value]


@pytest.mark.parametrize("key", ["PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "DynamicUser"])
def test_unit_keeps_hardware_reachable(key: str) -> None:
    """These would hide /dev/i2c-* and /dev/gpiochip* (or drop the fixed user the groups belong to)."""
    assert key not in _directives(UNIT.read_text())


def test_default_buffer_path_is_in_the_state_directory() -> None:
    from devices.agent import BufferSection

    (state_dir,) = _directives(UNIT.read_text())["StateDirectory"]
    assert BufferSection().path.parent == Path("/var/lib") / state_dir
