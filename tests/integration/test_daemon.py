"""The gateway as systemd runs it: notify protocol, watchdog pings, SIGHUP reload under load, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.gwproc import GatewayProcess, publish, store_toml, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxDB1, db: str, topics: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / "gw.toml",
        f"""
[gateway]
instance = "daemon-it"
stats_interval_s = 1
[mqtt]
port = {broker.port}
client_id = "gw-daemon-it"
topics = {topics}
{extra}
{store_toml(tmp_path, influx.url, db)}
""",
    )


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(data.decode().split("\n"))

    def firsts(self) -> list[str]:
        """The first field of every datagram, in order (READY=1, WATCHDOG=1, STATUS, ...)."""
        return ["STATUS" if m[0].startswith("STATUS=") else m[0] for m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _site_count(influx: InfluxDB1, db: str, site: str) -> int:
    rows = influx.query(f"SELECT count(\"v\") FROM \"telemetry\" WHERE \"site\" = '{site}'", db)
    return int(rows[0]["count"]) if rows else 0


def _messages(site: str, n: int, t0: float) -> list[tuple[str, dict[str, object]]]:
    return [(f"factory/{site}/a/l/m{i % 5}/telemetry", {"ts": round(t0 + i * 0.001, 3), "values": {"v": float(i)}})
            for i in range(n)]


def test_notify_watchdog_reload_under_load_and_json_logs(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: tuple[InfluxDB1, str]
) -> None:
    influx, db = influx_db
    cfg = _config(tmp_path, mosquitto, influx, db, '["factory/s1/#", "factory/s2/#"]')
    listener = NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"}
    t0 = time.time() - 600
    try:
        with GatewayProcess(cfg, env=env, args=["--log-format", "json", "--status-interval", "0.5"]) as gw:
            assert wait_until(lambda: "READY=1" in listener.firsts(), timeout=10), listener.messages
            assert publish(mosquitto.port, _messages("s1", 200, t0) + _messages("s2", 200, t0)) == 400
            assert wait_until(lambda: _site_count(influx, db, "s2") == 200, timeout=30), gw.tail()
            assert _site_count(influx, db, "s1") == 200
            assert publish(mosquitto.port, _messages("s3", 10, t0)) == 10  # not subscribed yet

            # Reload: s1 out, s3 in, and a connection change (keepalive: a reconnect), while 3000 messages
            # stream in on s2, which both configs subscribe to.
            cfg = _config(tmp_path, mosquitto, influx, db, '["factory/s2/#", "factory/s3/#"]', "keepalive_s = 20")
            stream = _messages("s2", 3000, t0 + 10)
            sent: list[int] = []
            publisher = threading.Thread(target=lambda: sent.append(publish(mosquitto.port, stream)))
            publisher.start()
            time.sleep(0.3)
            assert gw.proc is not None
            os.kill(gw.proc.pid, signal.SIGHUP)
            publisher.join(timeout=60)
            assert sent == [3000]
            assert wait_until(lambda: '"reloaded ' in gw.log.read_text(), timeout=15), gw.tail()
            assert wait_until(lambda: "reconnecting to apply the reloaded" in gw.log.read_text(), timeout=15)
            assert wait_until(lambda: _site_count(influx, db, "s2") == 3200, timeout=30), gw.tail()

            # s1 was unsubscribed, although the broker keeps the persistent session across the reconnect.
            publish(mosquitto.port, _messages("s1", 50, t0 + 20) + _messages("s3", 50, t0 + 20))
            assert wait_until(lambda: _site_count(influx, db, "s3") == 50, timeout=30), gw.tail()
            time.sleep(0.5)
            assert _site_count(influx, db, "s1") == 200

            # An invalid file is refused with the key named; the running config keeps working.
            cfg.write_text(cfg.read_text().replace(f"port = {mosquitto.port}", "port = 70000"))
            os.kill(gw.proc.pid, signal.SIGHUP)
            assert wait_until(lambda: "reload refused" in gw.log.read_text(), timeout=10), gw.tail()
            publish(mosquitto.port, _messages("s2", 100, t0 + 30))
            assert wait_until(lambda: _site_count(influx, db, "s2") == 3300, timeout=30), gw.tail()
            assert gw.stop() == 0, gw.tail()
    finally:
        listener.close()

    kinds = listener.firsts()
    assert kinds[0] == "READY=1"
    assert kinds.count("WATCHDOG=1") >= 5
    assert kinds.count("RELOADING=1") == 2
    assert kinds.count("READY=1") == 3
    assert kinds.count("STOPPING=1") == 1
    # After STOPPING only watchdog pings (they continue through the drain) and no status changes.
    assert set(kinds[kinds.index("STOPPING=1") + 1:]) <= {"WATCHDOG=1"}
    statuses = [f for m in listener.messages for f in m if f.startswith("STATUS=")]
    assert any("msgs/s" in s and "backlog" in s for s in statuses), statuses

    records = [json.loads(line) for line in gw.log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    refused = [r["message"] for r in records if "reload refused" in r["message"]]
    assert any("mqtt.port" in m for m in refused), refused
    assert len(records) < 200, "one log line per event, never one per message"
