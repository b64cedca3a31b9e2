"""deploy/: the compose stack, the image, Grafana provisioning and the shipped mosquitto.conf.

No Docker engine runs on the test machines, so the compose file and the Dockerfile are checked as files:
everything they mount, build from and interpolate exists, the gateway config they mount validates, and
the commands they run (health checks, the simulator's arguments, the broker's start script) are run here
against real programs where that is possible. The shipped mosquitto.conf runs in a real mosquitto.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devices.cli import build_parser
from gateway.config import load_config
from tests.servers import SHIPPED_ACL, Mosquitto, make_password_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
README = ROOT / "README.md"
GRAFANA = DEPLOY / "grafana"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
START_SCRIPT = DEPLOY / "mosquitto" / "compose-start.sh"

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME
_COMPOSE_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|\$(?P<bare>[A-Za-z_]\w*)")


# --- helpers ---------------------------------------------------------------------------------------------------
def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def _strings(node: Any) -> Iterator[str]:
    """Every string of a parsed YAML document, keys included (compose interpolates both)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _variables(node: Any) -> set[str]:
    names = set()
    for text in _strings(node):
        for m in _COMPOSE_VAR.finditer(text):
            if m.group(0) != "$$":
                names.add(m.group("braced") or m.group("bare"))
    return names


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution applied to a parsed document."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        value, op, arg = env.get(name), m.group("op"), m.group("arg")
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise AssertionError(f"compose would stop: ${{{name}}} unset: {arg}")
        if (op == ":-" and not value) or (op == "-" and value is None):
            return str(arg)
        return value or ""

    if isinstance(node, str):
        return _COMPOSE_VAR.sub(one, node)
    if isinstance(node, dict):
        return {_interpolate(k, env): _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    return node


def _compose_raw() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _compose() -> dict[str, Any]:
    """The compose file as compose sees it with deploy/.env = .env.example."""
    doc: dict[str, Any] = _interpolate(_compose_raw(), _env_example())
    return doc


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source (a path relative to deploy/, or a named volume) of a service's volumes."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def _install_commands() -> list[str]:
    commands = []
    for word, args in _dockerfile():
        if word == "RUN":
            commands.extend(c.strip() for c in args.split("&&") if re.search(r"\bpip\b|\bvenv\b|\binstall\b", c))
    return commands


def _healthcheck_cmd() -> list[str]:
    [args] = [a for w, a in _dockerfile() if w == "HEALTHCHECK"]
    cmd: list[str] = json.loads(args.partition("CMD ")[2])
    return cmd


# --- compose -----------------------------------------------------------------------------------------------------
def test_compose_parses_with_every_service_from_an_image_or_a_build() -> None:
    services = _compose()["services"]
    assert set(services) >= {"mosquitto", "influxdb", "grafana", "gateway", "simulator"}
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"service {name}: neither image nor build"
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["influxdb"]["image"].startswith("influxdb:2.7")
    assert services["grafana"]["image"].startswith("grafana/grafana-oss")
    for name in ("gateway", "simulator"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["image"] == services["gateway"]["image"], "one image for gateway and simulator"


def test_everything_compose_mounts_or_builds_from_exists() -> None:
    doc = _compose()
    declared = set(doc.get("volumes") or {})
    binds = 0
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile missing"
        for target, source in _mounts(svc).items():
            assert target.startswith("/"), f"{name}: mount target {target!r} is not absolute"
            if _is_bind(source):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: mounts {source} (deploy/{source}), which does not exist"
                assert ROOT in path.parents, f"{name}: mounts {path}, outside the repository"
                binds += 1
            else:
                assert source in declared, f"{name}: named volume {source!r} not declared under volumes:"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in doc["services"], f"{name}: depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                check = doc["services"][dep].get("healthcheck")
                image_check = doc["services"][dep].get("build") and any(w == "HEALTHCHECK" for w, _ in _dockerfile())
                assert check or image_check, f"{name} waits for {dep} to be healthy, which has no healthcheck"
                assert not (check or {}).get("disable"), f"{dep}: healthcheck disabled"
    assert binds >= 5


def test_every_compose_variable_is_in_env_example_and_commented() -> None:
    used = _variables(_compose_raw())
    listed = _env_example()
    assert used, "the compose file uses no variables?"
    assert used - set(listed) == set(), "add to deploy/.env.example"
    assert set(listed) - used == set(), "listed in deploy/.env.example but unused"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            j = i - 1
            while j >= 0 and lines[j].strip() and not lines[j].startswith("#"):
                j -= 1  # a group of related variables shares the comment above it
            assert j >= 0, f".env.example: {line!r} has no comment"
            assert lines[j].startswith("#"), f".env.example: {line!r} has no comment"


def test_compose_gateway_config_validates_and_matches_the_stack(tmp_path: Path) -> None:
    services = _compose()["services"]
    gw = services["gateway"]
    command = gw["command"]
    container_path = command[command.index("--config") + 1]
    mounts = _mounts(gw)
    config = DEPLOY / mounts[container_path]
    env = _environment(gw)
    cfg = load_config(config, env=env)
    example = _env_example()

    assert cfg.mqtt.host == "mosquitto"
    assert cfg.mqtt.port == 1883
    assert (cfg.mqtt.username, cfg.mqtt.password and cfg.mqtt.password.get_secret_value()) == (
        example["MQTT_GATEWAY_USER"], example["MQTT_GATEWAY_PASSWORD"])
    influx_env = _environment(services["influxdb"])
    url = urlparse(cfg.influx.url)
    assert (cfg.influx.api, url.hostname, url.port) == ("v2", "influxdb", 8086)
    assert cfg.influx.token is not None
    assert cfg.influx.token.get_secret_value() == influx_env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert cfg.influx.org == influx_env["DOCKER_INFLUXDB_INIT_ORG"]
    assert cfg.influx.bucket == influx_env["DOCKER_INFLUXDB_INIT_BUCKET"]
    state = [t for t, s in mounts.items() if not _is_bind(s)]
    assert state == ["/var/lib/factory-gateway"], "the image's state volume"
    for path in (cfg.buffer.dir, cfg.deadletter.path):
        assert Path(state[0]) in Path(path).parents, f"{path} is not on the state volume"
    host, port = cfg.http.address
    assert host == "0.0.0.0", "the published port and the other containers need every interface"
    assert any(p.endswith(f":{port}") for p in gw["ports"]), f"port {port} not published"
    [default_url] = re.findall(r"https?://[^'\"\s]+", _healthcheck_cmd()[-1])
    assert urlparse(default_url).port == port, "the image's HEALTHCHECK polls another port"

    cli = Path(sys.executable).with_name("factory-gateway")
    r = subprocess.run([str(cli), "check-config", "--config", str(config)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_compose_simulator_arguments_parse() -> None:
    services = _compose()["services"]
    sim = services["simulator"]
    assert sim["entrypoint"] == ["factory-devices"]
    args = build_parser().parse_args(sim["command"])
    assert args.command == "simulate"
    assert (args.broker.host, args.broker.port) == ("mosquitto", 1883)
    assert args.username == _env_example()["MQTT_DEVICES_USER"]
    assert _environment(sim)["FGW_DEVICES_PASSWORD"] == _env_example()["MQTT_DEVICES_PASSWORD"]
    assert args.faults, "the simulator injects faults so the dashboard shows anomalies"


# --- the image ---------------------------------------------------------------------------------------------------
def test_dockerfile_install_commands_are_the_readmes() -> None:
    commands = _install_commands()
    assert any("pip install" in c for c in commands), commands
    readme = README.read_text()
    for c in commands:
        assert c in readme, f"README.md does not show the Dockerfile's install command: {c}"


def test_dockerfile_builds_from_existing_files_and_runs_unprivileged() -> None:
    instructions = _dockerfile()
    froms = [a for w, a in instructions if w == "FROM"]
    assert froms
    assert all(a.startswith("python:3.11-slim") for a in froms)
    for w, a in instructions:
        if w == "COPY" and not a.startswith("--from"):
            for src in shlex.split(a)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context (the repository root)"
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    assert users, "no USER in the final stage: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(w == "RUN" and re.search(rf"useradd .*\b{re.escape(user)}\b", a) for w, a in final), user
    assert ("ENTRYPOINT", '["factory-gateway"]') in final
    volumes = [json.loads(a) if a.startswith("[") else a.split() for w, a in final if w == "VOLUME"]
    assert ["/var/lib/factory-gateway"] in volumes
    assert "/healthz" in " ".join(_healthcheck_cmd())


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_dockerfile_healthcheck_command_passes_and_fails() -> None:
    """The HEALTHCHECK one-liner, run here: 0 on 200 from /healthz, non-zero on 503 and on a refused port."""
    cmd = _healthcheck_cmd()
    assert cmd[0] == "python"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"

    def check() -> int:
        env = {**os.environ, "HEALTHCHECK_URL": url}
        return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30).returncode

    try:
        assert check() == 0
        _Health.status = 503
        assert check() != 0
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
        thread.join()
    assert check() != 0  # nothing listens any more


# --- Grafana provisioning ----------------------------------------------------------------------------------------
def test_grafana_provisioning_parses_and_points_at_the_dashboard() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = {t: DEPLOY / s for t, s in _mounts(grafana).items() if _is_bind(s)}
    provisioning = GRAFANA / "provisioning"
    assert mounts["/etc/grafana/provisioning"].resolve() == provisioning.resolve()

    dashboards = yaml.safe_load((provisioning / "dashboards" / "factory.yaml").read_text())
    found = []
    for provider in dashboards["providers"]:
        assert provider["type"] == "file"
        path = provider["options"]["path"].rstrip("/")
        files = [src for target, src in mounts.items() if target == path or target.startswith(path + "/")]
        assert files, f"provider {provider['name']}: nothing mounted at {path}"
        for src in files:
            found.extend([src] if src.is_file() else src.glob("*.json"))
    assert [p.resolve() for p in found] == [(GRAFANA / "factory-gateway.json").resolve()]
    dashboard = json.loads(found[0].read_text())
    assert dashboard["uid"]

    [ds] = yaml.safe_load((provisioning / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert ds["type"] == "influxdb"
    assert ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"
    assert urlparse(ds["url"]).hostname == "influxdb"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {ds["uid"]}, "every panel and variable uses the provisioned datasource"
    # Grafana expands ${VAR} in provisioning files from its environment: compose must pass each one.
    env = _environment(grafana)
    used = _variables(ds)
    assert used >= {"INFLUX_TOKEN", "INFLUX_BUCKET"}
    assert used <= set(env), f"not in the grafana service's environment: {used - set(env)}"
    assert env["INFLUX_BUCKET"] == _environment(_compose()["services"]["influxdb"])["DOCKER_INFLUXDB_INIT_BUCKET"]


# --- mosquitto -----------------------------------------------------------------------------------------------------
def _sed_expressions() -> list[str]:
    return re.findall(r"-e '([^']*)'", START_SCRIPT.read_text())


def test_compose_start_script_changes_only_listener_and_paths_and_drops_the_acl() -> None:
    """Each sed expression of compose-start.sh (run by the real sed) changes exactly one shipped line, or
    deletes the acl_file line."""
    shipped = MOSQUITTO_CONF.read_text()
    lines = shipped.splitlines()
    expressions = _sed_expressions()
    assert len(expressions) == 4
    for expr in expressions:
        out = subprocess.run(["sed", "-e", expr], input=shipped, capture_output=True, text=True, check=True).stdout
        if expr.endswith("/d"):
            kept = out.splitlines()
            assert len(kept) == len(lines) - 1, f"sed {expr!r} deleted {len(lines) - len(kept)} lines"
            assert [line for line in lines if line not in kept] == ["acl_file /etc/mosquitto/acl"]
            continue
        changed = [a for a, b in zip(lines, out.splitlines(), strict=True) if a != b]
        assert len(changed) == 1, f"sed {expr!r} changed {changed}"
    args = [a for e in expressions for a in ("-e", e)]
    conf = subprocess.run(["sed", *args], input=shipped, capture_output=True, text=True, check=True).stdout
    assert re.search(r"^listener 1883$", conf, re.M), "the plain listener faces the compose network"
    assert re.search(r"^acl_file ", shipped, re.M)
    assert not re.search(r"^acl_file ", conf, re.M), "the simulator's one devices user would be refused"
    mosquitto = _compose()["services"]["mosquitto"]
    mounts = _mounts(mosquitto)
    assert (DEPLOY / mounts["/etc/mosquitto/mosquitto.conf"]).resolve() == MOSQUITTO_CONF.resolve()
    assert mosquitto["command"][-1] in mounts, "the start script is mounted where the command runs it"
    assert (DEPLOY / mounts[mosquitto["command"][-1]]).resolve() == START_SCRIPT.resolve()
    [persistence] = re.findall(r"^persistence_location (\S+)", conf, re.M)
    assert mounts[persistence.rstrip("/")] in _compose()["volumes"], "mosquitto.db on a named volume"
    [passwd] = re.findall(r"^password_file (\S+)", conf, re.M)
    assert f"mosquitto_passwd -c -b {passwd} " in START_SCRIPT.read_text()


class ShippedMosquitto(Mosquitto):
    """deploy/mosquitto/mosquitto.conf with only the listener port and the file paths swapped (acl: the repo's)."""

    def _write_config(self) -> None:
        assert self.password_file is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        text = MOSQUITTO_CONF.read_text()
        for old, new in {
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            "password_file /etc/mosquitto/passwd": f"password_file {self.password_file}",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.data_dir}/",
            "acl_file /etc/mosquitto/acl": f"acl_file {SHIPPED_ACL}",
        }.items():
            assert text.count(old) == 1, f"shipped config no longer has {old!r}"
            text = text.replace(old, new)
        if os.geteuid() == 0:
            text += "\nuser root\n"  # else, as root, it switches to 'mosquitto' and loses the temp dir
        self.config_path.write_text(text)


def _connect(port: int, client_id: str, *, username: str | None = None, password: str | None = None,
             clean: bool = True, on_message: Any = None) -> tuple[mqtt.Client, ReasonCode]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                         protocol=mqtt.MQTTv311, manual_ack=True)
    done = threading.Event()
    result: list[ReasonCode] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        result.append(reason)
        done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    if username is not None:
        client.username_pw_set(username, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert done.wait(5), "no CONNACK"
    return client, result[0]


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.mark.integration
def test_shipped_mosquitto_conf_in_a_real_broker(tmp_path: Path) -> None:
    """Passwords required; the compose healthcheck works; queued QoS 1 messages beyond mosquitto's defaults
    (1000 queued, 20 in flight for MQTT 3.1.1) survive a restart and all arrive before any ack."""
    passwd = make_password_file(tmp_path, "gateway", "s3cret")
    with ShippedMosquitto(tmp_path / "broker", password_file=passwd) as broker:
        ok, rc = _connect(broker.port, "deploy-ok", username="gateway", password="s3cret")
        assert not rc.is_failure
        _close(ok)
        for user, password in ((None, None), ("gateway", "wrong")):
            refused, rc = _connect(broker.port, "deploy-refused", username=user, password=password)
            assert rc.is_failure, f"{user!r} was let in"
            _close(refused)

        [kind, health] = _compose()["services"]["mosquitto"]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        assert "-p 1883 " in health
        health = health.replace("-p 1883 ", f"-p {broker.port} ")
        for password, expected_ok in (("s3cret", True), ("wrong", False)):
            env = {**os.environ, "MQTT_GATEWAY_USER": "gateway", "MQTT_GATEWAY_PASSWORD": password}
            r = subprocess.run(["sh", "-c", health], env=env, capture_output=True, text=True, timeout=20)
            assert (r.returncode == 0) is expected_ok, f"healthcheck with {password!r}: {r.returncode} {r.stderr}"

        sub, rc = _connect(broker.port, "deploy-sub", username="gateway", password="s3cret", clean=False)
        # A topic the shipped acl lets the gateway user write (NCMD) and read.
        sub.subscribe("spBv1.0/deploy/NCMD/#", qos=1)
        time.sleep(0.3)
        _close(sub)
        n = 1500
        pub, rc = _connect(broker.port, "deploy-pub", username="gateway", password="s3cret")
        infos = [pub.publish("spBv1.0/deploy/NCMD/x", str(i).encode(), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(timeout=30)
        _close(pub)
        broker.restart()  # a clean stop saves mosquitto.db; the queue must come back from it
        got: set[bytes] = set()
        lock = threading.Lock()

        def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with lock:
                got.add(bytes(msg.payload))  # never acked: everything here is in flight at once

        sub, rc = _connect(broker.port, "deploy-sub", username="gateway", password="s3cret", clean=False,
                           on_message=on_message)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(got) < n:
            time.sleep(0.05)
        _close(sub)
    assert len(got) == n, f"{len(got)} of {n} queued messages delivered without acks"
    assert "Error" not in broker.log_path.read_text()
