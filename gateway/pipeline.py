"""The one module that wires the stages: source → decode → batch → compute → encode → sink → ack.

No stage imports another; each receives what the previous one produced. ``submit`` is the hot path: it
is called straight from the source's callback, decodes into the open columnar batch and returns.
A flusher task closes a batch when it holds ``batch_size`` points or is ``flush_interval_ms`` old,
computes, encodes, makes it durable and only then acknowledges its messages, in arrival order.

Crash safety of the derived state: each WAL record carries the batch's decoded inputs next to its line
protocol (:mod:`gateway.journal`); between two batches the state of every stateful part is checkpointed
(:mod:`gateway.checkpoint`) and tagged with the last WAL record id; :meth:`Pipeline.recover` loads the
checkpoint and re-runs compute over the records after it without emitting anything again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Histogram

from gateway import __version__, journal
from gateway.batch import I64, AckToken, DecodedBatch, MachineKey, NewerSamples, SeriesRegistry
from gateway.checkpoint import CheckpointError, State, fingerprint, read_checkpoint, set_aside, write_checkpoint
from gateway.config import GatewayConfig
from gateway.deadletter import DeadLetterFile
from gateway.decode import BatchBuilder, DecoderContext, DecoderRouter
from gateway.detect import jit
from gateway.detect.context import StateChangeFilter
from gateway.detect.fusion import EVENT_NAMES, AnomalyEngine, AnomalyEvents
from gateway.detect.machine import subset_breaks
from gateway.detect.machine import warm_up as warm_up_model
from gateway.encode import LineProtocolEncoder
from gateway.errors import REJECT_REASONS, DecodeError
from gateway.features import FeatureExtractor, FeatureRows, SeverityEvents, SeverityMonitor
from gateway.oee import OeeEngine, OeeRecord
from gateway.output import RunningOutput
from gateway.sinks import Sink
from gateway.stats import GatewayStats, PipelineSnapshot
from gateway.view import PlantView
from gateway.wal import WriteAheadLog

if TYPE_CHECKING:
    from gateway.sources.mqtt import MqttSource

__all__ = ["Pipeline", "PipelineStats", "collect"]

log = logging.getLogger("gateway.pipeline")

AckCallback = Callable[[Sequence[AckToken]], int]
Clock = Callable[[], int]
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


def _sample_rows(events: AnomalyEvents, series: I64, ts: I64) -> I64:
    """The batch row of each event's sample (a series and a time name one: the samples the detectors got
    are strictly newer, series by series, in arrival order); not found: after every row.

    >>> ev = AnomalyEvents(np.array([1, 0]), np.array([7, 5]), np.zeros(2, np.int64), *np.ones((4, 2)))
    >>> _sample_rows(ev, np.array([0, 1, 1, 0]), np.array([5, 6, 7, 8])).tolist()
    [2, 0]
    """
    out = np.full(len(events), 1 << 62, np.int64)
    if len(events) == 0:
        return out
    idx = np.flatnonzero(np.isin(series, events.series))
    o = idx[np.lexsort((ts[idx], series[idx]))]
    ss, tt = series[o], ts[o]
    lo = np.searchsorted(ss, events.series, "left")
    hi = np.searchsorted(ss, events.series, "right")
    for i, (a, b, t) in enumerate(zip(lo.tolist(), hi.tolist(), events.ts_ns.tolist(), strict=True)):
        j = a + int(np.searchsorted(tt[a:b], t))
        if j < b and tt[j] == t:
            out[i] = o[j]
    return out


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
        clock: Clock = time.time_ns,
    ) -> None:
        self.cfg = cfg
        self.clock = clock  # the wall clock compute reads (OEE idle close); recorded with each batch
        self.registry = SeriesRegistry(cfg.gateway.max_series)
        # One decoder per subscription format, kept across reloads (they hold session state).
        self.decoder = DecoderRouter(
            DecoderContext(cfg, self.registry, check_time_window=check_time_window, publish=self._publish)
        )
        self.encoder = LineProtocolEncoder(self.registry)
        self.anomaly = AnomalyEngine(cfg.detect) if cfg.detect.enabled else None
        self.state_filter = StateChangeFilter(cfg.detect.state_change_holdoff_s)
        self.oee = OeeEngine(cfg.oee, cfg.machines) if cfg.oee.enabled else None
        self.newer = NewerSamples()  # a redelivered sample is not learned twice
        self.checkpoint_path: Path | None = None  # set by recover(): where the derived state survives restarts
        # window label -> machine -> (last OEE, its window's end in ns): the status line's "lowest OEE"
        self.latest_oee: dict[str, dict[MachineKey, tuple[float, int]]] = {}
        self._closed_oee: list[OeeRecord] = []  # windows a reload closed, written with the next batch
        self._checkpoint_ns = time.monotonic_ns()
        self._checkpoint_soon = False
        self._consistent = True  # False between computing a batch and its WAL record being durable
        # registry lengths the last WAL record carries: the next record carries the entries after them
        self._journal_machines = 0
        self._journal_series = 0
        self.replayed_records = 0
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
        # A batch is computed and encoded in a worker thread (the detectors' compiled step releases the GIL,
        # so the event loop reads and decodes the next messages meanwhile). This lock is held while it runs;
        # everything on the event loop that reads or swaps compute state (reload, the plant view's API,
        # stats, the status line) takes it first.
        self.compute_lock = threading.RLock()
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
                n = self.rejected["internal"] + 1
                if n <= 3 or n % 1000 == 0:  # the traceback of the first few (a bug repeats on every message)
                    log.exception("internal error decoding a message on %r; it is dead-lettered (%d so far)",
                                  topic, n)
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
            how = ("compiled ahead of time (numba not loaded)" if jit.MODE == "aot" else
                   "JIT-compiled by numba (~140 MB more memory; `python -m gateway.detect.aot` builds them ahead"
                   " of time)")
            log.info("detector kernels: %s, machine model on %d thread(s)", how, self.anomaly.model.threads)

    # -- checkpoints ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the settings the derived state depends on: a checkpoint made with others is not used."""
        c = self.cfg
        return fingerprint({
            "detect": c.detect.model_dump(mode="json", exclude={"threads"}),  # the same state with any number
            "oee": c.oee.model_dump(mode="json"),
            "features": c.features.model_dump(mode="json"),
            "machines": {k: v.model_dump(mode="json") for k, v in c.machines.items()},
        })

    def snapshot_state(self) -> State:
        """Every stateful compute part (copies, so the file can be written while the pipeline runs)."""
        st = State({"journal": [self._journal_machines, self._journal_series]})
        reg = self.registry.snapshot()
        if self.wal is not None:  # only what a WAL record carries: later entries come back with their record
            reg.meta["machines"] = reg.meta["machines"][: self._journal_machines]
            reg.arrays = {k: v[: self._journal_series] for k, v in reg.arrays.items()}
        st.put("registry", reg)
        st.put("newer", self.newer.snapshot())
        st.put("state_filter", self.state_filter.snapshot())
        for name, part in (("anomaly", self.anomaly), ("oee", self.oee), ("features", self.features),
                           ("severity", self.severity)):
            if part is not None:
                st.put(name, part.snapshot())
        decoders = self.decoder.snapshot()
        if decoders.meta:
            st.put("decoders", decoders)
        return st

    def restore_state(self, st: State) -> None:
        """Continue from :meth:`snapshot_state` (settings already checked by the fingerprint)."""
        self.registry.restore(st.sub("registry"))
        self._journal_machines, self._journal_series = self.registry.machine_count(), len(self.registry)
        self.newer.restore(st.sub("newer"))
        self.state_filter.restore(st.sub("state_filter"))
        if self.anomaly is not None:
            self.anomaly.restore(st.sub("anomaly"), self.registry.metrics)
        for name, part in (("oee", self.oee), ("features", self.features), ("severity", self.severity)):
            if part is not None:
                part.restore(st.sub(name))
        if st.has("decoders"):
            self.decoder.restore(st.sub("decoders"))

    def _fresh_state(self) -> None:
        cfg = self.cfg
        self.registry.restore(SeriesRegistry().snapshot())
        self._journal_machines = self._journal_series = 0
        self.newer = NewerSamples()
        self.state_filter = StateChangeFilter(cfg.detect.state_change_holdoff_s)
        self.anomaly = AnomalyEngine(cfg.detect) if cfg.detect.enabled else None
        self.oee = OeeEngine(cfg.oee, cfg.machines) if cfg.oee.enabled else None
        self.features = FeatureExtractor(cfg.features, cfg.machines) if cfg.features.enabled else None
        self.severity = SeverityMonitor(cfg.features, cfg.machines) if cfg.features.enabled else None

    def recover(self, path: Path) -> None:
        """At start: load the checkpoint at ``path``, then re-run compute over the WAL records after it.

        Nothing is emitted again: what those records produced is in the database or still in the WAL.
        A checkpoint that is corrupt, from a newer version or made with other settings is set aside as
        ``*.rejected`` with one log line; state is then rebuilt from what the WAL still holds.
        """
        self.checkpoint_path = path
        started = time.monotonic()
        after: int | None = 0
        try:
            ck = read_checkpoint(path, fingerprint=self.fingerprint())
        except FileNotFoundError:
            ck = None
        except CheckpointError as exc:
            ck = None
            moved = set_aside(path)
            if exc.intact is not None:  # other settings: its numbering is good, its state is not used
                self.registry.restore(exc.intact.state.sub("registry"))
                self._journal_machines, self._journal_series = self.registry.machine_count(), len(self.registry)
                after = exc.intact.wal_id
                what = "detector, features and OEE state rebuilt from the WAL records after it"
            else:
                what = "derived state starts fresh from the WAL records still on disk"
            log.warning("checkpoint %s not used: %s; set aside as %s; %s", path, exc, moved.name, what)
        if ck is not None:
            try:
                self.restore_state(ck.state)
                after = ck.wal_id
            except (CheckpointError, ValueError, KeyError, TypeError, IndexError) as exc:
                self._fresh_state()
                moved = set_aside(path)
                log.warning("checkpoint %s not used: it does not fit this gateway (%s); set aside as %s; "
                            "derived state starts fresh from the WAL records still on disk", path, exc, moved.name)
                after = 0
        replayed = self._replay(after or 0) if self.wal is not None else 0
        if ck is not None or replayed:
            log.info("derived state recovered in %.2f s: %s, %d WAL records re-computed (nothing re-sent)",
                     time.monotonic() - started,
                     f"checkpoint of WAL record {ck.wal_id}" if ck is not None else "no checkpoint", replayed)

    def _replay(self, after: int) -> int:
        """Re-run compute over the records after ``after`` (state only; outputs are already durable)."""
        wal = self.wal
        assert wal is not None
        done = 0
        for rec in wal.retained(after):
            data = journal.compute_input(rec.payload)
            if data is None:
                continue  # written by a gateway before checkpoints: line protocol only
            try:
                batch, now = journal.decode_input(data, self.registry)
            except journal.JournalError as exc:
                log.warning("WAL record %d cannot be re-computed (%s): state rebuilt up to the record before",
                            rec.id, exc)
                break
            self._compute(batch, now, live=False)
            done += 1
        self._journal_machines, self._journal_series = self.registry.machine_count(), len(self.registry)
        self.replayed_records += done
        return done

    def checkpoint_due(self) -> bool:
        interval = self.cfg.buffer.checkpoint_interval_s
        if self.checkpoint_path is None or (interval <= 0 and not self._checkpoint_soon):
            return False
        return self._checkpoint_soon or time.monotonic_ns() - self._checkpoint_ns >= interval * 1e9

    async def checkpoint(self) -> bool:
        """Write a checkpoint of the derived state covering the WAL so far; False if skipped or failed.

        The copy is taken between two batches (under the flush lock), the file is written in a thread.
        """
        path = self.checkpoint_path
        if path is None:
            return False
        async with self._flush_lock:
            if not self._consistent or self._closed_oee:  # a batch half done, or reload-closed windows unsent
                return False
            started = time.monotonic()
            state = self.snapshot_state()
            wal_id = self.wal.last_id if self.wal is not None else 0
            self._checkpoint_ns = time.monotonic_ns()
            self._checkpoint_soon = False
            copied = time.monotonic() - started
        try:
            size = await asyncio.to_thread(write_checkpoint, path, state, fingerprint=self.fingerprint(),
                                           wal_id=wal_id)
        except (OSError, ValueError) as exc:
            log.warning("could not write the checkpoint %s: %s", path, exc)
            return False
        if self.wal is not None:
            await asyncio.to_thread(self.wal.cover, wal_id)
        log.debug("checkpoint of WAL record %d: %d bytes, copy %.0f ms, total %.0f ms", wal_id, size,
                  copied * 1e3, (time.monotonic() - started) * 1e3)
        return True

    def reconfigure(self, cfg: GatewayConfig) -> list[str]:
        """Apply a reloaded config at once (between two messages); return the changed ``section`` names.

        Synchronous, so no message or flush runs in between, and it never waits for the database (only
        for a batch being computed in its worker thread to finish: ``compute_lock``). The open batch is
        computed with the new settings; a batch already being written is not touched.
        Every new component is built before any is swapped in, so a failure leaves the running settings
        as they were. Detector and feature state restart only when their own settings changed (the
        detectors' warm-up runs again); OEE keeps its open windows (:meth:`OeeEngine.reconfigure`), and
        the windows a reload closes are written with the next batch.
        """
        with self.compute_lock:  # between two batches: the one being computed finishes first
            return self._reconfigure(cfg)

    def _reconfigure(self, cfg: GatewayConfig) -> list[str]:
        old = self.cfg
        changed = [name for name in type(cfg).model_fields if getattr(cfg, name) != getattr(old, name)]
        if not changed:
            return changed
        anomaly = self.anomaly
        threads_only = cfg.detect.model_copy(update={"threads": old.detect.threads}) == old.detect
        if cfg.detect != old.detect and not (threads_only and anomaly is not None):
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
            elif oee is self.oee:
                self._closed_oee += oee.reconfigure(cfg.oee, cfg.machines)
            keep = {*cfg.oee.windows, "shift"} if cfg.oee.enabled else set()
            self.latest_oee = {w: v for w, v in self.latest_oee.items() if w in keep}
        self.cfg = cfg
        self.decoder.reconfigure(cfg)  # in place: decoders keep their session state
        self.registry.max_series = cfg.gateway.max_series
        if anomaly is not None and anomaly is self.anomaly:  # only [detect] threads changed, if anything: state kept
            anomaly.config = cfg.detect
            anomaly.model.set_threads(cfg.detect.model_threads())
        self.anomaly = anomaly
        self.state_filter.holdoff_ns = int(cfg.detect.state_change_holdoff_s * 1e9)
        self.features, self.severity, self.oee = features, severity, oee
        if self.view is not None:  # shifts added, removed or moved: what each tile shows as this shift so far
            for key in self.view.machines:
                self.view.observe_open(key, self._open_shifts(key))
        self._batch_size = cfg.influx.batch_size
        self._flush_ns = cfg.influx.flush_interval_ms * 1_000_000
        self._checkpoint_soon = True  # a restart soon after must find a checkpoint made with these settings
        self._full.set()  # flush soon: the windows a reload closed, and the open batch under the new settings
        return changed

    def batch_full(self) -> bool:
        return self._full.is_set()

    def pending(self) -> int:
        return self._builder.messages

    def snapshot(self) -> PipelineSnapshot:
        """This stage's counters for :mod:`gateway.stats`."""
        with self.compute_lock:
            by_detector = dict(self.anomalies_by_detector)
        names = set(EVENT_NAMES if self.cfg.detect.enabled else ()) | set(by_detector)
        return PipelineSnapshot(
            **asdict(self.stats),
            series=len(self.registry),
            max_series=self.registry.max_series,
            pending_messages=self.pending(),
            backpressure_waits=self.backpressure_waits,
            accepting=self.accepting,
            rejected={reason: self.rejected[reason] for reason in REJECT_REASONS},
            anomalies_by_detector={name: by_detector.get(name, 0) for name in sorted(names)},
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
            if self.checkpoint_due():
                await self.checkpoint()
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
            now = self.clock()
            idle_closes = self.oee.idle_closes if self.oee is not None else 0
            self._consistent = False
            body = await asyncio.to_thread(self._compute_and_encode_locked, batch, now)
            if self._stats_due():
                body = self.encoder.join([body, self._stats_line()])
            changed = bool(messages) or (self.oee is not None and self.oee.idle_closes != idle_closes)
            if self.wal is not None and (body or changed):
                # the inputs ride with the output: a restart re-computes them from here
                reg = self.registry
                record = journal.pack(body, journal.encode_input(batch, now, reg, self._journal_machines,
                                                                 self._journal_series))
                self._journal_machines, self._journal_series = reg.machine_count(), len(reg)
                await self._append_durably(record)
            elif body:
                await self.output.write(body)
            self._consistent = True
            if body:
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
                lp = journal.line_protocol(rec.payload)
                if lp:
                    chunk.append(lp)
                    lines += lp.count(b"\n") + 1
                last = rec.id
                if lines >= limit or rec is records[-1]:
                    if chunk:
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

    def _compute_and_encode_locked(self, batch: DecodedBatch, now_ns: int) -> bytes:
        with self.compute_lock:
            return self.compute_and_encode(batch, now_ns)

    def compute_and_encode(self, batch: DecodedBatch, now_ns: int | None = None) -> bytes:
        """Compute and encode one batch into a single line-protocol body (``now_ns``: the wall clock)."""
        enc = self.encoder
        anomalies, records, features = self._compute(batch, self.clock() if now_ns is None else now_ns, live=True)
        return enc.join(
            [
                enc.telemetry(batch.telemetry),
                *(enc.anomalies(kept) for kept in anomalies),
                enc.features(features) if features is not None else b"",
                enc.oee(records),
                enc.states(batch.states),
                enc.counts(batch.counts),
                enc.device_status(batch.statuses),
                b"\n".join(batch.raw_lines),
            ]
        )

    def _compute(
        self, batch: DecodedBatch, now_ns: int, *, live: bool
    ) -> tuple[list[AnomalyEvents], list[OeeRecord], FeatureRows | None]:
        """Run every stateful part over one batch; ``live`` False (a rebuild) leaves stats and the view."""
        tel = batch.telemetry
        n = batch.detect_rows
        series, ts, value = tel.series[:n], tel.ts_ns[:n], tel.value[:n]
        # where each state arrived among the samples (a batch of an older WAL record: before them all)
        state_rows = np.asarray(batch.state_rows if len(batch.state_rows) == len(batch.states)
                                else np.zeros(len(batch.states)), np.int64)
        breaks = np.asarray(batch.group_breaks, np.int64)
        if n:
            ok = self.newer.keep(series, ts)
            if not ok.all():
                kept_rows = np.flatnonzero(ok)
                # the kept samples' groups: as the batch's, wherever samples were left out between them
                breaks = subset_breaks(kept_rows, self.registry.series_machine_ids()[series], ts, breaks)
                series, ts, value = series[ok], ts[ok], value[ok]
                n = int(series.shape[0])
                if state_rows.shape[0]:
                    state_rows = np.searchsorted(kept_rows, state_rows)  # the kept samples before each
        self.state_filter.observe(batch.states, state_rows.tolist())
        found: list[AnomalyEvents] = []
        if self.anomaly is not None and (n or batch.states):
            found.append(self.anomaly.process(series, ts, value, self.registry.metrics, self.registry.machines,
                                              batch.states, state_rows, self.registry.machine_list,
                                              breaks))
        if self.severity is not None and n:
            found.append(severity_events(self.severity.process(
                series, ts, value, self.registry.metrics, self.registry.machines)))
        kept_all = []
        for events in found:  # starting or stopping a machine moves every signal: one hold-off for all
            rows = _sample_rows(events, series, ts) if self.state_filter.has_new_changes else None
            kept = self.state_filter.keep(events, self.registry.machines, rows)
            if live:
                self.stats.anomalies += len(kept)
                self.anomalies_by_detector.update(kept.detector)
            kept_all.append(kept)
        records: list[OeeRecord] = []
        if self._closed_oee and live:  # windows a reload closed
            records, self._closed_oee = self._closed_oee, []
        if self.oee is not None:
            if live:
                self._last_oee_ns = time.monotonic_ns()
            arrival = (batch.state_seq, batch.count_seq) if batch.state_seq or batch.count_seq else None
            records += self.oee.update(batch.states, batch.counts, now_ns, arrival)
        if live:
            self.stats.oee_windows += len(records)
            if self.view is not None:
                self.view.observe(batch, kept_all, records)
                if self.oee is not None and self.cfg.oee.shifts:  # a tile shows this shift so far
                    # open windows move only with events and closes: refresh those machines' shifts
                    moved = {e.machine for e in batch.states} | {c.machine for c in batch.counts} \
                        | {r.machine for r in records}
                    for machine in moved:
                        self.view.observe_open(machine, self._open_shifts(machine))
        for r in records:
            if r.oee is not None:
                self.latest_oee.setdefault(r.window, {})[r.machine] = (r.oee, r.end_ns)
        features = None
        if self.features is not None and batch.waveforms:
            reg = self.registry
            features = self.features.process(
                batch.waveforms,
                [reg.metrics[b.series] for b in batch.waveforms],
                [reg.machines[b.series] for b in batch.waveforms],
            )
        return kept_all, records, features

    def _open_shifts(self, machine: MachineKey) -> list[OeeRecord]:
        """The machine's open shift windows so far (none without OEE or shifts)."""
        if self.oee is None or not self.cfg.oee.shifts:
            return []
        return [r for r in self.oee.open_records(machine) if r.shift is not None]

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


def collect(pipeline: Pipeline, source: MqttSource | None = None) -> GatewayStats:
    """Every stage's snapshot at one instant (:mod:`gateway.stats`), what the page, the API, Prometheus,
    the status line and the ``gateway_stats`` points all render."""
    return GatewayStats(
        version=__version__,
        instance=pipeline.cfg.gateway.instance,
        pipeline=pipeline.snapshot(),
        output=pipeline.output.snapshot(),
        wal=None if pipeline.wal is None else pipeline.wal.snapshot(),
        deadletter=None if pipeline.deadletter is None else pipeline.deadletter.snapshot(),
        mqtt=None if source is None else source.snapshot(),
    )
