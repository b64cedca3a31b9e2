"""Run the real ``factory-gateway`` as a subprocess for integration tests, and publish with paho."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
import paho.mqtt.client as mqtt

from tests.servers import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def store_toml(tmp: Path, influx_url: str, db: str) -> str:
    """The ``[influx]``, ``[buffer]`` and ``[deadletter]`` sections most test gateways share: the given
    database, a 100 ms flush, the WAL and the dead letters in ``tmp``."""
    return (f'[influx]\nurl = "{influx_url}"\ndatabase = "{db}"\nflush_interval_ms = 100\n'
            f'[buffer]\ndir = "{tmp / "wal"}"\n[deadletter]\npath = "{tmp / "deadletter.jsonl"}"')


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class GatewayProcess:
    """``python -m gateway run --config PATH`` in its own process group; stopped by its pid."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, log: Path | None = None, args: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        if "FGW_HTTP__LISTEN" not in self.env and not re.search(r"^\s*\[http\]", config.read_text(), re.M):
            # The default 127.0.0.1:9273 would collide between gateways of concurrent test runs.
            self.env["FGW_HTTP__LISTEN"] = f"127.0.0.1:{free_port()}"
        self.log = log or config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str = "subscribed", timeout: float = 20) -> Self:
        self._fh = open(self.log, "ab")  # noqa: SIM115
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config), *self.args],
            cwd=ROOT, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            if wait_for in self.log.read_text(errors="replace")[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not log {wait_for!r} within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait for the drain; return the exit code."""
        assert self.proc is not None
        code = stop_process(self.proc, timeout=timeout)
        self._fh.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._fh.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def publish(
    port: int, messages: Iterable[tuple[str, Any]], *, qos: int = 1, client_id: str = "test-publisher"
) -> int:
    """Publish ``(topic, payload)`` pairs (dict payloads as JSON) and wait until every one is acknowledged."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    pending: deque[mqtt.MQTTMessageInfo] = deque()
    count = 0
    for topic, payload in messages:
        body = payload if isinstance(payload, bytes | str) else orjson.dumps(payload)
        # Message ids are 16-bit: keep well under 65535 outstanding so they never collide.
        while len(pending) >= 20_000:
            pending.popleft().wait_for_publish(timeout=120)
        info = client.publish(topic, body, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
        pending.append(info)
        count += 1
    for info in pending:
        info.wait_for_publish(timeout=120)
    client.loop_stop()
    client.disconnect()
    return count


def wait_until(predicate: Callable[[], bool], timeout: float = 30, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
