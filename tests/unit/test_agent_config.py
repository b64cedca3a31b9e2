"""Pi agent config: errors name the key, optional Pi packages, and configs/pi-agent.toml documents every key."""

from __future__ import annotations

import re
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from devices.agent import AgentConfig, AgentConfigError, load_config, run_agent
from devices.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "configs" / "pi-agent.toml"
DEVICE = '[device]\nsite = "s"\narea = "a"\nline = "l"\nmachine = "m"\n'


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[sensors.bme280]\naddress = 0x42\n", "sensors.bme280.address: must be 0x76 (SDO to GND) or 0x77"),
        ("[sensors.bme280]\naddress = 0x42\n", "got 0x42"),
        ("[sensors.bme280]\nadress = 0x76\n", "sensors.bme280.adress: unknown key"),
        ("[sensors.bme280]\nmode = \"sometimes\"\n", "sensors.bme280.mode: Input should be 'forced' or 'normal'"),
        ("[sensors.bme280]\noversampling = 3\n", "sensors.bme280.oversampling: must be one of 1, 2, 4, 8, 16"),
        ("[sensors.bme280]\nfilter = 1\n", "sensors.bme280.filter: must be one of 0, 2, 4, 8, 16"),
        ("[sensors.bme280]\nstandby_ms = 300\n", "sensors.bme280.standby_ms: must be one of 0.5, 62.5, 125"),
        ("[sensors.bme280]\nprefix = \"_x\"\n", "sensors.bme280.prefix: metric name '_xpressure_hpa' starts with '_'"),
        ("[sensors.bme280]\nbus = -1\n", "sensors.bme280.bus"),
        ("[sensors]\nw1_names = { \"10-abc\" = \"x_c\" }\n", "sensors.w1_names: '10-abc' is not a DS18B20 id"),
        ("[sensors]\nw1_names = { \"28-abc\" = \"\" }\n", "sensors.w1_names: 28-abc: metric name is empty"),
        ("[sensors]\ncpu_temp_path = \"/x\"\n", "sensors: cpu_temp_path is now called thermal_dir"),
        ("[sensors]\nw1_glob = \"/x\"\n", "w1_glob is now called w1_dir"),
        ("[sensors]\nthermal = \"maybe\"\n", "sensors.thermal: Input should be a valid boolean"),
        ("[counter]\nreject_pin = 27\n", "counter.pin: Field required"),
        ("[counter]\npin = 40\n", "counter.pin: Input should be less than or equal to 27"),
        ("[counter]\npin = 17\nreject_pin = 17\n", "counter.reject_pin: must differ from counter.pin (both GPIO17)"),
        ("[counter]\npin = 17\nbounce_s = 2\n", "counter.bounce_s"),
        ("[counter]\npin = 17\ninterval_s = 0\n", "counter.interval_s"),
        ("[buffer]\nmax_mb = 0\n", "buffer.max_mb: Input should be greater than 0"),
        ("[buffer]\nsize = 1\n", "buffer.size: unknown key"),
        ("[mqtt]\nqos = 0\n", "mqtt.qos: Input should be greater than or equal to 1"),
        ("[mqtt]\nreconnect_max_s = 0\n", "mqtt.reconnect_max_s"),
        ("[mqtt]\nbroker = \"host:99999\"\n", "mqtt.broker: bad broker port"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "pi-agent.toml"
    path.write_text(DEVICE + body)
    with pytest.raises(AgentConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("module", "body", "key"),
    [("smbus2", "[sensors.bme280]\n", "sensors.bme280"), ("gpiozero", "[counter]\npin = 17\n", "counter")],
)
def test_missing_pi_package_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, body: str, key: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    path = tmp_path / "pi-agent.toml"
    path.write_text(DEVICE + body)
    with pytest.raises(AgentConfigError) as exc:
        load_config(path)
    assert f"{key}: needs the {module} package, which is not installed: pip install 'factory-gateway[pi]'" in str(
        exc.value
    )
    path.write_text(DEVICE)  # not configured: not needed
    load_config(path)


def test_cli_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pi-agent.toml"
    path.write_text(DEVICE + "[sensors.bme280]\naddress = 0x42\n")
    assert main(["agent", "--config", str(path)]) == 2
    assert "sensors.bme280.address: must be 0x76" in capsys.readouterr().err


def test_unusable_buffer_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-a-dir").write_text("")
    path = tmp_path / "pi-agent.toml"
    path.write_text(DEVICE + f'[buffer]\npath = "{tmp_path / "not-a-dir" / "q.db"}"\n')
    assert main(["agent", "--config", str(path)]) == 2
    assert "buffer.path: cannot open" in capsys.readouterr().err
    with pytest.raises(AgentConfigError, match=r"buffer\.path"):
        run_agent(load_config(path), threading.Event())


# -- configs/pi-agent.toml ------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is None:
            out.add(prefix + name)
        else:
            out |= _keys(sub, f"{prefix}{name}.")
    return out


def _uncommented(text: str) -> str:
    """The sample with every commented-out section header and ``key = value`` line switched on."""
    line = re.compile(r"^# ?(\[[a-z0-9_.]+\]|[a-z0-9_]+ *=.*)$")
    return "\n".join(m.group(1) if (m := line.match(raw)) else raw for raw in text.splitlines())


def test_sample_config_loads_with_the_defaults() -> None:
    cfg = load_config(SAMPLE)
    assert cfg.device.machine == "pi01"
    assert cfg.sensors.bme280 is None
    assert cfg.counter is None
    defaults = AgentConfig.model_validate({"device": cfg.device.model_dump()})
    assert cfg == defaults, "active values in configs/pi-agent.toml must equal the models' defaults"


def test_sample_config_names_every_key() -> None:
    full = tomllib.loads(_uncommented(SAMPLE.read_text()))

    def flatten(d: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and k != "w1_names":
                out |= flatten(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    assert flatten(full) == _keys(AgentConfig)


def test_sample_config_with_everything_switched_on_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "all.toml"
    path.write_text(_uncommented(SAMPLE.read_text()))
    cfg = load_config(path)
    assert cfg.sensors.bme280 is not None
    assert cfg.sensors.bme280.address == 0x76
    assert cfg.counter is not None
    assert (cfg.counter.pin, cfg.counter.reject_pin) == (17, 27)
    assert cfg.mqtt.username == "pi01"


def test_every_key_has_a_comment() -> None:
    for raw in _uncommented(SAMPLE.read_text()).splitlines():
        if re.match(r"^[a-z0-9_]+ *=", raw):
            assert "#" in raw, f"configs/pi-agent.toml: no comment on {raw!r}"
