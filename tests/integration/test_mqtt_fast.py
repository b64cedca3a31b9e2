"""The fast receive path against the real mosquitto: a queued backlog arrives whole and exactly once,
acks are exact (nothing comes back on the next connection), and a broker restart mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.batch import AckToken
from gateway.config import MqttConfig
from gateway.sources.mqtt import MqttSource
from tests.gwproc import publish
from tests.servers import Mosquitto

pytestmark = pytest.mark.integration


class Collector:
    """The pipeline's side: records every message and acks in groups, as the WAL fsync would.

    ``hook(n, source)`` runs on the event loop after the n-th message (a slow pipeline, a restart or a reload
    mid-stream).
    """

    def __init__(self, every: int = 500, hook: Callable[[int, MqttSource], None] | None = None) -> None:
        self.hook = hook
        self.seen: list[tuple[str, bytes]] = []
        self.tokens: list[AckToken] = []
        self.src: MqttSource | None = None
        self.every = every
        self.acked = 0
        self.untokened: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, token: AckToken | None) -> None:
        self.seen.append((topic, payload))
        if self.hook is not None:
            assert self.src is not None
            self.hook(len(self.seen), self.src)
        if token is None:
            self.untokened.append((topic, payload))
        else:
            self.tokens.append(token)
        if len(self.tokens) >= self.every:
            self.flush()

    def flush(self) -> None:
        assert self.src is not None
        self.acked += self.src.ack(self.tokens)
        self.tokens = []


def _cfg(port: int, client_id: str, **kw: Any) -> MqttConfig:
    return MqttConfig.model_validate({"port": port, "client_id": client_id, "topics": ["fast/#"], **kw})


async def _drain(cfg: MqttConfig, until: Callable[[Collector], bool], wait_s: float = 60,
                 hook: Callable[[int, MqttSource], None] | None = None) -> tuple[Collector, MqttSource]:
    col = Collector(hook=hook)
    src = MqttSource(cfg, col)
    col.src = src
    stop = asyncio.Event()
    task = asyncio.create_task(src.run(stop))
    await asyncio.wait_for(src.connected.wait(), 20)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not until(col) and loop.time() < deadline:
        await asyncio.sleep(0.05)
        col.flush() if src.connected.is_set() and col.tokens else None
    await asyncio.sleep(0.3)  # let the last PUBACKs reach the broker; anything extra would show up here
    col.flush() if src.connected.is_set() and col.tokens else None
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 20)
    return col, src


def _messages(n: int, prefix: str = "fast/m") -> list[tuple[str, bytes]]:
    return [(f"{prefix}/{i % 50}", b'{"seq":%d,"v":1.5}' % i) for i in range(n)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_backlog_arrives_once_and_acks_are_exact(mosquitto: Mosquitto, protocol: str) -> None:
    cfg = _cfg(mosquitto.port, f"fast-backlog-{protocol}", protocol=protocol)
    await _drain(cfg, lambda c: True)  # creates the persistent session and its subscription
    msgs = _messages(20_000)
    await asyncio.to_thread(publish, mosquitto.port, msgs, client_id=f"fast-pub-{protocol}")
    col, src = await _drain(cfg, lambda c: len(c.seen) >= len(msgs))
    assert src.fast_connects == 1, "the fast path did not take over the socket"
    assert sorted(col.seen) == sorted(msgs)  # every message exactly once, topic and payload intact
    assert src.messages == len(msgs)
    assert col.acked == len(msgs)
    again, _ = await _drain(cfg, lambda c: False, wait_s=1.5)  # all acked: nothing redelivered
    assert again.seen == []


async def test_off_switch_uses_paho(mosquitto: Mosquitto) -> None:
    cfg = _cfg(mosquitto.port, "fast-off", fast_receive=False)
    await _drain(cfg, lambda c: True)
    msgs = _messages(2_000, "fast/off")
    await asyncio.to_thread(publish, mosquitto.port, msgs, client_id="fast-pub-off")
    col, src = await _drain(cfg, lambda c: len(c.seen) >= len(msgs))
    assert src.fast_connects == 0
    assert sorted(col.seen) == sorted(msgs)


def _paced(msgs: list[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    """A live trickle: 20 messages every 5 ms, so each read of the source gets a few."""
    for i, m in enumerate(msgs):
        if i % 20 == 0:
            time.sleep(0.005)
        yield m


@pytest.mark.parametrize("coalesce_ms", [2.0, 0.0, 50.0])
async def test_a_live_trickle_arrives_once_reads_coalesced_or_not(mosquitto: Mosquitto, coalesce_ms: float) -> None:
    cfg = _cfg(mosquitto.port, f"fast-trickle-{coalesce_ms:g}", read_coalesce_ms=coalesce_ms)
    await _drain(cfg, lambda c: True)  # the session
    msgs = _messages(1_500, "fast/t")

    sending = asyncio.create_task(asyncio.to_thread(publish, mosquitto.port, _paced(msgs), client_id="fast-pub-t"))
    col, src = await _drain(cfg, lambda c: len(c.seen) >= len(msgs) and sending.done())
    await sending
    assert sorted(col.seen) == sorted(msgs)
    assert col.acked == len(msgs)
    assert (src.coalesced > 0) == (coalesce_ms > 0)  # a trickle's reads wait to take more at once


async def test_a_reload_turns_read_coalescing_on_without_a_reconnect(mosquitto: Mosquitto) -> None:
    cfg = _cfg(mosquitto.port, "fast-trickle-reload", read_coalesce_ms=0.0)
    await _drain(cfg, lambda c: True)  # the session
    msgs = _messages(1_500, "fast/tr")
    at: dict[str, int] = {}

    def reload_at(n: int, src: MqttSource) -> None:  # half way: the new settings, as `gateway` reloads them
        if n == 750:
            assert src.coalesced == 0
            src.reconfigure(_cfg(mosquitto.port, "fast-trickle-reload", read_coalesce_ms=20.0))
            at["connects"] = src.connects

    sending = asyncio.create_task(asyncio.to_thread(publish, mosquitto.port, _paced(msgs), client_id="fast-pub-tr"))
    col, src = await _drain(cfg, lambda c: len(c.seen) >= len(msgs) and sending.done(), hook=reload_at)
    await sending
    assert sorted(col.seen) == sorted(msgs)
    assert src.coalesced > 0  # from the reload on
    assert src.connects == at["connects"]  # no reconnect for it


@pytest.mark.parametrize("coalesce_ms", [2.0, 50.0])
async def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, coalesce_ms: float) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = _cfg(broker.port, "fast-restart", reconnect_max_s=1.0, read_coalesce_ms=coalesce_ms)
        await _drain(cfg, lambda c: True)
        msgs = _messages(30_000, "fast/r")
        await asyncio.to_thread(publish, broker.port, msgs, client_id="fast-pub-r")

        def restart_at(n: int, _src: MqttSource) -> None:  # blocks the loop: the rest is unread or unacked
            if n == 5_000:
                broker.restart()

        col, src = await _drain(cfg, lambda c: set(c.seen) >= set(msgs), wait_s=90, hook=restart_at)
        assert set(col.seen) == set(msgs)  # redeliveries after the restart are allowed, loss is not
        assert src.connects == 2
        assert src.fast_connects == 2
        assert len(col.seen) > len(msgs)  # what was unacked at the restart came again on the new session


async def test_a_trickle_over_tls_arrives_once_with_reads_coalesced(tmp_path: Path) -> None:
    """TLS decrypts into the SSL object's buffer, which epoll does not see: a pause must not strand it. Large
    payloads span TLS records and reads, so packets are framed across pauses too."""
    from tests.servers import make_test_ca

    pki = make_test_ca(tmp_path / "pki")
    with Mosquitto(tmp_path / "broker", tls=pki, require_certificate=True) as broker:
        tls = {"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        cfg = MqttConfig.model_validate({"host": "localhost", "port": broker.tls_port, "client_id": "fast-tls",
                                         "topics": ["fast/#"], "tls": tls, "read_coalesce_ms": 5.0})
        await _drain(cfg, lambda c: True)  # the session
        msgs = [(t, p + b" " * (40_000 if i % 97 == 0 else 0)) for i, (t, p) in enumerate(_messages(1_500, "fast/s"))]

        sending = asyncio.create_task(asyncio.to_thread(publish, broker.port, _paced(msgs), client_id="fast-pub-s"))
        col, src = await _drain(cfg, lambda c: len(c.seen) >= len(msgs) and sending.done())
        await sending
        assert src.fast_connects == 1
        assert sorted(col.seen) == sorted(msgs)
        assert col.acked == len(msgs)
        assert src.coalesced > 0
