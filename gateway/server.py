"""Lifecycle: startup → main loop → shutdown. Signal handlers only set a flag; the loop notices.

Shutdown order: stop reading (new messages are left unacknowledged for the broker to redeliver),
flush what was read, acknowledge it, disconnect — within ``shutdown_timeout_s``, then cancel.

Under systemd (``Type=notify``) the server reports READY once its tasks run, a STATUS line every few
seconds, RELOADING/READY around a SIGHUP reload and STOPPING at shutdown; WATCHDOG pings come from the
same event loop as the pipeline, so a stalled loop stops them and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.config import GatewayConfig, load_config
from gateway.deadletter import DeadLetterFile
from gateway.errors import ConfigError
from gateway.http import StatusServer
from gateway.notify import Notifier
from gateway.oee import parse_duration_ns
from gateway.pipeline import Pipeline, collect
from gateway.sinks import Sink
from gateway.sinks.influx import make_influx_sink
from gateway.sources.mqtt import MqttSource
from gateway.wal import WriteAheadLog

__all__ = ["ReplayInputError", "Server", "replay"]

log = logging.getLogger("gateway.server")


# Sections a reload cannot change in a running process (open files, connections, listeners).
RESTART_ONLY = ("influx", "buffer", "deadletter", "http")


class Server:
    def __init__(
        self,
        cfg: GatewayConfig,
        sink: Sink | None = None,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        status_interval_s: float = 5.0,
        show_status: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.status_interval_s = status_interval_s
        self.show_status = sys.stderr.isatty() if show_status is None else show_status
        self.reloads = 0
        self._stopping = False
        self._status_last: tuple[float, tuple[int, int]] = (time.monotonic(), (0, 0))
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
        cfg.buffer.dir.mkdir(parents=True, exist_ok=True)
        old = cfg.buffer.dir / "oee-state.pickle"  # before checkpoints: OEE alone, pickled
        if old.exists():
            log.info("%s is superseded by checkpoint.npz and no longer read; removing it", old)
            old.unlink(missing_ok=True)
        self.pipeline.recover(cfg.buffer.dir / "checkpoint.npz")
        self.pipeline.warm_up()  # before connecting: a session backlog follows the CONNACK at once
        self.source = MqttSource(cfg.mqtt, self.pipeline.submit)
        self.pipeline.ack = self.source.ack
        self.pipeline.publish = self.source.publish
        host_state = self.pipeline.decoder.will()  # a Sparkplug primary host: Will + retained STATE birth
        if host_state is not None:
            topic, will, birth = host_state
            self.source.will(topic, will, qos=1, retain=True, birth=birth)
            if not cfg.mqtt.clean_session:
                log.warning("[sparkplug] host_id is set but [mqtt] clean_session is false; the Sparkplug spec "
                            "asks a host application for a clean session")
        self.should_exit = asyncio.Event()
        self.http = StatusServer(cfg.http, self) if cfg.http.enabled else None

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.should_exit.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def request_reload(self) -> None:
        """SIGHUP (the handler runs in the event loop): reload the config file, unless shutting down."""
        if self._stopping:
            log.warning("reload requested while shutting down: ignored")
            return
        self.reload()

    def reload(self) -> bool:
        """Re-read the config file and apply it without a restart; an invalid file changes nothing.

        Subscriptions, detector parameters, OEE windows, shifts and ideal cycle times, the per-message
        limits and the log level apply at once; ``[influx]``, ``[buffer]``, ``[deadletter]`` and ``[http]``
        changes are reported and wait for the next restart. Synchronous, so nothing runs in between:
        the open batch is computed with the new settings, a batch being written is not touched.
        """
        if self.config_path is None:
            log.warning("reload requested, but the server was not started from a config file")
            return False
        self.notifier.reloading()
        status = "reload failed; running the old config"
        try:
            status, ok = self._reload()
            return ok
        except Exception:  # a reload must never take the daemon down
            log.exception("reload failed while applying; the running config is kept")
            return False
        finally:
            self.notifier.ready(status)

    def _reload(self) -> tuple[str, bool]:
        assert self.config_path is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, the running config is kept: %s", problem)
            return f"reload refused ({len(exc.problems)} problems); running the old config", False
        later = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.cfg, name)]
        if later:
            log.warning("reload: [%s] changed; that takes effect at the next restart", "], [".join(later))
            new = new.model_copy(update={name: getattr(self.cfg, name) for name in later})
        changed = self.pipeline.reconfigure(new)  # synchronous: nothing runs between these lines
        if "mqtt" in changed:
            self.source.reconfigure(new.mqtt)
        self.cfg = new
        logging.getLogger().setLevel(new.gateway.log_level)
        self.reloads += 1
        log.info("reloaded %s: %s", self.config_path,
                 f"[{'], ['.join(changed)}] changed" if changed else "nothing changed")
        return "reloaded: " + self.status_line(), True

    def status_line(self) -> str:
        """One line for the terminal and systemd's STATUS: rates since the last call, backlog, anomalies."""
        now = time.monotonic()
        st = collect(self.pipeline, self.source)
        counters = (st.pipeline.messages_in, st.output.points_written)
        last_t, last = self._status_last
        self._status_last = (now, counters)
        dt = max(now - last_t, 1e-9)
        rates = [(c - p) / dt for c, p in zip(counters, last, strict=True)]
        backlog = f"{st.pipeline.pending_messages} msgs unflushed"
        if st.wal is not None:
            backlog += f", WAL {st.wal.bytes_pending / 1e6:.1f} MB"
        parts = [
            "broker " + ("connected" if st.mqtt is not None and st.mqtt.connected else "DISCONNECTED"),
            f"{rates[0]:.0f} msgs/s",
            f"{rates[1]:.0f} points/s",
            f"backlog {backlog}",
            f"{st.pipeline.anomalies} anomalies",
            f"{st.pipeline.decode_errors} rejected",
        ]
        low = self._lowest_oee()
        if low is not None:
            parts.append(low)
        return ", ".join(parts)

    def _lowest_oee(self) -> str | None:
        """The lowest recent OEE of the longest window (shifts first); a machine gone quiet drops out."""
        with self.pipeline.compute_lock:  # a batch may be computing in its worker thread
            latest = {w: dict(v) for w, v in self.pipeline.latest_oee.items()}
        labels = sorted((w for w in latest if w != "shift"), key=parse_duration_ns, reverse=True)
        if "shift" in latest:
            labels.insert(0, "shift")
        now = time.time_ns()
        for label in labels:
            horizon = now - (36 * 3600 * 10**9 if label == "shift" else 3 * parse_duration_ns(label))
            recent = [(value, m) for m, (value, end) in latest[label].items() if end >= horizon]
            if recent:
                value, machine = min(recent, key=lambda vm: vm[0])
                return f"lowest OEE ({label}) {value:.2f} {machine.machine}"
        return None

    async def _every(self, interval_s: float, tick: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            tick()

    def _status_tick(self) -> None:
        line = self.status_line()
        self.notifier.status(line)
        if self.show_status:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)

    async def run(self) -> None:
        if self.http is not None:
            await self.http.start()  # /healthz and /readyz answer from the start, /readyz says what is missing
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
        self._status_last = (time.monotonic(), (0, 0))
        status = watchdog = None
        if self.notifier.enabled or self.show_status:
            status = asyncio.create_task(self._every(self.status_interval_s, self._status_tick))
        if self.notifier.watchdog_interval_s is not None:  # keeps pinging through the drain too
            watchdog = asyncio.create_task(self._every(self.notifier.watchdog_interval_s, self.notifier.watchdog))
        self.notifier.ready("running: " + self.status_line())
        try:
            await self._main_loop(*tasks, source)
        finally:
            self._stopping = True
            if status is not None:
                status.cancel()
            self.notifier.stopping()
            try:
                await self._shutdown(flusher, flush_stop, source, source_stop, writer, writer_stop)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                self.notifier.close()


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
            await asyncio.gather(flusher, return_exceptions=True)
        except Exception:
            log.exception("flusher failed during shutdown")
        if flusher.done() and not flusher.cancelled() and flusher.exception() is None:
            await self.pipeline.checkpoint()  # after the last batch: a restart replays nothing
        if writer is not None:
            writer_stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout=max(0.5, deadline - loop.time()))
            except TimeoutError:
                self.pipeline.output.stop()
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)  # ends at once; its OutputStopped is expected
                wal = self.wal
                assert wal is not None
                why = (self.pipeline.output.last_error or "the database is slow")[:160]
                log.warning("shutdown: the database did not take the backlog within shutdown_timeout_s (%s); "
                            "%d records (%d bytes) stay in the WAL and are written at the next start",
                            why, wal.records_pending, wal.bytes_pending)
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
        if self.http is not None:
            await self.http.stop()
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
