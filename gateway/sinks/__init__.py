"""Sinks: where encoded line protocol goes. Each is ``connect / write(body) / close``.

Third-party clients (aiohttp, influxdb-client) live only in :mod:`gateway.sinks.influx`; their errors
arrive here as :class:`gateway.errors.SinkError`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Sink"]


class Sink(Protocol):
    """The tiny interface every output implements; batching and retry live in ``RunningOutput``."""

    name: str

    async def connect(self) -> None: ...

    async def write(self, body: bytes) -> None:
        """Write newline-separated line protocol; raise SinkError on failure."""
        ...

    async def close(self) -> None: ...
