"""Fakes shared by unit tests (a unit test may fake what a user would have real; integration tests never do)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.pipeline import Pipeline
    from gateway.server import Server


class RecordingSink:
    """A sink that keeps every body it is given, in order."""

    name = "fake"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        self.bodies.append(body)

    async def close(self) -> None:
        return None


class NullSink:
    """A sink that accepts and drops everything (what is measured is before it)."""

    name = "null"

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


def deliver(server: Server, topic: str, payload: bytes) -> None:
    """One message through the MQTT source's own delivery callback, as paho hands it over."""
    from paho.mqtt.client import MQTTMessage

    msg = MQTTMessage(mid=0, topic=topic.encode())
    msg.payload = payload
    server.source._deliver(msg)


def feed_machines(server: Server, n: int, now: float) -> None:
    """``n`` machines in lines of 50 and areas of 500: a state, a count and one telemetry sample each."""
    import orjson

    for i in range(n):
        base = f"factory/s1/a{i // 500}/l{i // 50}/m{i}"
        deliver(server, f"{base}/state", orjson.dumps({"ts": now - 200, "state": "RUNNING"}))
        deliver(server, f"{base}/count", orjson.dumps({"ts": now - 130, "total": 100, "good": 90 + i % 10}))
        deliver(server, f"{base}/telemetry", orjson.dumps({"ts": now - 1, "values": {"temp_c": 50.0 + i % 7}}))


async def feed_with_cuts(p: Pipeline, msgs: list[tuple[str, bytes]], cuts: list[int]) -> None:
    """Submit ``msgs`` to ``p``, flushing at every cut and at the end (where batches end differs by run)."""
    a = 0
    for b in [*cuts, len(msgs)]:
        for topic, body in msgs[a:b]:
            p.submit(topic, body, None)
        await p.flush()
        a = b
