"""Nothing lost: crash (SIGKILL), database outage, broker restart, bad input — through the real servers.

The short versions run in the default suite; the long ones (100,000 messages, 30 s outage) carry the
``chaos`` marker: ``make test-chaos``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.gwproc import GatewayProcess, publish, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto, free_port


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxDB1, db: str, client_id: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / "gw.toml",
        f"""
[gateway]
instance = "chaos"
stats_interval_s = 1
shutdown_timeout_s = 10
[mqtt]
host = "127.0.0.1"
port = {broker.port}
client_id = "{client_id}"
reconnect_max_s = 2
[influx]
url = "{influx.url}"
database = "{db}"
flush_interval_ms = 100
batch_size = 5000
max_retry_s = 1
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'deadletter.jsonl'}"
{extra}
""",
    )


def _messages(n: int, t0: float, machines: int = 20, site: str = "plant1") -> list[tuple[str, dict[str, object]]]:
    return [
        (
            f"factory/{site}/hall/line1/m{seq % machines:02d}/telemetry",
            {"ts": round(t0 + seq * 0.001, 3), "seq": seq, "values": {"v": seq * 0.5}},
        )
        for seq in range(n)
    ]


def _check_exact(influx: InfluxDB1, db: str, msgs: list[tuple[str, dict[str, object]]]) -> tuple[int, int]:
    """Every published (machine, ts, value) is in InfluxDB exactly once; return (points, distinct)."""
    rows = influx.query('SELECT "v", "machine" FROM "telemetry"', db)
    assert rows, "no telemetry points at all"
    got = {(r["machine"], r["time"]): r["v"] for r in rows}
    expected = {
        (t.split("/")[4], round(float(p["ts"]) * 1e6) * 1000): p["values"]["v"]  # type: ignore[arg-type,index]
        for t, p in msgs
    }
    assert len(rows) == len(got), "duplicate points"
    missing = expected.keys() - got.keys()
    assert not missing, f"{len(missing)} points missing, e.g. {sorted(missing)[:3]}"
    assert got == expected
    return len(rows), len(got)


def _publisher(port: int, msgs: list[tuple[str, dict[str, object]]], client_id: str) -> threading.Thread:
    t = threading.Thread(target=publish, args=(port, msgs), kwargs={"client_id": client_id}, daemon=True)
    t.start()
    return t


def _crash_loop(tmp_path: Path, mosquitto: Mosquitto, influx: InfluxDB1, db: str, n: int, cid: str) -> dict[str, int]:
    cfg = _config(tmp_path, mosquitto, influx, db, cid)
    msgs = _messages(n, time.time() - 3000, site=cid)
    rng = random.Random(7)
    gw = GatewayProcess(cfg).start()
    pub = _publisher(mosquitto.port, msgs, f"pub-{cid}")
    kills = 0
    while pub.is_alive() or kills == 0:
        time.sleep(rng.uniform(2, 5))
        gw.kill()
        kills += 1
        gw = GatewayProcess(cfg).start()
    assert wait_until(lambda: influx.count("telemetry", db) >= n, timeout=600), gw.tail()
    assert gw.stop() == 0
    points, distinct = _check_exact(influx, db, msgs)
    result = {"sent": n, "points": points, "distinct": distinct, "duplicates": points - distinct, "kills": kills}
    print(f"crash test: {result}")
    return result


def test_sigkill_loses_nothing(tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]) -> None:
    influx, db = influx_db
    r = _crash_loop(tmp_path, mosquitto, influx, db, 15_000, "gw-crash-short")
    assert r["kills"] >= 1


@pytest.mark.chaos
@pytest.mark.timeout(1800)
def test_sigkill_100k(tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]) -> None:
    influx, db = influx_db
    _crash_loop(tmp_path, mosquitto, influx, db, 100_000, "gw-crash-long")


def _outage(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, db: str, seconds: float, n: int) -> None:
    cfg = _config(tmp_path, mosquitto, influxdb, db, f"gw-outage-{int(seconds)}")
    msgs = _messages(n, time.time() - 2000, site=f"outage{int(seconds)}")
    with GatewayProcess(cfg) as gw:
        publish(mosquitto.port, msgs[: n // 3], client_id="pub-outage-1")
        assert wait_until(lambda: influxdb.count("telemetry", db) >= n // 3, timeout=30), gw.tail()
        influxdb.stop()
        pub = _publisher(mosquitto.port, msgs[n // 3 :], "pub-outage-2")
        time.sleep(seconds)
        pub.join(timeout=60)
        wal = tmp_path / "wal"
        wal_bytes = sum(f.stat().st_size for f in wal.glob("*.seg"))
        assert wal_bytes > 0, "the WAL should hold the data while InfluxDB is down"
        influxdb.start()
        assert wait_until(lambda: influxdb.count("telemetry", db) >= n, timeout=90), gw.tail()
        assert gw.stop() == 0
    _check_exact(influxdb, db, msgs)


def test_influx_outage_wal_drains(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    db = "outage_short"
    influxdb.create_database(db)
    _outage(tmp_path, mosquitto, influxdb, db, 5, 6000)


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_influx_outage_30s(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    db = "outage_long"
    influxdb.create_database(db)
    _outage(tmp_path, mosquitto, influxdb, db, 30, 30000)


def test_broker_restart_mid_stream(tmp_path: Path, influx_db: tuple[InfluxDB1, str]) -> None:
    """A broker with persistence restarts while data flows; the gateway reconnects; nothing is lost."""
    influx, db = influx_db
    from tests.servers import Mosquitto as Broker

    with Broker(tmp_path / "broker", autosave_interval=1) as broker:
        cfg = _config(tmp_path, broker, influx, db, "gw-broker-restart")
        msgs = _messages(6000, time.time() - 1000, site="brokerrestart")
        with GatewayProcess(cfg) as gw:
            publish(broker.port, msgs[:3000], client_id="pub-br-1")
            broker.restart()
            publish(broker.port, msgs[3000:], client_id="pub-br-2")
            assert wait_until(lambda: influx.count("telemetry", db) >= len(msgs), timeout=60), gw.tail()
            assert "lost or refused" in gw.tail(200)
            assert gw.stop() == 0
    _check_exact(influx, db, msgs)


def test_bad_input_dead_lettered_and_acked(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-bad-input", extra="")
    now = time.time()
    good = _messages(100, now - 100, site="badinput")
    bad: list[tuple[str, object]] = [
        ("factory/p/a/l/m1/telemetry", b"{not json"),
        ("factory/p/a/l/m1/telemetry", b"\xff\xfe\x00"),
        ("factory/p/a/l/m1/telemetry", {"ts": now, "values": {"t": "hot"}}),
        ("factory/p/a/l/m1/telemetry", b'{"ts": 1, "values": {"t": NaN}}'),
        ("factory/p/a/l/m1/telemetry", b'{"ts": 1, "values": {"t": 1e400}}'),
        ("factory/p/a/l/m1/telemetry", {"ts": [now, now + 1], "values": {"t": [1.0]}}),
        ("factory/p/a/l/m1/telemetry", b"[" * 5000 + b"]" * 5000),
        ("factory/p/a/l/m1/vibes", {"ts": now, "values": {"t": 1.0}}),
        ("factory/p/a/l/m1/telemetry", {"ts": now - 90 * 86400, "values": {"t": 1.0}}),
        ("factory/p/a/l/m1/telemetry", {"ts": now + 86400, "values": {"t": 1.0}}),
        ("factory/p/a/l/m1/telemetry", {"ts": now, "values": {"_t": 1.0}}),
        ("factory/p/a/l/m1/telemetry", {"ts": now, "values": {"a\nb": 1.0}}),
        ("factory/p/a/l/m1/telemetry", {"ts": now, "values": {"": 1.0}}),
        ("factory/p/a/l/m\\1/telemetry", {"ts": now, "values": {"t": 1.0}}),
        ("factory/p/a/l/m1/telemetry", b"x" * 2_000_000),
        ("factory/p/a/l/m1/state", {"ts": now, "state": "EXPLODED"}),
        ("factory/p/a/l/m1/count", {"ts": now, "total": 5, "good": 9}),
        ("factory/p/a/l/m1/telemetry", {"ts": now, "values": {f"x{i}": 1.0 for i in range(60)}}),
    ]
    with GatewayProcess(cfg, env={"FGW_GATEWAY__MAX_SERIES": "50"}) as gw:
        publish(mosquitto.port, [*bad, *good], client_id="pub-bad")
        assert wait_until(lambda: influx.count("telemetry", db) >= len(good), timeout=30), gw.tail()
        assert wait_until(lambda: len((tmp_path / "deadletter.jsonl").read_bytes().splitlines()) >= len(bad))
        assert gw.stop() == 0
    records = [orjson.loads(line) for line in (tmp_path / "deadletter.jsonl").read_bytes().splitlines()]
    assert len(records) == len(bad)
    reasons = [r["reason"] for r in records]
    for needle in ("not valid JSON", "UTF-8", "values.t", "infinity", "ts has 2", "depth", "unknown channel",
                   "max_past_s", "max_future_s", "starts with '_'", "control character", "is empty",
                   "backslash", "max_payload_bytes", "state", "greater than total", "max_series=50"):
        assert any(needle in r for r in reasons), f"no dead-letter reason mentions {needle!r}: {reasons}"
    assert {r["payload_encoding"] for r in records} == {"utf-8", "base64"}
    _check_exact(influx, db, good)
    # Everything was acked: a new session with the same client id gets nothing redelivered.
    with GatewayProcess(cfg, env={"FGW_GATEWAY__MAX_SERIES": "50"}) as gw2:
        time.sleep(2)
        assert gw2.stop() == 0
    assert len((tmp_path / "deadletter.jsonl").read_bytes().splitlines()) == len(bad)
    assert influx.count("telemetry", db) == len(good)
    assert os.path.exists(tmp_path / "wal")


def test_lines_influxdb_rejects_are_isolated_and_dead_lettered(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    """A field type conflict (400 from InfluxDB) costs only the conflicting line; the rest is written."""
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, influx, db, "gw-type-conflict")
    ts = int(time.time() - 60) * 10**9
    influx.write(db, f"env,machine=m1 temp=1.5 {ts - 10**9}")  # the field is a float from now on
    lines = [f"env temp={20 + i}.5 {ts + i}" for i in range(50)]
    lines[17] = f'env temp="hot" {ts + 17}'  # a string into a float field: rejected by InfluxDB
    with GatewayProcess(cfg) as gw:
        publish(mosquitto.port, [("factory/p/a/l/m1/telemetry", "\n".join(lines))], client_id="pub-conflict")
        assert wait_until(lambda: influx.count("env", db) >= 50, timeout=30), gw.tail()
        assert wait_until(lambda: (tmp_path / "deadletter.jsonl").exists()
                          and (tmp_path / "deadletter.jsonl").read_text().strip() != "", timeout=30)
        assert gw.stop() == 0
    assert influx.count("env", db) == 50  # the earlier point + 49 good lines
    [rec] = [orjson.loads(x) for x in (tmp_path / "deadletter.jsonl").read_bytes().splitlines()]
    assert rec["kind"] == "rejected_line"
    assert 'temp="hot"' in rec["payload"]
    assert "field type conflict" in rec["reason"]


def test_shutdown_while_the_database_is_down_ends_with_one_line(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """SIGTERM with InfluxDB unreachable: exit 0, one line saying what stays in the WAL, no traceback."""
    cfg = write_config(tmp_path / "gw.toml", f"""
[gateway]
shutdown_timeout_s = 2
[mqtt]
host = "127.0.0.1"
port = {mosquitto.port}
client_id = "gw-db-down"
[influx]
url = "http://127.0.0.1:{free_port()}"
database = "down"
max_retry_s = 1
[buffer]
dir = "{tmp_path / 'wal'}"
[deadletter]
path = "{tmp_path / 'deadletter.jsonl'}"
""")
    gw = GatewayProcess(cfg).start()
    publish(mosquitto.port, _messages(200, time.time() - 100, site="dbdown"), client_id="pub-db-down")
    assert wait_until(lambda: "WAL" in gw.tail(5) or (tmp_path / "wal").exists())
    time.sleep(1.5)
    assert gw.stop() == 0
    log = gw.log.read_text()
    assert "Traceback" not in log
    assert "never retrieved" not in log
    [line] = [ln for ln in log.splitlines() if "stay in the WAL" in ln]
    assert "records" in line
    assert "written at the next start" in line
