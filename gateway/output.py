"""``RunningOutput``: wraps a sink with retry, splitting and dead-lettering, so sinks stay tiny.

- 429/503 honour ``Retry-After``; 5xx and connection errors retry with capped exponential backoff
  and full jitter, until the write succeeds or the output is stopped.
- 413 (too large) splits the batch in halves.
- 400/422 (bad lines, type conflicts) split to isolate the bad lines; those go to the dead-letter
  callback with the server's message and the rest is written.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import GatewayError, SinkError
from gateway.sinks import Sink
from gateway.stats import OutputSnapshot

__all__ = ["OutputStats", "OutputStopped", "RunningOutput"]

log = logging.getLogger("gateway.output")


class OutputStopped(GatewayError):
    """The output was stopped while a write was still being retried."""


@dataclass(slots=True)
class OutputStats:
    writes: int = 0
    points_written: int = 0
    write_errors: int = 0
    retries: int = 0
    rejected_lines: int = 0


RejectCallback = Callable[[list[bytes], str], None]


class RunningOutput:
    def __init__(
        self,
        sink: Sink,
        *,
        max_retry_s: float = 30.0,
        base_retry_s: float = 0.2,
        on_rejected: RejectCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sink = sink
        self.max_retry_s = max_retry_s
        self.base_retry_s = base_retry_s
        self.on_rejected = on_rejected
        self.stats = OutputStats()
        self.failing_since: float | None = None  # monotonic time of the first failure of the current write
        self.last_error: str | None = None
        self._stopping = asyncio.Event()
        self._rng = rng or random.Random()

    def snapshot(self) -> OutputSnapshot:
        """This stage's counters for :mod:`gateway.stats`."""
        s = self.stats
        failing = self.failing_since
        return OutputSnapshot(
            writes=s.writes, points_written=s.points_written, write_errors=s.write_errors, retries=s.retries,
            rejected_lines=s.rejected_lines,
            failing_for_s=None if failing is None else time.monotonic() - failing, last_error=self.last_error,
        )

    def stop(self) -> None:
        """Abort retries (at shutdown); pending data stays wherever it was durable."""
        self._stopping.set()

    async def write(self, body: bytes) -> None:
        """Write ``body`` (line protocol) completely; raise OutputStopped if stopped first."""
        if body:
            await self._write(body)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise OutputStopped("output stopped during retry")

    async def _write(self, body: bytes) -> None:
        attempt = 0
        while True:
            if self._stopping.is_set():
                raise OutputStopped("output stopped")
            try:
                await self.sink.write(body)
            except SinkError as exc:
                self.stats.write_errors += 1
                if not exc.retryable and exc.status is not None and 400 <= exc.status < 500:
                    await self._bisect(body, exc)  # 413 too large, 400/422 bad lines: retrying cannot help
                    return
                attempt += 1
                self.stats.retries += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.last_error = str(exc)
                delay = min(self.max_retry_s, self.base_retry_s * 2 ** min(attempt, 20))
                delay = self._rng.uniform(delay / 2, delay)
                if exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), self.max_retry_s * 4)
                log.warning("write of %d lines failed (%s); retry %d in %.1f s",
                            body.count(b"\n") + 1, exc, attempt, delay)
                await self._sleep(delay)
                continue
            self.stats.writes += 1
            self.stats.points_written += body.count(b"\n") + 1
            self.failing_since = None
            if attempt:
                log.info("write of %d lines succeeded after %d retries", body.count(b"\n") + 1, attempt)
            return

    async def _bisect(self, body: bytes, exc: SinkError) -> None:
        """Halve a refused write until each half goes through or a single line is left, which is rejected.

        Lines are split only here, on the error path; a write that succeeds is sent as it came.
        """
        lines = body.split(b"\n")
        if len(lines) == 1:
            self.stats.rejected_lines += 1
            log.error("line rejected by the database (%s): %r", exc, body[:200])
            if self.on_rejected is not None:
                self.on_rejected(lines, str(exc))
            return
        mid = len(lines) // 2
        await self._write(b"\n".join(lines[:mid]))
        await self._write(b"\n".join(lines[mid:]))
