"""Lifecycle: startup → main loop → shutdown. Signal handlers only set a flag; the loop notices.

Shutdown order: stop reading (new messages are left unacknowledged for the broker to redeliver),
flush what was read, acknowledge it, disconnect — within ``shutdown_timeout_s``, then cancel.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.config import GatewayConfig
from gateway.deadletter import DeadLetterFile
from gateway.pipeline import Pipeline
from gateway.sinks import Sink
from gateway.sinks.influx import make_influx_sink
from gateway.sources.mqtt import MqttSource
from gateway.wal import WriteAheadLog

__all__ = ["ReplayInputError", "Server", "replay"]

log = logging.getLogger("gateway.server")


class Server:
    def __init__(self, cfg: GatewayConfig, sink: Sink | None = None) -> None:
        self.cfg = cfg
        self.sink = sink or make_influx_sink(cfg.influx)
        self.deadletter = DeadLetterFile.from_config(cfg.deadletter)
        try:
            self.wal = WriteAheadLog.from_config(cfg.buffer) if cfg.buffer.enabled else None
        except BaseException:
            self.deadletter.close()
            raise
        if self.wal is not None and self.wal.records_pending:
            log.info("WAL holds %d unconfirmed records (%d bytes): replaying them first",
                     self.wal.records_pending, self.wal.bytes_pending)
        self.pipeline = Pipeline(cfg, self.sink, wal=self.wal, deadletter=self.deadletter)
        if cfg.oee.enabled:
            cfg.buffer.dir.mkdir(parents=True, exist_ok=True)
            self.pipeline.load_oee(cfg.buffer.dir / "oee-state.pickle")
        self.source = MqttSource(cfg.mqtt, self.pipeline.submit)
        self.pipeline.ack = self.source.ack
        self.should_exit = asyncio.Event()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.should_exit.set)

    async def run(self) -> None:
        await self.sink.connect()  # outputs start first
        flush_stop = asyncio.Event()
        flusher = asyncio.create_task(self.pipeline.run_flusher(flush_stop), name="flusher")
        writer_stop = asyncio.Event()
        tasks = [flusher]
        writer: asyncio.Task[None] | None = None
        if self.wal is not None:
            writer = asyncio.create_task(self.pipeline.run_writer(writer_stop), name="writer")
            tasks.append(writer)
        source_stop = asyncio.Event()
        source = asyncio.create_task(self.source.run(source_stop), name="mqtt-source")
        try:
            await self._main_loop(*tasks, source)
        finally:
            await self._shutdown(flusher, flush_stop, source, source_stop, writer, writer_stop)

    async def _main_loop(self, *tasks: asyncio.Task[None]) -> None:
        exit_wait = asyncio.create_task(self.should_exit.wait())
        done, _ = await asyncio.wait({exit_wait, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        exit_wait.cancel()
        for t in done:
            if t is not exit_wait and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _shutdown(
        self,
        flusher: asyncio.Task[None],
        flush_stop: asyncio.Event,
        source: asyncio.Task[None],
        source_stop: asyncio.Event,
        writer: asyncio.Task[None] | None,
        writer_stop: asyncio.Event,
    ) -> None:
        log.info("shutting down: draining")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.gateway.shutdown_timeout_s
        self.pipeline.accepting = False  # stop reading; unacked messages stay with the broker
        flush_stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(flusher), timeout=self.cfg.gateway.shutdown_timeout_s)
        except TimeoutError:
            log.error("shutdown timeout: %d messages not flushed (the broker will redeliver them)",
                      self.pipeline.pending())
            self.pipeline.output.stop()
            flusher.cancel()
        except Exception:
            log.exception("flusher failed during shutdown")
        self.pipeline.save_oee()
        if writer is not None:
            writer_stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout=max(0.5, deadline - loop.time()))
            except TimeoutError:
                log.warning("shutdown timeout: the WAL still holds unwritten data; it is replayed at next start")
                self.pipeline.output.stop()
                writer.cancel()
            except Exception:
                log.exception("writer failed during shutdown")
        source_stop.set()
        try:
            await asyncio.wait_for(source, timeout=5)
        except (TimeoutError, Exception):
            source.cancel()
        await self.sink.close()
        if self.wal is not None:
            self.wal.close()
        self.deadletter.close()
        log.info("stopped")


class ReplayInputError(ValueError):
    """A line of the replay file is not ``{"topic": "...", "payload": ...}``."""


def _read_jsonl(stream: IO[bytes]) -> Any:
    for lineno, raw in enumerate(stream, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ReplayInputError(f"line {lineno}: not JSON: {exc}") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("topic"), str) or "payload" not in rec:
            raise ReplayInputError(f'line {lineno}: expected {{"topic": "...", "payload": ...}}')
        payload = rec["payload"]
        body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
        yield rec["topic"], body


async def replay(cfg: GatewayConfig, input_path: Path, *, sink: Sink | None = None) -> Pipeline:
    """Feed a recorded JSONL file through decode → compute → encode → sink; return the pipeline."""
    out = sink or make_influx_sink(cfg.influx)
    await out.connect()
    pipeline = Pipeline(cfg, out, check_time_window=False, emit_stats=False)
    try:
        with open(input_path, "rb") as fh:
            for topic, body in _read_jsonl(fh):
                pipeline.submit(topic, body, None)
                if pipeline.batch_full():
                    await pipeline.flush()
        await pipeline.finish()
    finally:
        await out.close()
    return pipeline
