"""RunningOutput around a scripted fake Sink: retry, Retry-After, 413 splitting, 400 isolation, stop()."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from gateway.errors import SinkError
from gateway.output import OutputStopped, RunningOutput

Script = Callable[[bytes, int], SinkError | None]


class FakeSink:
    """Records every body it is given; ``script(body, call_no)`` returns an error to raise, or None."""

    name = "fake"

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or (lambda body, n: None)
        self.calls: list[tuple[float, bytes]] = []
        self.written: list[bytes] = []
        self.called = asyncio.Event()

    async def connect(self) -> None:
        pass

    async def write(self, body: bytes) -> None:
        self.calls.append((asyncio.get_running_loop().time(), body))
        self.called.set()
        error = self.script(body, len(self.calls))
        if error is not None:
            raise error
        self.written.append(body)

    async def close(self) -> None:
        pass

    @property
    def written_lines(self) -> list[bytes]:
        return [line for body in self.written for line in body.split(b"\n")]


def output(sink: FakeSink, **kw: object) -> RunningOutput:
    kw.setdefault("base_retry_s", 0.001)
    kw.setdefault("max_retry_s", 0.01)
    return RunningOutput(sink, rng=random.Random(7), **kw)  # type: ignore[arg-type]


def lines(n: int) -> list[bytes]:
    return [f"m,t=x v={i} {i}".encode() for i in range(n)]


async def test_success_first_time() -> None:
    sink = FakeSink()
    out = output(sink)
    await out.write(b"\n".join(lines(3)))
    assert sink.written == [b"\n".join(lines(3))]
    assert (out.stats.writes, out.stats.points_written, out.stats.retries) == (1, 3, 0)


async def test_empty_body_not_written() -> None:
    sink = FakeSink()
    await output(sink).write(b"")
    assert sink.calls == []


async def test_503_retry_after_honoured() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        if n == 1:
            return SinkError("503 Service Unavailable", retryable=True, status=503, retry_after=0.15)
        return None

    sink = FakeSink(script)
    out = output(sink, max_retry_s=1.0)  # Retry-After is capped at 4 x max_retry_s
    await out.write(b"\n".join(lines(2)))
    (t1, body1), (t2, body2) = sink.calls
    assert body1 == body2
    assert t2 - t1 >= 0.15 * 0.95  # the loop clock may round a hair below the requested timeout
    assert sink.written == [body1]
    assert (out.stats.retries, out.stats.write_errors, out.stats.writes) == (1, 1, 1)


async def test_429_retry_after_capped_by_four_times_max_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    real_wait_for = asyncio.wait_for

    async def fake_wait_for(aw: object, timeout: float) -> object:  # noqa: ASYNC109
        delays.append(timeout)
        return await real_wait_for(aw, 0)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "wait_for", fake_wait_for)
    script_errors = [
        SinkError("429", retryable=True, status=429, retry_after=0.5),
        SinkError("429", retryable=True, status=429, retry_after=1000.0),
    ]

    def script(body: bytes, n: int) -> SinkError | None:
        return script_errors[n - 1] if n <= len(script_errors) else None

    sink = FakeSink(script)
    await output(sink, max_retry_s=10.0).write(b"a v=1 1")
    assert delays == [0.5, 40.0]


async def test_5xx_retried_until_success() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError(f"500 #{n}", retryable=True, status=500) if n <= 4 else None

    sink = FakeSink(script)
    out = output(sink)
    body = b"\n".join(lines(5))
    await out.write(body)
    assert [b for _, b in sink.calls] == [body] * 5
    assert sink.written == [body]
    assert (out.stats.retries, out.stats.write_errors, out.stats.writes, out.stats.points_written) == (4, 4, 1, 5)


async def test_connection_error_without_status_retried() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError("connection refused", retryable=True) if n <= 2 else None

    sink = FakeSink(script)
    await output(sink).write(b"a v=1 1")
    assert len(sink.calls) == 3
    assert sink.written == [b"a v=1 1"]


async def test_backoff_grows_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    real_wait_for = asyncio.wait_for

    async def fake_wait_for(aw: object, timeout: float) -> object:  # noqa: ASYNC109
        delays.append(timeout)
        return await real_wait_for(aw, 0)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "wait_for", fake_wait_for)

    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError("502", retryable=True, status=502) if n <= 8 else None

    await output(FakeSink(script), base_retry_s=0.1, max_retry_s=2.0).write(b"a v=1 1")
    assert len(delays) == 8
    for attempt, delay in enumerate(delays, 1):
        ceiling = min(2.0, 0.1 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling  # full jitter in the upper half of the capped step


async def test_413_splits_in_halves() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        if body.count(b"\n") + 1 > 2:
            return SinkError("413 Request Entity Too Large", retryable=False, status=413)
        return None

    sink = FakeSink(script)
    out = output(sink)
    all_lines = lines(8)
    await out.write(b"\n".join(all_lines))
    assert sink.written == [b"\n".join(all_lines[i : i + 2]) for i in range(0, 8, 2)]
    assert sink.written_lines == all_lines
    assert out.stats.points_written == 8
    assert out.stats.rejected_lines == 0


async def test_413_uneven_split_keeps_order() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError("413", retryable=False, status=413) if len(body) > 40 else None

    sink = FakeSink(script)
    all_lines = lines(7)
    await output(sink).write(b"\n".join(all_lines))
    assert sink.written_lines == all_lines


async def test_413_single_line_too_large_is_rejected_not_retried_forever() -> None:
    big = b"m v=" + b"9" * 100 + b" 1"

    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError("413 too large", retryable=False, status=413) if big in body else None

    rejected: list[tuple[list[bytes], str]] = []
    sink = FakeSink(script)
    out = output(sink, on_rejected=lambda ls, msg: rejected.append((ls, msg)))
    await asyncio.wait_for(out.write(b"\n".join([b"a v=1 1", big, b"b v=2 2"])), timeout=1.0)
    assert rejected == [([big], "413 too large")]
    assert sink.written_lines == [b"a v=1 1", b"b v=2 2"]


@pytest.mark.parametrize("status", [400, 422])
async def test_bad_lines_isolated_and_rest_written(status: int) -> None:
    all_lines = lines(16)
    bad_idx = {0, 5, 6, 13}
    for i in bad_idx:
        all_lines[i] = f"BAD line {i}".encode()

    def script(body: bytes, n: int) -> SinkError | None:
        if b"BAD" in body:
            return SinkError("partial write: unable to parse 'BAD ...'", retryable=False, status=status)
        return None

    rejected: list[tuple[list[bytes], str]] = []
    sink = FakeSink(script)
    out = output(sink, on_rejected=lambda ls, msg: rejected.append((ls, msg)))
    await out.write(b"\n".join(all_lines))

    assert [r[0] for r in rejected] == [[all_lines[i]] for i in sorted(bad_idx)]
    assert {r[1] for r in rejected} == {"partial write: unable to parse 'BAD ...'"}
    good = [line for i, line in enumerate(all_lines) if i not in bad_idx]
    assert sink.written_lines == good  # every good line, once, in order
    assert out.stats.rejected_lines == len(bad_idx)
    assert out.stats.points_written == len(good)
    assert out.stats.retries == 0


async def test_bad_line_without_callback_is_counted() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        return SinkError("bad", retryable=False, status=400) if b"BAD" in body else None

    sink = FakeSink(script)
    out = output(sink)
    await out.write(b"ok v=1 1\nBAD\nok v=2 2")
    assert out.stats.rejected_lines == 1
    assert sink.written_lines == [b"ok v=1 1", b"ok v=2 2"]


async def test_all_lines_bad() -> None:
    rejected: list[bytes] = []
    sink = FakeSink(lambda body, n: SinkError("bad", retryable=False, status=400))
    out = output(sink, on_rejected=lambda ls, msg: rejected.extend(ls))
    await out.write(b"\n".join(lines(5)))
    assert rejected == lines(5)
    assert sink.written == []


async def test_transient_error_during_isolation_is_retried() -> None:
    def script(body: bytes, n: int) -> SinkError | None:
        if n == 3:
            return SinkError("503", retryable=True, status=503)
        if b"BAD" in body:
            return SinkError("bad", retryable=False, status=400)
        return None

    rejected: list[bytes] = []
    sink = FakeSink(script)
    out = output(sink, on_rejected=lambda ls, msg: rejected.extend(ls))
    body_lines = [b"a v=1 1", b"BAD", b"b v=2 2", b"c v=3 3"]
    await out.write(b"\n".join(body_lines))
    assert rejected == [b"BAD"]
    assert sink.written_lines == [b"a v=1 1", b"b v=2 2", b"c v=3 3"]


async def test_stop_aborts_retry_sleep() -> None:
    sink = FakeSink(lambda body, n: SinkError("503", retryable=True, status=503, retry_after=30.0))
    out = output(sink, base_retry_s=10.0, max_retry_s=60.0)
    task = asyncio.create_task(out.write(b"a v=1 1"))
    await sink.called.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    out.stop()
    with pytest.raises(OutputStopped):
        await asyncio.wait_for(task, timeout=2.0)
    assert loop.time() - started < 1.0
    assert sink.written == []


async def test_stop_before_write() -> None:
    sink = FakeSink()
    out = output(sink)
    out.stop()
    with pytest.raises(OutputStopped):
        await out.write(b"a v=1 1")
    assert sink.calls == []
