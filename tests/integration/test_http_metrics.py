"""The real gateway process: /metrics counts what was sent, rejected and written; /readyz follows the database."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gwproc import GatewayProcess, publish, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto, free_port

MACHINES = 4
PER_MACHINE = 30
METRICS = ("temp_c", "vib")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _config(tmp_path: Path, broker: Mosquitto, influx_url: str, db: str, client_id: str, http_port: int) -> Path:
    # Only telemetry goes out (no detectors, OEE, features or stats points), so written == sent - rejected.
    return write_config(
        tmp_path / f"{client_id}.toml",
        f"""
[gateway]
instance = "{client_id}"
stats_interval_s = 3600
shutdown_timeout_s = 3
[mqtt]
host = "127.0.0.1"
port = {broker.port}
client_id = "{client_id}"
topics = ["metrics-it/{client_id}/+/+/+/+"]
topic_template = "metrics-it/{{site}}/{{area}}/{{line}}/{{machine}}/{{channel}}"
[influx]
url = "{influx_url}"
database = "{db}"
flush_interval_ms = 100
max_retry_s = 1
timeout_s = 2
[buffer]
dir = "{tmp_path / client_id / 'wal'}"
[deadletter]
path = "{tmp_path / client_id / 'deadletter.jsonl'}"
[detect]
enabled = false
[oee]
enabled = false
[features]
enabled = false
[http]
listen = "127.0.0.1:{http_port}"
""",
    )


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(port: int) -> Samples:
    status, text = _get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), -1.0)


def test_metrics_count_what_was_sent_rejected_and_written(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    port = free_port()
    cfg = _config(tmp_path, mosquitto, influx.url, db, "gw-metrics", port)
    base = "metrics-it/gw-metrics/area1/line1"
    t0 = time.time() - 600
    good = [
        (f"{base}/m{m}/telemetry", {"ts": round(t0 + i * 0.5 + m * 0.01, 3),
                                    "values": {name: float(i * 10 + m + k) for k, name in enumerate(METRICS)}})
        for i in range(PER_MACHINE)
        for m in range(MACHINES)
    ]
    bad: list[tuple[str, object, str]] = [
        (f"{base}/m0/telemetry", b"{not json", "json"),
        (f"{base}/m1/telemetry", b"{also not json", "json"),
        (f"{base}/m0/bogus", {"ts": t0, "values": {"temp_c": 1.0}}, "topic"),
        (f"{base}/m2/telemetry", {"ts": t0 - 40 * 86400, "values": {"temp_c": 1.0}}, "time_window"),
        (f"{base}/m3/telemetry", {"ts": t0, "values": {"temp_c": "hot"}}, "schema"),
    ]
    messages = [*good[:60], *((t, p) for t, p, _ in bad), *good[60:]]
    points = len(good) * len(METRICS)
    with GatewayProcess(cfg) as gw:
        assert _get(port, "/healthz") == (200, "ok")
        assert wait_until(lambda: _get(port, "/readyz")[0] == 200, timeout=10), _get(port, "/readyz")
        assert publish(mosquitto.port, messages, client_id="pub-http-metrics") == len(messages)
        # one line per good message: its metrics share the timestamp, so they share the line
        assert wait_until(lambda: _value(_scrape(port), "factory_gateway_points_written_total") >= len(good),
                          timeout=30), gw.tail()
        assert wait_until(lambda: _value(_scrape(port), "factory_gateway_wal_bytes_pending") == 0, timeout=10)
        m = _scrape(port)
        assert _get(port, "/readyz") == (200, "ready")
        assert gw.stop() == 0, gw.tail()

    assert _value(m, "factory_gateway_messages_received_total") == len(messages)
    rejected = Counter(reason for _, _, reason in bad)
    for (name, labels), value in m.items():
        if name == "factory_gateway_messages_rejected_total":
            reason = dict(labels)["reason"]
            assert value == rejected[reason], reason
    assert _value(m, "factory_gateway_messages_rejected_total", reason="json") == 2
    assert _value(m, "factory_gateway_points_decoded_total") == points
    assert _value(m, "factory_gateway_points_written_total") == len(good)  # lines (InfluxDB points)
    # What the database holds, counted independently of the gateway: one value per metric and sample.
    assert sum(influx.count("telemetry", db, field=name) for name in METRICS) == points
    dead = (tmp_path / "gw-metrics" / "deadletter.jsonl").read_bytes().splitlines()
    assert _value(m, "factory_gateway_dead_letters_total") == len(dead) == len(bad)
    assert _value(m, "factory_gateway_series") == MACHINES * len(METRICS)
    assert _value(m, "factory_gateway_write_retries_total") == 0
    assert _value(m, "factory_gateway_mqtt_connected") == 1
    assert _value(m, "factory_gateway_mqtt_reconnects_total") == 0
    assert _value(m, "factory_gateway_wal_oldest_pending_age_seconds") == 0
    batches = _value(m, "factory_gateway_batch_latency_seconds_count")
    assert batches >= 1
    assert _value(m, "factory_gateway_batch_latency_seconds_bucket", le="+Inf") == batches
    assert 0 < _value(m, "factory_gateway_batch_latency_seconds_sum") < 5 * batches


def test_readyz_reports_an_unreachable_database(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    _, db = influx_db
    port = free_port()
    closed = free_port()  # nothing listens there: connection refused
    cfg = _config(tmp_path, mosquitto, f"http://127.0.0.1:{closed}", db, "gw-nodb", port)
    with GatewayProcess(cfg) as gw:
        assert _get(port, "/readyz") == (200, "ready")  # no write has failed yet
        publish(mosquitto.port, [("metrics-it/gw-nodb/a/l/m1/telemetry", {"values": {"temp_c": 21.5}})],
                client_id="pub-http-nodb")

        assert wait_until(lambda: _value(_scrape(port), "factory_gateway_sink_failing_seconds") >= 1.5,
                          timeout=20), (_get(port, "/readyz"), gw.tail())
        status, body = _get(port, "/readyz")
        assert status == 503
        assert re.fullmatch(rf"sink: write failing for ([2-9]|\d\d+) s: http://127\.0\.0\.1:{closed}: .+", body), body
        assert _get(port, "/healthz") == (200, "ok")  # alive, just not ready
        m = _scrape(port)
        assert _value(m, "factory_gateway_write_retries_total") >= 1
        assert _value(m, "factory_gateway_points_written_total") == 0
        assert _value(m, "factory_gateway_sink_failing_seconds") >= 1.5
        assert _value(m, "factory_gateway_wal_bytes_pending") > 0
        assert _value(m, "factory_gateway_wal_oldest_pending_age_seconds") >= 1
        assert _value(m, "factory_gateway_mqtt_connected") == 1
        assert gw.stop() == 0, gw.tail()
