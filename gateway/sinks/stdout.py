"""A sink that prints line protocol (``replay --sink stdout``): a dry run and a golden-test hook."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["StdoutSink"]


class StdoutSink:
    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def connect(self) -> None:
        return None

    async def write(self, body: bytes) -> None:
        if body:
            out = self._stream or sys.stdout
            out.write(body.decode())
            out.write("\n")
            out.flush()

    async def close(self) -> None:
        return None
