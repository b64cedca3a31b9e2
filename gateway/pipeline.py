"""The one module that wires the stages: source → decode → batch → compute → encode → sink → ack.

No stage imports another; each receives what the previous one produced. ``submit`` is the hot path: it
is called straight from the source's callback, decodes into the open columnar batch and returns.
A flusher task closes a batch when it holds ``batch_size`` points or is ``flush_interval_ms`` old,
computes, encodes, makes it durable and only then acknowledges its messages, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Histogram

from gateway.batch import AckToken, DecodedBatch, MachineKey, SeriesRegistry
from gateway.config import GatewayConfig
from gateway.deadletter import DeadLetterFile
from gateway.decode import BatchBuilder, DecoderContext, DecoderRouter
from gateway.detect.context import StateChangeFilter
from gateway.detect.fusion import EVENT_NAMES, AnomalyEngine, AnomalyEvents
from gateway.detect.machine import warm_up as warm_up_model
from gateway.encode import LineProtocolEncoder
from gateway.errors import REJECT_REASONS, DecodeError
from gateway.features import FeatureExtractor, SeverityEvents, SeverityMonitor
from gateway.oee import OeeEngine, OeeRecord
from gateway.output import RunningOutput
from gateway.sinks import Sink
from gateway.stats import PipelineSnapshot
from gateway.view import PlantView
from gateway.wal import WriteAheadLog

__all__ = ["Pipeline", "PipelineStats"]

log = logging.getLogger("gateway.pipeline")

AckCallback = Callable[[Sequence[AckToken]], int]
PublishCallback = Callable[[str, bytes, int, bool], bool]
# Batches close every flush_interval_ms (200 ms by default).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WAL_LOG_FIRST = 16 << 20  # the WAL backlog is logged from 16 MiB on (the database is behind or down)


@dataclass(slots=True)
class PipelineStats:
    messages_in: int = 0
    points_in: int = 0
    decode_errors: int = 0
    batches: int = 0
    points_out: int = 0
    acks: int = 0
    anomalies: int = 0
    oee_windows: int = 0
    batch_latency_ms: float = 0.0


def severity_events(sev: SeverityEvents) -> AnomalyEvents:
    """ISO 10816 zone C/D entries as `anomaly` events: detector ``iso10816``, score 0.75 (C) or 1.0 (D),
    ``expected`` = the zone's lower boundary in mm/s."""
    return AnomalyEvents(
        sev.series, sev.ts_ns, np.zeros(len(sev), np.int64), np.where(sev.zone >= 3, 1.0, 0.75), sev.value,
        sev.limit, np.full(len(sev), np.nan), names=("iso10816",),
    )


class Pipeline:
    """Holds the open batch and the per-series state; flushes in order."""

    def __init__(
        self,
        cfg: GatewayConfig,
        sink: Sink,
        *,
        check_time_window: bool = True,
        emit_stats: bool = True,
        wal: WriteAheadLog | None = None,
        deadletter: DeadLetterFile | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = SeriesRegistry(cfg.gateway.max_series)
        # One decoder per subscription format, kept across reloads (they hold session state).
        self.decoder = DecoderRouter(
            DecoderContext(cfg, self.registry, check_time_window=check_time_window, publish=self._publish)
        )
        self.encoder = LineProtocolEncoder(self.registry)
        self.anomaly = AnomalyEngine(cfg.detect) if cfg.detect.enabled else None
        self.state_filter = StateChangeFilter(cfg.detect.state_change_holdoff_s)
        self.oee = OeeEngine(cfg.oee, cfg.machines) if cfg.oee.enabled else None
        self.oee_state_path: Path | None = None  # set by the server: where open OEE windows survive restarts
        # window label -> machine -> (last OEE, its window's end in ns): the status line's "lowest OEE"
        self.latest_oee: dict[str, dict[MachineKey, tuple[float, int]]] = {}
        self._closed_oee: list[OeeRecord] = []  # windows a reload closed, written with the next batch
        self._oee_saved_ns = time.monotonic_ns()
        self.features = FeatureExtractor(cfg.features, cfg.machines) if cfg.features.enabled else None
        self.severity = SeverityMonitor(cfg.features, cfg.machines) if cfg.features.enabled else None
        self._last_oee_ns = 0
        self.wal = wal
        self.deadletter = deadletter
        self.output = RunningOutput(
            sink, max_retry_s=cfg.influx.max_retry_s, on_rejected=self._reject_lines if deadletter else None
        )
        self.stats = PipelineStats()
        h = cfg.http  # the operator's page reads this view of the plant; fed after compute, bounded
        self.view = PlantView(self.registry, ring_size=h.ring_size, ring_interval_s=h.ring_interval_s,
                              events=h.event_ring) if h.enabled else None
        self.ack: AckCallback | None = None
        self.publish: PublishCallback | None = None  # the source's publish (decoders that answer on the broker)
        self.accepting = True
        self.emit_stats = emit_stats
        self._builder = BatchBuilder()
        self._batch_size = cfg.influx.batch_size
        self._flush_ns = cfg.influx.flush_interval_ms * 1_000_000
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._last_stats_ns = time.monotonic_ns()
        self._wal_appended = asyncio.Event()  # wakes the writer
        self._wal_confirmed = asyncio.Event()  # wakes a flush waiting for room in the WAL
        self._dead_pending = False
        self.backpressure_waits = 0
        self.rejected: Counter[str] = Counter()  # by DecodeError.reason (a small fixed set: metric labels)
        self.anomalies_by_detector: Counter[str] = Counter()
        self.recent_rejects: deque[tuple[float, str, str, str]] = deque(maxlen=20)  # (time, topic, reason, why)
        # Seconds from a batch's first arrival to its ack; unregistered: gateway.http's collector exports it.
        self.batch_latency = Histogram(
            "factory_gateway_batch_latency_seconds",
            "Per flushed batch: first message's arrival to the batch acknowledged.",
            buckets=LATENCY_BUCKETS_S,
            registry=None,
        )
        self._wal_log_at = _WAL_LOG_FIRST

    # -- hot path -------------------------------------------------------------------------------
    def submit(self, topic: str, payload: bytes, token: AckToken | None) -> None:
        """Decode one message into the open batch (called from the source callback)."""
        if not self.accepting:
            return  # not acked: the broker redelivers it to the next session
        b = self._builder
        now = time.time_ns()
        if b.messages == 0:
            b.first_arrival_ns = time.monotonic_ns()
        try:
            self.decoder.decode(topic, payload, now, b)
        except Exception as exc:  # one bad message must never jam the session: reject it, keep going
            if not isinstance(exc, DecodeError):
                log.exception("internal error decoding a message on %r; it is dead-lettered", topic)
                exc = DecodeError(f"internal error while decoding: {exc!r}", reason="internal")
            b.messages += 1
            self._reject(topic, payload, exc, now)
        if b.rejects:  # parts of an accepted message (the rest is in the batch)
            for part in b.rejects:
                self._reject(topic, payload, part, now)
            b.rejects.clear()
        if token is not None:
            b.tokens.append(token)
        if b.points >= self._batch_size:
            self._full.set()

    def _reject(self, topic: str, payload: bytes, exc: DecodeError, now: int) -> None:
        self.stats.decode_errors += 1
        self.rejected[exc.reason] += 1
        self.recent_rejects.append((now / 1e9, topic, exc.reason, str(exc)[:300]))
        if self.deadletter is not None:
            self.deadletter.write(topic, payload, str(exc), now)
            self._dead_pending = True
        if self.stats.decode_errors <= 10 or self.stats.decode_errors % 1000 == 0:  # rate-limited
            log.warning("rejected message on %r: %s (%d so far)", topic, exc, self.stats.decode_errors)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        return self.publish is not None and self.publish(topic, payload, qos, retain)

    # -- flushing -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Before the first message: load the detectors' compiled code (~0.4 s the first batch would wait)."""
        if self.anomaly is not None:
            warm_up_model()

    def load_oee(self, path: Path) -> None:
        """Continue the OEE windows and counter baselines saved at ``path`` (if the settings match)."""
        self.oee_state_path = path
        if self.oee is not None:
            saved = OeeEngine.load(path, self.cfg.oee, self.cfg.machines)
            if saved is not None:
                self.oee = saved
                log.info("OEE: continuing %d machines' open windows from %s", saved.machine_count, path)

    def save_oee(self) -> None:
        """Snapshot the OEE state (periodically and at shutdown); a failure is logged, never fatal."""
        self._oee_saved_ns = time.monotonic_ns()
        if self.oee is None or self.oee_state_path is None:
            return
        try:
            self.oee.save(self.oee_state_path)
        except OSError as exc:
            log.warning("could not save OEE state to %s: %s", self.oee_state_path, exc)

    def reconfigure(self, cfg: GatewayConfig) -> list[str]:
        """Apply a reloaded config at once (between two messages); return the changed ``section`` names.

        Synchronous, so no message or flush runs in between, and it never waits for the database. The
        open batch is computed with the new settings; a batch already being written is not touched.
        Every new component is built before any is swapped in, so a failure leaves the running settings
        as they were. Detector and feature state restart only when their own settings changed (the
        detectors' warm-up runs again); OEE keeps its open windows (:meth:`OeeEngine.reconfigure`), and
        the windows a reload closes are written with the next batch.
        """
        old = self.cfg
        changed = [name for name in type(cfg).model_fields if getattr(cfg, name) != getattr(old, name)]
        if not changed:
            return changed
        anomaly = self.anomaly
        if cfg.detect != old.detect:
            anomaly = AnomalyEngine(cfg.detect) if cfg.detect.enabled else None
        features, severity = self.features, self.severity
        if cfg.features != old.features or cfg.machines != old.machines:
            features = FeatureExtractor(cfg.features, cfg.machines) if cfg.features.enabled else None
            severity = SeverityMonitor(cfg.features, cfg.machines) if cfg.features.enabled else None
        oee = self.oee
        oee_changed = cfg.oee != old.oee or cfg.machines != old.machines
        if oee_changed and cfg.oee.enabled and oee is None:
            oee = OeeEngine(cfg.oee, cfg.machines)
        # -- nothing below can fail: swap -------------------------------------------------------------
        if oee_changed and oee is not None:
            if not cfg.oee.enabled:
                self._closed_oee += oee.flush()
                oee = None
                if self.oee_state_path is not None:  # a stale snapshot must not come back at a later start
                    self.oee_state_path.unlink(missing_ok=True)
            elif oee is self.oee:
                self._closed_oee += oee.reconfigure(cfg.oee, cfg.machines)
            keep = {*cfg.oee.windows, "shift"} if cfg.oee.enabled else set()
            self.latest_oee = {w: v for w, v in self.latest_oee.items() if w in keep}
        self.cfg = cfg
        self.decoder.reconfigure(cfg)  # in place: decoders keep their session state
        self.registry.max_series = cfg.gateway.max_series
        self.anomaly = anomaly
        self.state_filter.holdoff_ns = int(cfg.detect.state_change_holdoff_s * 1e9)
        self.features, self.severity, self.oee = features, severity, oee
        self._batch_size = cfg.influx.batch_size
        self._flush_ns = cfg.influx.flush_interval_ms * 1_000_000
        if oee_changed and oee is not None:
            self.save_oee()  # a restart soon after must find the snapshot made with these settings
        self._full.set()  # flush soon: the windows a reload closed, and the open batch under the new settings
        return changed

    def batch_full(self) -> bool:
        return self._full.is_set()

    def pending(self) -> int:
        return self._builder.messages

    def snapshot(self) -> PipelineSnapshot:
        """This stage's counters for :mod:`gateway.stats`."""
        names = set(EVENT_NAMES if self.cfg.detect.enabled else ()) | set(self.anomalies_by_detector)
        return PipelineSnapshot(
            **asdict(self.stats),
            series=len(self.registry),
            max_series=self.registry.max_series,
            pending_messages=self.pending(),
            backpressure_waits=self.backpressure_waits,
            accepting=self.accepting,
            rejected={reason: self.rejected[reason] for reason in REJECT_REASONS},
            anomalies_by_detector={name: self.anomalies_by_detector[name] for name in sorted(names)},
        )

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush whenever the batch is full or old enough, until ``stop``; then flush what is left."""
        while not stop.is_set():
            b = self._builder
            timeout = self._flush_ns / 1e9
            if b.messages:
                age = time.monotonic_ns() - b.first_arrival_ns
                timeout = max(0.0, (self._flush_ns - age) / 1e9)
            try:
                await asyncio.wait_for(self._full.wait(), timeout=timeout)
            except TimeoutError:
                pass
            if self._builder.messages or self._stats_due() or self._oee_due():
                await self.flush()
            if self.oee_state_path is not None and time.monotonic_ns() - self._oee_saved_ns > 60 * 10**9:
                self.save_oee()
        await self.flush()

    def _oee_due(self) -> bool:
        """OEE windows also close on wall-clock silence (idle_close_s): look at least once a second."""
        if self._closed_oee:
            return True
        return self.oee is not None and time.monotonic_ns() - self._last_oee_ns >= 1_000_000_000

    def _stats_due(self) -> bool:
        return self.emit_stats and time.monotonic_ns() - self._last_stats_ns >= self.cfg.gateway.stats_interval_s * 1e9

    async def flush(self) -> None:
        """Close the open batch; compute, encode, write, then acknowledge its messages."""
        async with self._flush_lock:
            self._full.clear()
            b = self._builder
            tokens = b.tokens
            messages, points = b.messages, b.points
            started = b.first_arrival_ns
            batch = b.take()
            self.stats.messages_in += messages
            self.stats.points_in += points
            body = self.compute_and_encode(batch)
            if self._stats_due():
                body = self.encoder.join([body, self._stats_line()])
            if body:
                if self.wal is not None:
                    await self._append_durably(body)
                else:
                    await self.output.write(body)
                self.stats.points_out += body.count(b"\n") + 1
            if self._dead_pending and self.deadletter is not None:
                self._dead_pending = False
                await asyncio.to_thread(self.deadletter.sync)  # rejected messages are acked only once kept
            if tokens and self.ack is not None:
                self.stats.acks += self.ack(tokens)
            self.stats.batches += 1
            if messages:
                self.stats.batch_latency_ms = (time.monotonic_ns() - started) / 1e6
                self.batch_latency.observe(self.stats.batch_latency_ms / 1e3)

    async def _append_durably(self, body: bytes) -> None:
        """Append to the WAL and fsync once; when the WAL is full, wait (not acking = back-pressure)."""
        wal = self.wal
        assert wal is not None
        while not wal.has_room(len(body)):
            self.backpressure_waits += 1
            if self.backpressure_waits % 100 == 1:
                log.warning("WAL full (%d bytes pending): holding acks until the database catches up",
                            wal.bytes_pending)
            self._wal_confirmed.clear()
            try:
                await asyncio.wait_for(self._wal_confirmed.wait(), timeout=1.0)
            except TimeoutError:
                pass

        def append_and_sync() -> None:
            wal.append(body)
            wal.sync()

        await asyncio.to_thread(append_and_sync)
        self._wal_appended.set()
        if wal.bytes_pending >= self._wal_log_at:  # one line each time the backlog doubles, not per batch
            log.warning("WAL backlog growing: %d bytes in %d records not yet written to the database",
                        wal.bytes_pending, wal.records_pending)
            self._wal_log_at = 2 * wal.bytes_pending

    async def run_writer(self, stop: asyncio.Event, *, max_lines: int | None = None) -> None:
        """Drain the WAL into the database in order, confirming what was accepted, until ``stop``.

        On ``stop`` it keeps going until the WAL is empty (the caller bounds that with a timeout);
        whatever is left is replayed at the next start.
        """
        wal = self.wal
        assert wal is not None
        limit = max_lines or self.cfg.influx.batch_size
        sent = wal.confirmed_id
        while True:
            records = await asyncio.to_thread(wal.read, sent, max_records=64, max_bytes=8 << 20)
            if not records:
                if stop.is_set():
                    return
                self._wal_appended.clear()
                try:
                    await asyncio.wait_for(self._wal_appended.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            # Merge small records into writes of about batch_size lines: fewer, larger HTTP requests.
            chunk: list[bytes] = []
            lines = 0
            for rec in records:
                chunk.append(rec.payload)
                lines += rec.payload.count(b"\n") + 1
                last = rec.id
                if lines >= limit or rec is records[-1]:
                    await self.output.write(b"\n".join(chunk))
                    await asyncio.to_thread(wal.confirm, last)
                    sent = last
                    chunk, lines = [], 0
                    self._wal_confirmed.set()
                    if wal.records_pending == 0 and self._wal_log_at > _WAL_LOG_FIRST:
                        log.info("WAL backlog drained: everything is in the database")
                        self._wal_log_at = _WAL_LOG_FIRST

    def _reject_lines(self, lines: list[bytes], reason: str) -> None:
        if self.deadletter is not None:
            self.deadletter.write_lines(lines, reason)
            self.deadletter.sync()

    def compute_and_encode(self, batch: DecodedBatch) -> bytes:
        """Compute and encode one batch into a single line-protocol body."""
        enc = self.encoder
        tel = batch.telemetry
        n = batch.detect_rows
        self.state_filter.observe(batch.states)
        found: list[AnomalyEvents] = []
        if self.anomaly is not None and (n or batch.states):
            found.append(self.anomaly.process(tel.series[:n], tel.ts_ns[:n], tel.value[:n], self.registry.metrics,
                                              self.registry.machines, batch.states))
        if self.severity is not None and n:
            found.append(severity_events(self.severity.process(
                tel.series[:n], tel.ts_ns[:n], tel.value[:n], self.registry.metrics, self.registry.machines)))
        anomalies = []
        kept_all = []
        for events in found:  # starting or stopping a machine moves every signal: one hold-off for all
            kept = self.state_filter.keep(events, self.registry.machines)
            self.stats.anomalies += len(kept)
            self.anomalies_by_detector.update(kept.detector)
            kept_all.append(kept)
            anomalies.append(enc.anomalies(kept))
        oee = b""
        records: list[OeeRecord] = []
        if self._closed_oee:  # windows a reload closed
            records, self._closed_oee = self._closed_oee, []
        if self.oee is not None:
            self._last_oee_ns = time.monotonic_ns()
            records += self.oee.update(batch.states, batch.counts, time.time_ns())
        self.stats.oee_windows += len(records)
        if self.view is not None:
            self.view.observe(batch, kept_all, records)
        for r in records:
            if r.oee is not None:
                self.latest_oee.setdefault(r.window, {})[r.machine] = (r.oee, r.end_ns)
        oee = enc.oee(records)
        features = b""
        if self.features is not None and batch.waveforms:
            reg = self.registry
            features = enc.features(
                self.features.process(
                    batch.waveforms,
                    [reg.metrics[b.series] for b in batch.waveforms],
                    [reg.machines[b.series] for b in batch.waveforms],
                )
            )
        return enc.join(
            [
                enc.telemetry(tel),
                *anomalies,
                features,
                oee,
                enc.states(batch.states),
                enc.counts(batch.counts),
                enc.device_status(batch.statuses),
                b"\n".join(batch.raw_lines),
            ]
        )

    async def finish(self) -> None:
        """End of a recorded stream (replay): flush, then close every open OEE window as a partial one."""
        await self.flush()
        if self.oee is not None:
            body = self.encoder.oee(self.oee.flush())
            if body:
                await self.output.write(body)

    def _stats_line(self) -> bytes:
        self._last_stats_ns = time.monotonic_ns()
        fields: dict[str, float | int | str | bool | None] = dict(asdict(self.stats))
        fields["series"] = len(self.registry)
        o = self.output.snapshot()
        fields.update(points_written=o.points_written, write_errors=o.write_errors, rejected_lines=o.rejected_lines)
        if self.wal is not None:
            w = self.wal.snapshot()
            fields.update(wal_bytes=w.bytes_pending, wal_records=w.records_pending)
        line = self.encoder.point("gateway_stats", {"instance": self.cfg.gateway.instance}, fields, time.time_ns())
        p = self.snapshot()
        log.info(
            "in %d msgs / %d points, written %d points, decode errors %d, write errors %d, series %d, "
            "last batch %.0f ms",
            p.messages_in, p.points_in, o.points_written, p.decode_errors, o.write_errors, p.series,
            p.batch_latency_ms,
        )
        return line.encode()
