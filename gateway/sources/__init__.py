"""Sources: where messages come from. aiomqtt/paho live only in :mod:`gateway.sources.mqtt`.

A source is four calls (:class:`Source`); the server wires them to the pipeline, so a faster receive
path can replace the adapter without touching anything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.batch import AckToken

__all__ = ["MessageCallback", "Source"]

# (topic, payload, token to acknowledge it with once durable; None for QoS 0)
MessageCallback = Callable[[str, bytes, AckToken | None], None]


class Source(Protocol):
    """Receives messages for the pipeline, acknowledges them once durable, publishes for host duties."""

    connected: asyncio.Event  # set once subscribed on a live connection, cleared when it drops

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe and deliver every message to the callback, reconnecting until ``stop``."""
        ...

    def ack(self, tokens: Sequence[AckToken]) -> int:
        """Acknowledge ``tokens`` (arrival order) on the current connection; return how many went out."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message on the live connection (no wait); False when there is none."""
        ...

    def will(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True, birth: bytes | None = None
    ) -> None:
        """Set the Will of the next connections; ``birth`` is published on ``topic`` after each subscribe."""
        ...
