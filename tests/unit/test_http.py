"""``[http]``: listen validation, /healthz, /readyz reasons, the /metrics collector, and the lifecycle in Server.run."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import orjson
import pytest
from paho.mqtt.client import MQTTMessage
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.config import GatewayConfig, load_config
from gateway.errors import REJECT_REASONS, ConfigError, SinkError
from gateway.http import HttpListenError
from gateway.output import RunningOutput
from gateway.server import Server
from gateway.wal import WriteAheadLog
from gateway.webauth import is_loopback
from tests.lp_parser import parse_body
from tests.servers import free_port

NOW = time.time()
DEMO_HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


class FakeSink:
    """Records what it is given; raises ``fail`` instead while it is set."""

    name = "fake"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.fail: SinkError | None = None
        self.calls = 0

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        self.bodies.append(body)

    async def close(self) -> None:
        return None

    def lines(self) -> list[bytes]:
        return [line for body in self.bodies for line in body.split(b"\n")]


def _cfg(tmp_path: Path, **sections: dict[str, Any]) -> GatewayConfig:
    data: dict[str, Any] = {
        "mqtt": {"port": free_port(), "reconnect_max_s": 0.5},
        "influx": {"batch_size": 1000, "max_retry_s": 0.05},
        "buffer": {"dir": str(tmp_path / "wal")},
        "deadletter": {"path": str(tmp_path / "dead.jsonl")},
        "detect": {"detectors": ["flatline"], "grace_samples": 5, "flatline": {"n": 10}},
        "oee": {"enabled": False},
        "features": {"enabled": False},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {"stats_interval_s": 3600, "max_series": 50},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return GatewayConfig.model_validate(data)


def _deliver(server: Server, topic: str, payload: bytes) -> None:
    """One message through the MQTT source's own delivery callback, as paho hands it over."""
    msg = MQTTMessage(mid=0, topic=topic.encode())
    msg.payload = payload
    server.source._deliver(msg)


async def _eventually(predicate: Callable[[], bool], within_s: float = 10) -> bool:
    for _ in range(int(within_s / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def _close(server: Server) -> None:
    if server.wal is not None:
        server.wal.close()
    server.deadletter.close()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def _get(client: aiohttp.ClientSession, server: Server, path: str) -> tuple[int, str, str]:
    async with client.get(f"http://{server.cfg.http.listen}{path}") as resp:
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9273", ("127.0.0.1", 9273)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9273", ("::1", 9273)),
        ("[::]:65535", ("::", 65535)),
        ("[fe80::1%eth0]:9273", ("fe80::1%eth0", 9273)),
        ("localhost:9273", ("localhost", 9273)),
        ("gw-01.plant.example:80", ("gw-01.plant.example", 80)),
    ],
)
def test_listen_accepted(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    path = tmp_path / "gw.toml"
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  op: {DEMO_HASH}\n")
    auth = "" if is_loopback(address[0]) else 'web_config_file = "web.yml"\n'  # beyond loopback: auth required
    path.write_text(f'[http]\nlisten = "{listen}"\n{auth}')
    assert load_config(path, env={}).http.address == address


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9273", "expected host:port"),
        (":9273", "expected host:port"),
        ("localhost", "expected host:port"),
        ("[::1]", "expected host:port"),
        ("[::1:9273", "expected host:port"),
        ("::1:9273", "IPv6 address goes in brackets"),
        ("[nonsense]:9273", "'nonsense' in brackets is not an IPv6 address"),
        ("[127.0.0.1]:9273", "in brackets is not an IPv6 address"),
        ("localhost:0", "port must be a number from 1 to 65535, got '0'"),
        ("localhost:65536", "got '65536'"),
        ("localhost:http", "got 'http'"),
        ("localhost:", "got ''"),
        ("localhost:-1", "got '-1'"),
        ("localhost:\uff19\uff12", "port must be a number"),  # full-width digits
        ("999.0.0.1:9273", "'999.0.0.1' is not an IPv4 address"),
        ("bad_host:9273", "'bad_host' is not a host name or IP address"),
        (" localhost:9273", "is not a host name"),
        ("http://localhost:9273", "no scheme or path"),
        ("localhost:9273/metrics", "no scheme or path"),
    ],
)
def test_listen_rejected_naming_the_key(tmp_path: Path, listen: str, message: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(f"[http]\nlisten = {orjson.dumps(listen).decode()}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    [problem] = err.value.problems
    assert problem.startswith("http.listen: "), problem
    assert message in problem


def test_http_section_from_the_environment_and_its_other_keys(tmp_path: Path) -> None:
    cfg = load_config(None, env={"FGW_HTTP__LISTEN": "[::1]:9100", "FGW_HTTP__ENABLED": "false"})
    assert (cfg.http.address, cfg.http.enabled) == (("::1", 9100), False)
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"FGW_HTTP__LISTEN": "nowhere"})
    assert err.value.problems == ["http.listen: expected host:port (IPv6 as [::1]:9273), got 'nowhere'"]
    path = tmp_path / "gw.toml"
    path.write_text('[http]\nenabled = "sometimes"\nport = 9273\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert sorted(p.split(":")[0] for p in err.value.problems) == ["http.enabled", "http.port"]


def test_disabled_means_no_status_server(tmp_path: Path) -> None:
    server = Server(_cfg(tmp_path, http={"enabled": False}), sink=FakeSink())
    try:
        assert server.http is None
    finally:
        _close(server)


# -- building blocks ---------------------------------------------------------------------------------------
def test_wal_oldest_pending_time(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        assert wal.oldest_pending_time() is None
        before = time.time()
        first = wal.append(b"a 1")
        after = time.time()
        time.sleep(0.01)
        second = wal.append(b"b 2")
        wal.sync()
        t1 = wal.oldest_pending_time()
        assert t1 is not None
        assert before <= t1 <= after
        wal.confirm(first)
        t2 = wal.oldest_pending_time()
        assert t2 is not None
        assert t2 > t1
        wal.confirm(second)
        assert wal.oldest_pending_time() is None
        wal.append(b"c 3")
        wal.sync()
    [segment] = sorted(tmp_path.glob("wal-*.seg"))
    with WriteAheadLog(tmp_path) as wal:  # recovered records: their segment's mtime
        assert wal.oldest_pending_time() == segment.stat().st_mtime


async def test_output_failing_since_set_by_retries_cleared_by_success() -> None:
    sink = FakeSink()
    out = RunningOutput(sink, base_retry_s=0.001, max_retry_s=0.002)
    seen: list[tuple[float | None, str | None]] = []
    real_write = sink.write

    async def write(body: bytes) -> None:
        seen.append((out.failing_since, out.last_error))
        sink.fail = SinkError("connection refused", retryable=True) if sink.calls < 2 else None
        await real_write(body)

    sink.write = write  # type: ignore[method-assign]
    assert out.failing_since is None
    await out.write(b"m v=1 1")
    assert seen[0] == (None, None)
    assert seen[1][0] is not None
    assert seen[2] == (seen[1][0], "connection refused")  # since the first failure, not the latest
    assert out.failing_since is None
    assert out.stats.retries == 2

    # A refused line (400) is the database answering: not a failing sink.
    sink.write = real_write  # type: ignore[method-assign]
    sink.fail = SinkError("HTTP 400: bad line", retryable=False, status=400)
    await out.write(b"bad")
    assert out.failing_since is None
    assert out.stats.rejected_lines == 1


# -- reject reasons: a small fixed label set ------------------------------------------------------------
TELEMETRY = "factory/s/a/l/m1/telemetry"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TELEMETRY, b"x" * 70_000, "too_large"),
        ("factory/s/a/l/m1/bogus", b'{"values": {"t": 1}}', "topic"),
        ("factory/s/a/m1/telemetry", b'{"values": {"t": 1}}', "topic"),
        ("factory/s/a/l//telemetry", b'{"values": {"t": 1}}', "topic"),
        (TELEMETRY, b"\xff\xfe t=1", "encoding"),
        (TELEMETRY, b'{"values": {"t\xff": 1}}', "encoding"),
        (TELEMETRY, b'{"values": ', "json"),
        (TELEMETRY, b'{"values": {"t": "hot"}}', "schema"),
        (TELEMETRY, b'{"values": {}}', "schema"),
        (TELEMETRY, b"[1, 2]", "schema"),
        ("factory/s/a/l/m1/state", b'{"state": "EXPLODED"}', "schema"),
        ("factory/s/a/l/m1/count", b'{"total": 1, "good": 2}', "schema"),
        (TELEMETRY, orjson.dumps({"ts": NOW - 40 * 86400, "values": {"t": 1}}), "time_window"),
        (TELEMETRY, orjson.dumps({"ts": NOW + 3600, "values": {"t": 1}}), "time_window"),
        (TELEMETRY, b"just words", "line_protocol"),
        (TELEMETRY, b"# only a comment\n", "line_protocol"),
        (TELEMETRY, orjson.dumps({"values": {f"m{i}": 1.0 for i in range(60)}}), "cardinality"),
    ],
)
async def test_reject_reason(tmp_path: Path, topic: str, payload: bytes, reason: str) -> None:
    server = Server(_cfg(tmp_path, gateway={"max_payload_bytes": 65536}), sink=FakeSink())
    try:
        _deliver(server, topic, payload)
        assert server.pipeline.rejected == Counter({reason: 1})
        assert reason in REJECT_REASONS
    finally:
        await server.pipeline.flush()
        _close(server)


async def test_internal_errors_have_their_own_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(_cfg(tmp_path), sink=FakeSink())

    def boom(*_: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(server.pipeline.decoder, "decode", boom)
    _deliver(server, TELEMETRY, b'{"values": {"t": 1}}')
    assert server.pipeline.rejected == Counter({"internal": 1})
    await server.pipeline.flush()
    _close(server)


async def test_an_internal_error_on_every_message_logs_a_few_tracebacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(_cfg(tmp_path), sink=FakeSink())

    def boom(*_: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(server.pipeline.decoder, "decode", boom)
    with caplog.at_level("WARNING"):
        for _ in range(50):
            _deliver(server, TELEMETRY, b'{"values": {"t": 1}}')
    assert server.pipeline.rejected == Counter({"internal": 50})  # every one dead-lettered
    assert sum(1 for r in caplog.records if r.exc_info) == 3
    await server.pipeline.flush()
    _close(server)


# -- the endpoints, on a real socket -----------------------------------------------------------------------
@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Server, FakeSink]]:
    sink = FakeSink()
    server = Server(_cfg(tmp_path), sink=sink)
    assert server.http is not None
    await server.http.start()
    try:
        yield server, sink
    finally:
        await server.http.stop()
        _close(server)


async def test_healthz_and_unknown_paths(running: tuple[Server, FakeSink], client: aiohttp.ClientSession) -> None:
    server, _ = running
    assert await _get(client, server, "/healthz") == (200, "ok", "text/plain; charset=utf-8")
    status, _, _ = await _get(client, server, "/nothing")
    assert status == 404


async def test_readyz_reasons(running: tuple[Server, FakeSink], client: aiohttp.ClientSession) -> None:
    server, sink = running
    mqtt = server.cfg.mqtt
    assert await _get(client, server, "/readyz") == (
        503, f"broker: not connected to 127.0.0.1:{mqtt.port} (connecting)", "text/plain; charset=utf-8"
    )
    server.source.connected.set()
    status, body, _ = await _get(client, server, "/readyz")
    assert (status, body) == (200, "ready")

    # The writer's attempts fail: not ready, with how long and why; ready again once a write goes through.
    for i in range(3):
        _deliver(server, TELEMETRY, orjson.dumps({"ts": NOW - 1 + i * 0.01, "values": {"t": float(i)}}))
    await server.pipeline.flush()
    sink.fail = SinkError("http://db:8086: connection refused", retryable=True)
    stop = asyncio.Event()
    writer = asyncio.create_task(server.pipeline.run_writer(stop))
    try:
        assert await _eventually(lambda: sink.calls >= 2)
        await asyncio.sleep(1.1)
        status, body, _ = await _get(client, server, "/readyz")
        assert status == 503
        assert body.startswith("sink: write failing for ")
        seconds = float(body.removeprefix("sink: write failing for ").split(" s: ")[0])
        assert seconds >= 1
        assert body.endswith(" s: http://db:8086: connection refused")
        server.source.connected.clear()
        server.source.last_error = "[Errno 111] Connection refused"
        status, body, _ = await _get(client, server, "/readyz")
        assert status == 503
        assert body.splitlines() == [
            f"broker: not connected to 127.0.0.1:{mqtt.port} (last error: [Errno 111] Connection refused)",
            f"sink: write failing for {seconds:.0f} s: http://db:8086: connection refused",
        ]
        server.source.connected.set()
        sink.fail = None
        assert await _eventually(lambda: server.wal is not None and server.wal.records_pending == 0)
        status, body, _ = await _get(client, server, "/readyz")
        assert (status, body) == (200, "ready")
    finally:
        stop.set()
        await writer
    server.pipeline.accepting = False
    status, body, _ = await _get(client, server, "/readyz")
    assert (status, body) == (503, "gateway: shutting down")


async def test_metrics_read_the_gateways_counters(
    running: tuple[Server, FakeSink], client: aiohttp.ClientSession
) -> None:
    server, sink = running
    p = server.pipeline
    assert server.wal is not None
    sent: Counter[str] = Counter()
    bad = [
        ("factory/s/a/l/m1/bogus", b"{}", "topic"),
        (TELEMETRY, b"{oops", "json"),
        (TELEMETRY, b"{oops again", "json"),
        (TELEMETRY, orjson.dumps({"ts": NOW + 3600, "values": {"t": 1}}), "time_window"),
    ]
    flushes = 0
    for batch in range(3):
        for i in range(20):
            # "stuck" never changes (a flatline anomaly); "temp" does.
            values = {"stuck": 1.0, "temp": 20.0 + (i % 7) * 0.37}
            _deliver(server, f"factory/s/a/l/m{batch}/telemetry",
                     orjson.dumps({"ts": NOW - 60 + i, "values": values}))
            sent["points"] += 2
            sent["messages"] += 1
        for topic, payload, reason in bad:
            _deliver(server, topic, payload)
            sent[reason] += 1
            sent["messages"] += 1
        await p.flush()
        flushes += 1
    await p.flush()  # an empty flush is not a batch latency observation

    status, text, ctype = await _get(client, server, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    m = _samples(text)
    assert _value(m, "factory_gateway_info", version=__version__, gateway_instance=server.cfg.gateway.instance) == 1
    assert _value(m, "factory_gateway_messages_received_total") == sent["messages"]
    assert {dict(k[1])["reason"] for k in m if k[0] == "factory_gateway_messages_rejected_total"} == set(
        REJECT_REASONS
    )
    for reason in REJECT_REASONS:
        assert _value(m, "factory_gateway_messages_rejected_total", reason=reason) == sent[reason], reason
    assert _value(m, "factory_gateway_points_decoded_total") == sent["points"]
    dead = (server.cfg.deadletter.path).read_bytes().splitlines()
    assert _value(m, "factory_gateway_dead_letters_total") == len(dead) == sum(sent[r] for r in REJECT_REASONS)
    # Nothing written yet: it is all in the WAL.
    assert _value(m, "factory_gateway_points_written_total") == 0
    assert _value(m, "factory_gateway_wal_bytes_pending") == server.wal.bytes_pending > 0
    assert _value(m, "factory_gateway_wal_records_pending") == server.wal.records_pending == flushes
    assert _value(m, "factory_gateway_wal_max_bytes") == server.cfg.buffer.max_bytes
    assert 0 < _value(m, "factory_gateway_wal_oldest_pending_age_seconds") < 60
    assert _value(m, "factory_gateway_wal_backpressure_waits_total") == 0
    assert _value(m, "factory_gateway_series") == len(p.registry) == 6
    assert _value(m, "factory_gateway_series_max") == 50
    assert _value(m, "factory_gateway_mqtt_connected") == 0
    assert _value(m, "factory_gateway_mqtt_reconnects_total") == 0
    assert _value(m, "factory_gateway_batch_latency_seconds_count") == flushes
    assert _value(m, "factory_gateway_batch_latency_seconds_bucket", le="+Inf") == flushes
    assert 0 < _value(m, "factory_gateway_batch_latency_seconds_sum") < 10 * flushes
    buckets = [v for (name, _), v in m.items() if name == "factory_gateway_batch_latency_seconds_bucket"]
    assert buckets == sorted(buckets)

    stop = asyncio.Event()
    stop.set()
    await p.run_writer(stop)  # drains the WAL, then returns
    m = _samples((await _get(client, server, "/metrics"))[1])
    written = sink.lines()
    assert _value(m, "factory_gateway_points_written_total") == len(written)  # lines: InfluxDB points
    telemetry = parse_body(b"\n".join(line for line in written if line.startswith(b"telemetry,")))
    assert sum(len(p.fields) for p in telemetry) == sent["points"]  # a line holds a machine's values at one ts
    assert len(written) > len(telemetry)  # anomalies, OEE, stats lines too
    by_detector = Counter(
        line.split(b"detector=")[1].split(b" ")[0].decode() for line in written if line.startswith(b"anomaly,")
    )
    assert by_detector["flatline"] >= 1
    detectors = {dict(k[1])["detector"]: v for k, v in m.items() if k[0] == "factory_gateway_anomalies_total"}
    assert {name: n for name, n in detectors.items() if n} == dict(by_detector)
    assert "fused" in detectors  # every known detector is exported, at 0 until it fires
    assert _value(m, "factory_gateway_wal_bytes_pending") == 0
    assert _value(m, "factory_gateway_wal_oldest_pending_age_seconds") == 0
    assert _value(m, "factory_gateway_write_retries_total") == 0
    assert _value(m, "factory_gateway_sink_failing_seconds") == 0
    server.source.connected.set()
    assert _value(_samples((await _get(client, server, "/metrics"))[1]), "factory_gateway_mqtt_connected") == 1


async def test_reject_labels_stay_bounded_whatever_arrives(
    running: tuple[Server, FakeSink], client: aiohttp.ClientSession
) -> None:
    server, _ = running
    for i in range(200):
        topic = f"factory/s/a/l/m{i}/{'telemetry' if i % 2 else f'chan{i}'}"
        _deliver(server, topic, f"garbage {i} \x00 {{{i}".encode())
    m = _samples((await _get(client, server, "/metrics"))[1])
    labels = {dict(k[1])["reason"] for k in m if k[0] == "factory_gateway_messages_rejected_total"}
    assert labels == set(REJECT_REASONS)
    assert set(server.pipeline.rejected) <= set(REJECT_REASONS)  # what the pipeline counted, not just exported
    assert sum(v for k, v in m.items() if k[0] == "factory_gateway_messages_rejected_total") == 200
    await server.pipeline.flush()


async def test_two_servers_have_their_own_registries(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    servers = [Server(_cfg(tmp_path / str(i)), sink=FakeSink()) for i in range(2)]
    try:
        for s in servers:
            assert s.http is not None
            await s.http.start()
        _deliver(servers[0], TELEMETRY, b"{bad")
        counts = []
        for s in servers:
            m = _samples((await _get(client, s, "/metrics"))[1])
            counts.append(_value(m, "factory_gateway_messages_received_total"))
        assert counts == [1, 0]
    finally:
        for s in servers:
            await s.pipeline.flush()
            if s.http is not None:
                await s.http.stop()
            _close(s)


async def test_listen_failure_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(_cfg(tmp_path, http={"listen": f"127.0.0.1:{port}"}), sink=FakeSink())
        assert server.http is not None
        with pytest.raises(HttpListenError, match=rf"^http\.listen: cannot listen on 127\.0\.0\.1:{port}: "):
            await server.http.start()
        await server.http.stop()  # harmless when it never started
    _close(server)


async def test_server_run_serves_until_shutdown(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """Server.run starts the endpoints first (the broker here refuses connections) and stops them at shutdown."""
    server = Server(_cfg(tmp_path), sink=FakeSink())
    run = asyncio.create_task(server.run())
    try:
        deadline = time.monotonic() + 10
        body = ""
        while "last error" not in body and time.monotonic() < deadline:
            try:
                status, body, _ = await _get(client, server, "/readyz")
            except aiohttp.ClientConnectorError:
                pass
            await asyncio.sleep(0.05)
        assert status == 503
        assert body.startswith(f"broker: not connected to 127.0.0.1:{server.cfg.mqtt.port} (last error: ")
        assert await _get(client, server, "/healthz") == (200, "ok", "text/plain; charset=utf-8")
    finally:
        server.should_exit.set()
        await asyncio.wait_for(run, timeout=20)
    with pytest.raises(aiohttp.ClientConnectorError):
        await _get(client, server, "/healthz")

