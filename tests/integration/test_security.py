"""TLS to the broker (CA + client certificate), HTTPS to InfluxDB, passwords from env/files, redaction."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gwproc import ROOT, GatewayProcess, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto, TlsFiles, make_password_file, make_test_ca

MQTT_SECRET = "s3cret-mqtt-pw"
INFLUX_SECRET = "s3cret-influx-pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_test_ca(tmp_path_factory.mktemp("pki"))


def test_tls_broker_https_influx_passwords(tmp_path: Path, pki: TlsFiles) -> None:
    passwd = make_password_file(tmp_path / "mq", "gateway", MQTT_SECRET)
    with Mosquitto(tmp_path / "broker", tls=pki, require_certificate=True, password_file=passwd) as broker, \
            InfluxDB1(tmp_path / "influx", tls=pki, auth=True, username="gw", password=INFLUX_SECRET) as influx:
        influx.create_database("secure")
        (tmp_path / "influx-pw").write_text(INFLUX_SECRET + "\n")
        cfg = write_config(tmp_path / "gw.toml", f"""
[gateway]
log_level = "DEBUG"
[mqtt]
host = "localhost"
port = {broker.tls_port}
client_id = "gw-tls"
username = "gateway"
[mqtt.tls]
ca_file = "{pki.ca_cert}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"
[influx]
url = "{influx.url}"
database = "secure"
username = "gw"
password_file = "{tmp_path / 'influx-pw'}"
ca_file = "{pki.ca_cert}"
flush_interval_ms = 100
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'dl.jsonl'}"
""")
        shown = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", "--show", "--config", str(cfg)],
            cwd=ROOT, capture_output=True, text=True, env={"FGW_MQTT__PASSWORD": MQTT_SECRET, "PATH": "/usr/bin"},
        )
        assert shown.returncode == 0, shown.stderr
        assert MQTT_SECRET not in shown.stdout
        assert INFLUX_SECRET not in shown.stdout
        assert '"password": "***"' in shown.stdout

        ts = int(time.time()) - 30
        with GatewayProcess(cfg, env={"FGW_MQTT__PASSWORD": MQTT_SECRET}) as gw:
            subprocess.run(
                ["mosquitto_pub", "-h", "localhost", "-p", str(broker.tls_port), "--cafile", str(pki.ca_cert),
                 "--cert", str(pki.client_cert), "--key", str(pki.client_key), "-u", "gateway", "-P", MQTT_SECRET,
                 "-q", "1", "-t", "factory/p/a/l/m1/telemetry", "-m", f'{{"ts": {ts}, "values": {{"t": 1.5}}}}'],
                check=True, timeout=20,
            )
            assert wait_until(lambda: influx.count("telemetry", "secure") == 1, timeout=20), gw.tail()
            assert gw.stop() == 0
        log = gw.log.read_text()
        assert MQTT_SECRET not in log
        assert INFLUX_SECRET not in log
        [row] = influx.query('SELECT * FROM "telemetry"', "secure")
        assert (row["t"], row["time"]) == (1.5, ts * 10**9)


def test_wrong_broker_password_is_retried_not_fatal(tmp_path: Path, influx_db: tuple[InfluxDB1, str]) -> None:
    influx, db = influx_db
    passwd = make_password_file(tmp_path / "mq", "gateway", MQTT_SECRET)
    with Mosquitto(tmp_path / "broker", password_file=passwd) as broker:
        cfg = write_config(tmp_path / "gw.toml", f"""
[mqtt]
port = {broker.port}
client_id = "gw-badpw"
username = "gateway"
password = "wrong"
reconnect_max_s = 1
[influx]
url = "{influx.url}"
database = "{db}"
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'dl.jsonl'}"
""")
        gw = GatewayProcess(cfg).start(wait_for="lost or refused")
        assert "wrong" not in gw.log.read_text()
        assert gw.stop() == 0


def test_v2_api_over_https_with_token_file(tmp_path: Path, pki: TlsFiles, mosquitto: Mosquitto) -> None:
    """`api = "v2"` through influxdb-client to an HTTPS endpoint (VictoriaMetrics) verified by our CA."""
    from tests.servers import VictoriaMetrics

    (tmp_path / "token").write_text("not-a-real-token\n")
    with VictoriaMetrics(tmp_path / "vm", tls=pki) as vm:
        cfg = write_config(tmp_path / "gw.toml", f"""
[mqtt]
port = {mosquitto.port}
client_id = "gw-v2-tls"
[influx]
api = "v2"
url = "{vm.url}"
bucket = "plant"
org = "acme"
token_file = "{tmp_path / 'token'}"
ca_file = "{pki.ca_cert}"
flush_interval_ms = 100
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'dl.jsonl'}"
""")
        ts = int(time.time()) - 30
        with GatewayProcess(cfg) as gw:
            subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t",
                            "factory/p/a/l/m9/telemetry", "-m", f'{{"ts": {ts}, "values": {{"t": 2.5}}}}'],
                           check=True, timeout=20)

            def landed() -> bool:
                return any(s["values"] == [2.5] for s in vm.export('{__name__="telemetry_t"}'))

            assert wait_until(landed, timeout=20), gw.tail()
            assert gw.stop() == 0
        assert "not-a-real-token" not in gw.log.read_text()
