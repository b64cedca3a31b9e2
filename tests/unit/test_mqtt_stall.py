"""The MQTT stall watchdog: a connection that delivers no bytes for the stall timeout is dropped."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from gateway.config import MqttConfig
from gateway.sources.mqtt import MqttSource, _paho_bytes_received, _paho_of


def _source(**kw: float) -> tuple[MqttSource, MqttConfig]:
    cfg = MqttConfig.model_validate({"keepalive_s": 5, **kw})
    src = MqttSource(cfg, lambda *a: None)
    src._subscribed = {s.topic: s.qos or 0 for s in cfg.subscriptions()}  # as right after subscribing
    return src, cfg


async def test_a_silent_connection_is_reported_stalled() -> None:
    src, cfg = _source(stall_timeout_s=0.05)
    client = aiomqtt.Client("127.0.0.1", 1883, identifier="stall-test")  # never connected: no bytes come
    _paho_of(client)._last_bytes_received = time.monotonic() - 13  # beyond 2.5 x keepalive_s (12.5 s)
    with pytest.raises(aiomqtt.MqttError, match="stalled"):
        await asyncio.wait_for(src._until_disconnected(client, asyncio.Event(), cfg), 2)


async def test_bytes_read_by_the_fast_path_keep_the_connection_alive() -> None:
    src, cfg = _source(stall_timeout_s=0.05)
    client = aiomqtt.Client("127.0.0.1", 1883, identifier="stall-test")
    paho = _paho_of(client)
    paho._last_bytes_received = time.monotonic() - 13
    _paho_bytes_received(paho)  # what _fast_read does after every socket read
    stop = asyncio.Event()
    task = asyncio.create_task(src._until_disconnected(client, stop, cfg))
    await asyncio.sleep(0.3)  # several watchdog checks (every stall_timeout_s)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 2)
