"""GatewayConfig / load_config: defaults, dotted-key errors, env overrides, secrets, subscriptions, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_fgw_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the test runner's own FGW_* variables out of every test."""
    for key in list(os.environ):
        if key.startswith("FGW_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env or {})
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


class TestDefaults:
    def test_no_file(self) -> None:
        cfg = load_config(None, env={})
        assert cfg.influx.url == "http://127.0.0.1:8086"
        assert cfg.influx.batch_size == 5000
        assert cfg.influx.token is None
        assert cfg.mqtt.port == 1883
        assert cfg.mqtt.topic_template == "factory/{site}/{area}/{line}/{machine}/{channel}"
        assert cfg.gateway.max_payload_bytes == 1_048_576
        (sub,) = cfg.mqtt.subscriptions()
        assert (sub.topic, sub.qos, sub.format) == ("factory/+/+/+/+/+", 1, "auto")

    def test_empty_file(self, tmp_path: Path) -> None:
        cfg = load_config(write(tmp_path, ""), env={})
        assert cfg == load_config(None, env={})

    def test_file_values(self, tmp_path: Path) -> None:
        cfg = load_config(
            write(tmp_path, '[influx]\nurl = "https://db:8086/"\nbatch_size = 100\n[mqtt]\nhost = "broker"\n'),
            env={},
        )
        assert cfg.influx.url == "https://db:8086"  # trailing slash dropped
        assert cfg.influx.batch_size == 100
        assert cfg.mqtt.host == "broker"


class TestErrors:
    @pytest.mark.parametrize(
        ("toml", "expected"),
        [
            ('[influx]\nurl = "ftp://db"\n', "influx.url: must start with http:// or https://, got 'ftp://db'"),
            ("[mqtt]\nport = 70000\n", "mqtt.port: Input should be less than or equal to 65535"),
            ("[mqtt]\nport = 0\n", "mqtt.port: Input should be greater than or equal to 1"),
            ('[mqtt]\nport = "x"\n', "mqtt.port: Input should be a valid integer"),
            ("[influx]\nfoo = 1\n", "influx.foo: unknown key"),
            ("[bogus]\nx = 1\n", "bogus: unknown key"),
            ("[influx]\nbatch_size = 0\n", "influx.batch_size: Input should be greater than or equal to 1"),
            ('[influx]\napi = "v3"\n', "influx.api: Input should be 'v1' or 'v2'"),
            ("[mqtt]\nqos = 3\n", "mqtt.qos: Input should be 0, 1 or 2"),
            ("[gateway]\nmax_payload_bytes = 10\n", "gateway.max_payload_bytes: Input should be greater than or equal"),
            ('[gateway]\nlog_level = "TRACE"\n', "gateway.log_level: Input should be"),
        ],
    )
    def test_error_names_dotted_key(self, tmp_path: Path, toml: str, expected: str) -> None:
        (line,) = problems(tmp_path, toml)
        assert line.startswith(expected)

    def test_unknown_key_hint(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, "[influx]\nfoo = 1\n")
        assert line == "influx.foo: unknown key (check spelling; see configs/gateway.example.toml)"

    def test_several_problems_at_once(self, tmp_path: Path) -> None:
        found = problems(tmp_path, '[influx]\nurl = "ftp://x"\nfoo = 1\n[mqtt]\nport = 70000\n')
        assert len(found) == 3
        assert {line.split(":")[0] for line in found} == {"influx.url", "influx.foo", "mqtt.port"}

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "nope.toml", env={})
        assert info.value.problems == [f"(file): {tmp_path / 'nope.toml'} does not exist"]

    def test_invalid_toml(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, "x = [")
        assert line.startswith("(file): ")
        assert "is not valid TOML" in line

    def test_tls_missing_file_names_key(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, f'[mqtt.tls]\nca_file = "{tmp_path / "ca.pem"}"\n')
        assert line.startswith("mqtt.tls")
        assert "ca_file" in line
        assert "does not exist" in line

    def test_tls_cert_without_key(self, tmp_path: Path) -> None:
        cert = write(tmp_path, "x", "cert.pem")
        (line,) = problems(tmp_path, f'[mqtt.tls]\ncert_file = "{cert}"\n')
        assert line.startswith("mqtt.tls")
        assert "cert_file and key_file must be given together" in line


class TestEnvironment:
    def test_env_beats_file(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[influx]\nbatch_size = 100\ntoken = "from-file"\nurl = "http://db:8086"\n')
        cfg = load_config(path, env={"FGW_INFLUX__TOKEN": "from-env", "FGW_INFLUX__BATCH_SIZE": "250"})
        assert cfg.influx.batch_size == 250
        assert cfg.influx.token is not None
        assert cfg.influx.token.get_secret_value() == "from-env"
        assert cfg.influx.url == "http://db:8086"  # the rest of the section still comes from the file

    def test_env_alone(self) -> None:
        cfg = load_config(None, env={"FGW_MQTT__PORT": "8883", "FGW_GATEWAY__MAX_SERIES": "7"})
        assert (cfg.mqtt.port, cfg.gateway.max_series) == (8883, 7)

    def test_bad_env_value_names_key(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, "[influx]\nbatch_size = 100\n", env={"FGW_INFLUX__BATCH_SIZE": "lots"})
        assert line.startswith("influx.batch_size: Input should be a valid integer")

    def test_process_environment_restored(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FGW_INFLUX__BATCH_SIZE", "33")
        assert load_config(None, env={}).influx.batch_size == 5000
        assert os.environ["FGW_INFLUX__BATCH_SIZE"] == "33"
        assert load_config(None).influx.batch_size == 33


class TestSecrets:
    def test_token_file(self, tmp_path: Path) -> None:
        secret = write(tmp_path, "s3cret-token\n", "token")
        cfg = load_config(write(tmp_path, f'[influx]\ntoken_file = "{secret}"\n'), env={})
        assert cfg.influx.token is not None
        assert cfg.influx.token.get_secret_value() == "s3cret-token"

    def test_password_files(self, tmp_path: Path) -> None:
        mqtt_pw = write(tmp_path, "mqtt-pw\n", "mqtt_pw")
        influx_pw = write(tmp_path, "  influx-pw  ", "influx_pw")
        cfg = load_config(
            write(tmp_path, f'[mqtt]\npassword_file = "{mqtt_pw}"\n[influx]\npassword_file = "{influx_pw}"\n'),
            env={},
        )
        assert cfg.mqtt.password is not None
        assert cfg.mqtt.password.get_secret_value() == "mqtt-pw"
        assert cfg.influx.password is not None
        assert cfg.influx.password.get_secret_value() == "influx-pw"

    @pytest.mark.parametrize(("section", "key"), [("influx", "token_file"), ("mqtt", "password_file")])
    def test_missing_secret_file_names_key(self, tmp_path: Path, section: str, key: str) -> None:
        missing = tmp_path / "missing"
        (line,) = problems(tmp_path, f'[{section}]\n{key} = "{missing}"\n')
        assert line.startswith(section)
        assert key in line
        assert f"cannot read {missing}" in line

    def test_missing_secret_file_dotted_key(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, f'[influx]\ntoken_file = "{tmp_path / "missing"}"\n')
        assert line.startswith("influx.token_file: ")

    def test_redacted_hides_secrets(self, tmp_path: Path) -> None:
        secret = write(tmp_path, "tok-from-file", "token")
        cfg = load_config(
            write(tmp_path, f'[influx]\ntoken_file = "{secret}"\npassword = "influx-pw"\n'),
            env={"FGW_MQTT__PASSWORD": "mqtt-pw"},
        )
        data = cfg.redacted()
        assert data["influx"]["token"] == "***"
        assert data["influx"]["password"] == "***"
        assert data["mqtt"]["password"] == "***"
        text = json.dumps(data)
        for value in ("tok-from-file", "influx-pw", "mqtt-pw"):
            assert value not in text
        assert "tok-from-file" not in repr(cfg)
        assert data["influx"]["url"] == "http://127.0.0.1:8086"

    def test_redacted_without_secrets(self) -> None:
        data = load_config(None, env={}).redacted()
        assert data["influx"]["token"] is None
        assert data["mqtt"]["password"] is None


class TestSubscriptions:
    def test_strings_and_tables(self, tmp_path: Path) -> None:
        cfg = load_config(
            write(
                tmp_path,
                "[mqtt]\nqos = 0\n"
                'topics = ["a/#", {topic = "b/+/x", qos = 2, format = "line"}, {topic = "c/+", format = "json"}]\n',
            ),
            env={},
        )
        subs = [(s.topic, s.qos, s.format) for s in cfg.mqtt.subscriptions()]
        assert subs == [("a/#", 0, "auto"), ("b/+/x", 2, "line"), ("c/+", 0, "json")]

    @pytest.mark.parametrize(
        ("topic", "message"),
        [
            ("a/#/b", "'#' must be a whole last level"),
            ("a/b#", "'#' must be a whole last level"),
            ("a/x+/b", "'+' must be a whole level"),
            ("", "topic filter is empty"),
        ],
    )
    def test_bad_table_filter(self, tmp_path: Path, topic: str, message: str) -> None:
        found = problems(tmp_path, f'[mqtt]\ntopics = [{{topic = "{topic}"}}]\n')
        assert any(line.startswith("mqtt.topics.0") and message in line for line in found), found

    def test_bad_table_format(self, tmp_path: Path) -> None:
        found = problems(tmp_path, '[mqtt]\ntopics = [{topic = "a/#", format = "xml"}]\n')
        assert any(line.startswith("mqtt.topics.0") and "format" in line for line in found), found

    def test_bad_string_filter_refused_at_load(self, tmp_path: Path) -> None:
        found = problems(tmp_path, '[mqtt]\ntopics = ["factory/#/x"]\n')
        assert any(line.startswith("mqtt.topics.0") and "'#' must be a whole last level" in line for line in found)


class TestTopicTemplate:
    def test_custom_template_ok(self) -> None:
        cfg = GatewayConfig.model_validate(
            {"mqtt": {"topic_template": "plant/{site}/x/{area}/{line}/{machine}/{channel}"}}
        )
        assert cfg.mqtt.topic_template.startswith("plant/")

    def test_missing_placeholder(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, '[mqtt]\ntopic_template = "f/{site}/{area}/{line}/{channel}"\n')
        assert line == "mqtt.topic_template: template must contain {machine}"

    def test_several_missing(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, '[mqtt]\ntopic_template = "f/{site}/{line}"\n')
        assert line == "mqtt.topic_template: template must contain {area}, {machine}, {channel}"

    def test_unknown_placeholder(self, tmp_path: Path) -> None:
        (line,) = problems(tmp_path, '[mqtt]\ntopic_template = "f/{site}/{area}/{line}/{machine}/{cell}/{channel}"\n')
        assert line.startswith("mqtt.topic_template: unknown placeholder(s) ['cell']")


class TestCli:
    GOOD = '[influx]\nurl = "http://db:8086"\n[mqtt]\nport = 1884\n'
    BAD = '[influx]\nurl = "ftp://x"\nfoo = 1\n[mqtt]\nport = 70000\n'

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FGW_")}
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def test_subprocess_ok(self, tmp_path: Path) -> None:
        proc = self._run("check-config", "--config", str(write(tmp_path, self.GOOD)))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "ok"

    def test_subprocess_problems(self, tmp_path: Path) -> None:
        proc = self._run("check-config", "--config", str(write(tmp_path, self.BAD)))
        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().split("\n")
        assert len(lines) == 3
        assert {line.split(":")[0] for line in lines} == {"influx.url", "influx.foo", "mqtt.port"}

    def test_main_ok(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", "--config", str(write(tmp_path, self.GOOD))]) == 0
        assert capsys.readouterr().out.strip() == "ok"

    def test_main_problems(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", "--config", str(write(tmp_path, self.BAD))]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.strip().split("\n")) == 3

    def test_main_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", "--config", str(tmp_path / "none.toml")]) == 2
        assert capsys.readouterr().err.strip() == f"(file): {tmp_path / 'none.toml'} does not exist"

    def test_main_show_redacts(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = write(tmp_path, self.GOOD.replace("[mqtt]", 'token = "very-secret"\n[mqtt]'))
        assert main(["check-config", "--config", str(path), "--show"]) == 0
        out = capsys.readouterr().out
        assert "very-secret" not in out
        settings = json.loads(out[: out.rindex("ok")])
        assert settings["influx"]["token"] == "***"
        assert settings["mqtt"]["port"] == 1884
        assert out.rstrip().endswith("ok")


@pytest.mark.parametrize(
    ("proc", "files", "cap"),
    [
        ("0::/\n", {}, None),  # v2, no quota anywhere
        ("0::/a/b\n", {"a/b/cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ("0::/a/b\n", {"a/b/cpu.max": "50000 100000\n"}, 1),  # v2, half a CPU: rounded up
        ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}, 1),  # a parent's quota
        ("4:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "100000\n",
                                       "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ("4:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "-1\n",
                                       "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, None),  # v1, none
        ("0::/a\n", {"a/cpu.max": "garbage\n"}, None),  # unreadable: ignored
    ],
)
def test_usable_cpus_honours_a_cgroup_cpu_quota(
    tmp_path: Path, proc: str, files: dict[str, str], cap: int | None
) -> None:
    """`[detect] threads = 0` counts the CPUs a container or a systemd CPUQuota= leaves the process, not the
    host's: affinity capped by the cgroup quota of the process's cgroup or an ancestor."""
    from gateway.detect.config import usable_cpus

    (tmp_path / "self").write_text(proc)
    for rel, text in files.items():
        f = tmp_path / "root" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (tmp_path / "root").mkdir(exist_ok=True)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "root", tmp_path / "self") == (affinity if cap is None else min(cap, affinity))
