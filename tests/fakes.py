"""Fakes shared by unit tests (a unit test may fake what a user would have real; integration tests never do)."""

from __future__ import annotations


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
