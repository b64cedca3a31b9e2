"""The test-server library itself: each server starts, takes writes, reads back, restarts, and cleans up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.servers import (
    SHIPPED_ACL,
    InfluxDB1,
    Mosquitto,
    ServerError,
    TlsFiles,
    VictoriaMetrics,
    free_port,
    make_password_file,
    make_test_ca,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000_000_000  # a fixed ns timestamp, well inside VictoriaMetrics' 100y retention


# ----------------------------------------------------------------------------------------------------------
# a tiny blocking MQTT client for the tests
# ----------------------------------------------------------------------------------------------------------
class Client:
    """paho in a background loop; records CONNACK and received payloads."""

    def __init__(
        self, port: int, *, client_id: str = "", clean_session: bool = True, tls: TlsFiles | None = None,
        client_cert: bool = False, username: str | None = None, password: str | None = None,
    ) -> None:
        self.connected = threading.Event()
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self.port = port
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            self.paho.tls_set(
                ca_certs=str(tls.ca_cert),
                certfile=str(tls.client_cert) if client_cert else None,
                keyfile=str(tls.client_key) if client_cert else None,
            )
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, props: object) -> None:
        self.connack = reason
        self.session_present = flags.session_present
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(bytes(msg.payload))

    def connect(self, timeout: float = 5) -> ReasonCode:
        self.paho.connect("localhost", self.port, keepalive=30)
        self.paho.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

    def wait_messages(self, n: int, timeout: float = 10) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.01)
        with self._lock:
            return list(self.messages)


def mosquitto_pub(
    port: int, topic: str, message: str, tls: TlsFiles, *, client_cert: bool
) -> subprocess.CompletedProcess[str]:
    cert = ["--cert", str(tls.client_cert), "--key", str(tls.client_key)] if client_cert else []
    return subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(port), "--cafile", str(tls.ca_cert), *cert,
         "-q", "1", "-t", topic, "-m", message],
        capture_output=True, text=True, timeout=10, check=False,
    )


def publish_qos1(port: int, topic: str, payloads: list[bytes]) -> None:
    pub = Client(port)
    assert pub.connect() == 0
    infos = [pub.paho.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(timeout=10)
    pub.close()


# ----------------------------------------------------------------------------------------------------------
# mosquitto
# ----------------------------------------------------------------------------------------------------------
def test_mosquitto_round_trip(mosquitto: Mosquitto) -> None:
    topic = f"test/{uuid.uuid4().hex}"
    sub = Client(mosquitto.port)
    assert sub.connect() == 0
    sub.paho.subscribe(topic, qos=1)
    time.sleep(0.1)
    publish_qos1(mosquitto.port, topic, [b"hello"])
    assert sub.wait_messages(1) == [b"hello"]
    sub.close()
    assert mosquitto.pid is not None
    assert mosquitto.running


def test_mosquitto_tls_listener(tmp_path: Path) -> None:
    tls = make_test_ca(tmp_path / "pki")
    with Mosquitto(tmp_path / "broker", tls=tls, require_certificate=True) as broker:
        assert broker.tls_port is not None
        assert broker.tls_port != broker.port
        topic = f"test/{uuid.uuid4().hex}"
        sub = Client(broker.tls_port, tls=tls, client_cert=True)
        assert sub.connect() == 0
        sub.paho.subscribe(topic, qos=1)
        time.sleep(0.1)
        assert mosquitto_pub(broker.tls_port, topic, "tls", tls, client_cert=True).returncode == 0
        assert sub.wait_messages(1) == [b"tls"]
        sub.close()

        # require_certificate: a client without a certificate is refused.
        assert mosquitto_pub(broker.tls_port, topic, "no-cert", tls, client_cert=False).returncode != 0
        # A server certificate from another CA fails the client's verification.
        other = make_test_ca(tmp_path / "other-pki")
        assert mosquitto_pub(broker.tls_port, topic, "other-ca", other, client_cert=True).returncode != 0
        assert sub.messages == [b"tls"]


def test_mosquitto_password_file(tmp_path: Path) -> None:
    passwd = make_password_file(tmp_path, "gateway", "s3cret")
    with Mosquitto(tmp_path / "broker", password_file=passwd) as broker:
        good = Client(broker.port, username="gateway", password="s3cret")
        assert good.connect() == 0
        good.close()
        for user, password in (("gateway", "wrong"), (None, None)):
            bad = Client(broker.port, username=user, password=password)
            rc = bad.connect()
            bad.close()
            assert rc.is_failure, f"{user}/{password} was accepted"
            assert rc.getName() == "Not authorized"  # MQTT 3.1.1 CONNACK 5, which paho maps to 135


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_mosquitto_persistent_session_survives_restart(tmp_path: Path, how: str) -> None:
    # 1500 > mosquitto's default max_queued_messages (1000): proves the raised limit is in effect too.
    n = 1500
    topic = "plant/line1/telemetry"
    with Mosquitto(tmp_path, autosave_interval=1) as broker:
        port = broker.port
        sub = Client(port, client_id="persistent-sub", clean_session=False)
        assert sub.connect() == 0
        sub.paho.subscribe(topic, qos=1)
        time.sleep(0.2)
        sub.close()

        publish_qos1(port, topic, [str(i).encode() for i in range(n)])
        if how == "restart":
            broker.restart()
        else:
            time.sleep(2.5)  # > autosave_interval: the queue is on disk before the SIGKILL
            broker.kill()
            broker.start()
        assert broker.port == port

        again = Client(port, client_id="persistent-sub", clean_session=False)
        assert again.connect() == 0
        assert again.session_present
        got = again.wait_messages(n)
        again.close()
        assert len(got) == n
        assert sorted(int(p) for p in got) == list(range(n))


def test_mosquitto_retries_on_port_clash(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    taken = broker.port
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        with broker:
            assert broker.port != taken
            assert "Address already in use" in broker.log_path.read_text()


def test_fixed_port_clash_raises_with_log_tail(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(ServerError, match="Address already in use"):
            Mosquitto(tmp_path, port=port).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    class Nope(Mosquitto):
        binary = "definitely-not-installed-broker"

    with pytest.raises(ServerError, match="not found"):
        Nope(tmp_path).start()


def test_atexit_kills_children_left_running(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pathlib import Path
        from tests.servers import Mosquitto
        broker = Mosquitto(Path({str(tmp_path)!r})).start()
        print(broker.pid, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(out.stdout.strip())
    time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "mosquitto outlived the interpreter"


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ----------------------------------------------------------------------------------------------------------
# InfluxDB 1.x
# ----------------------------------------------------------------------------------------------------------
def test_influx_write_and_query(influx_db: tuple[InfluxDB1, str]) -> None:
    server, db = influx_db
    server.write(db, f"machine,line=l1,cell=c2 temp=21.5,count=3i {T0}\nmachine,line=l2 temp=22.0 {T0 + 1}")
    rows = server.query("SELECT * FROM machine GROUP BY line", db)
    assert rows == [
        {"line": "l1", "time": T0, "cell": "c2", "count": 3, "temp": 21.5},
        {"line": "l2", "time": T0 + 1, "cell": None, "count": None, "temp": 22.0},
    ]
    assert server.count("machine", db) == 2
    assert server.count("machine", db, field="count") == 1
    assert server.count("nothing_here", db) == 0


async def test_influx_write_with_aiohttp(influx_db: tuple[InfluxDB1, str]) -> None:
    server, db = influx_db
    async with aiohttp.ClientSession() as session, session.post(
        f"{server.url}/write", params={"db": db, "precision": "ns"}, data=f"m v=1i {T0}".encode()
    ) as resp:
        assert resp.status == 204
    assert server.query("SELECT v FROM m", db) == [{"time": T0, "v": 1}]


def test_influx_query_error_raises(influx_db: tuple[InfluxDB1, str]) -> None:
    server, db = influx_db
    with pytest.raises(ServerError, match="failed"):
        server.query("SELECT FROM", db)


def test_influx_restart_keeps_data(tmp_path: Path) -> None:
    with InfluxDB1(tmp_path) as server:
        port, rpc = server.port, server.rpc_port
        server.create_database("plant")
        server.write("plant", "\n".join(f"m,i={i} v={i} {T0 + i}" for i in range(100)))
        server.restart()
        assert (server.port, server.rpc_port) == (port, rpc)
        assert server.count("m", "plant") == 100
        server.kill()  # the WAL is fsynced per write, so a SIGKILL loses nothing acknowledged
        server.start()
        assert server.count("m", "plant") == 100


def test_two_influx_instances_side_by_side(influxdb: InfluxDB1, tmp_path: Path) -> None:
    with InfluxDB1(tmp_path) as other:
        assert other.rpc_port != influxdb.rpc_port
        assert other.port != influxdb.port


def test_influx_auth(tmp_path: Path) -> None:
    with InfluxDB1(tmp_path, auth=True, username="admin", password="pw'quote") as server:
        server.create_database("secure")
        server.write("secure", f"m v=1 {T0}")
        assert server.count("m", "secure") == 1
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}/query?q=SHOW+DATABASES", timeout=5)
        assert err.value.code == 401
        err.value.close()
        server.restart()  # the admin user persists; it is not created twice
        assert server.count("m", "secure") == 1


# ----------------------------------------------------------------------------------------------------------
# VictoriaMetrics
# ----------------------------------------------------------------------------------------------------------
def test_victoria_write_and_export(victoria: VictoriaMetrics) -> None:
    meas = f"m{uuid.uuid4().hex[:8]}"
    victoria.write(f"{meas},line=l1 temp=21.5,count=3i {T0}")
    series = victoria.export(f'{{__name__=~"{meas}_.*"}}')
    by_name = {s["metric"]["__name__"]: s for s in series}
    assert set(by_name) == {f"{meas}_temp", f"{meas}_count"}
    assert by_name[f"{meas}_temp"]["metric"]["line"] == "l1"
    assert by_name[f"{meas}_temp"]["values"] == [21.5]
    assert by_name[f"{meas}_temp"]["timestamps"] == [T0 // 1_000_000]


async def test_victoria_v2_write_endpoint(victoria: VictoriaMetrics) -> None:
    meas = f"m{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session, session.post(
        f"{victoria.url}/api/v2/write", params={"bucket": "b", "org": "o", "precision": "ns"},
        data=f"{meas} v=7 {T0}".encode(),
    ) as resp:
        assert resp.status == 204
    series = victoria.export(f"{meas}_v")
    assert [(s["values"], s["timestamps"]) for s in series] == [([7], [T0 // 1_000_000])]


def test_victoria_restart_keeps_data(tmp_path: Path) -> None:
    with VictoriaMetrics(tmp_path) as server:
        port = server.port
        server.write("\n".join(f"m,i={i} v={i} {T0 + i * 1_000_000}" for i in range(50)))
        server.flush()
        server.restart()
        assert server.port == port
        assert len(server.export("m_v")) == 50


# ----------------------------------------------------------------------------------------------------------
# the production mosquitto.conf we ship
# ----------------------------------------------------------------------------------------------------------
class ShippedConfigBroker(Mosquitto):
    """deploy/mosquitto/mosquitto.conf with only paths and ports swapped, TLS block enabled."""

    def _write_config(self) -> None:
        assert self.tls is not None
        assert self.password_file is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        swaps = {
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            "password_file /etc/mosquitto/passwd": f"password_file {self.password_file}",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.data_dir}/",
            "acl_file /etc/mosquitto/acl": f"acl_file {SHIPPED_ACL}",
            "#listener 8883": f"listener {self.tls_port} 127.0.0.1",
            "#cafile /etc/mosquitto/certs/ca.crt": f"cafile {self.tls.ca_cert}",
            "#certfile /etc/mosquitto/certs/server.crt": f"certfile {self.tls.server_cert}",
            "#keyfile /etc/mosquitto/certs/server.key": f"keyfile {self.tls.server_key}",
            "#require_certificate false": "require_certificate false",
            "#tls_version tlsv1.2": "tls_version tlsv1.2",
        }
        text = (REPO_ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
        for old, new in swaps.items():
            assert old in text, f"shipped config no longer contains {old!r}"
            text = text.replace(old, new)
        if os.geteuid() == 0:
            text += "\nuser root\n"
        self.config_path.write_text(text)


def test_shipped_mosquitto_conf_starts(tmp_path: Path) -> None:
    tls = make_test_ca(tmp_path / "pki")
    passwd = make_password_file(tmp_path, "gateway", "s3cret")
    with ShippedConfigBroker(tmp_path / "broker", tls=tls, password_file=passwd) as broker:
        assert broker.tls_port is not None
        for port, files in ((broker.port, None), (broker.tls_port, tls)):
            ok = Client(port, tls=files, username="gateway", password="s3cret")
            assert ok.connect() == 0
            ok.close()
        anonymous = Client(broker.port)
        assert anonymous.connect().is_failure
        anonymous.close()
    log = broker.log_path.read_text()
    assert "Error" not in log
    assert "Saving in-memory database" in log
