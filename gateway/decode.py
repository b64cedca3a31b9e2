"""Decode stage: one MQTT message (topic + payload bytes) → rows appended to a columnar batch.

A message is validated whole before anything is appended, so a bad message never leaves half its
points behind; the :class:`~gateway.errors.DecodeError` names the field and why.

>>> from gateway.config import GatewayConfig, GatewaySection, Subscription
>>> dec = Decoder("factory/{site}/{area}/{line}/{machine}/{channel}", [Subscription(topic="#")],
...               GatewaySection(), SeriesRegistry())
>>> out = BatchBuilder()
>>> dec.decode("factory/s/a/l/m1/telemetry", b'{"ts": 1763900000.5, "values": {"t": 1.5}}',
...            1763900000_000000000, out)
1
>>> b = out.take(); b.telemetry.ts_ns.tolist(), b.telemetry.value.tolist()
([1763900000500000000], [1.5])
"""

from __future__ import annotations

import importlib
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import orjson
from pydantic import ValidationError

from gateway.batch import (
    AckToken,
    CountEvent,
    DecodedBatch,
    MachineKey,
    SeriesRegistry,
    StateEvent,
    StatusEvent,
    TelemetryBatch,
    WaveformBlock,
)
from gateway.checkpoint import State
from gateway.config import GatewayConfig, GatewaySection, Subscription
from gateway.errors import CardinalityError, DecodeError
from gateway.lineproto import machine_tag_pairs
from gateway.schema import (
    MAX_EPOCH_S,
    CountMessage,
    StateMessage,
    TelemetryColumnar,
    TelemetryFixedRate,
    TelemetrySample,
    ts_to_ns,
)
from gateway.topic import TopicParser, topic_matches

__all__ = [
    "DECODERS",
    "AckToken",
    "BatchBuilder",
    "Decoder",
    "DecoderContext",
    "DecoderRouter",
    "MessageDecoder",
    "describe_validation_error",
]

Format = Literal["json", "line", "auto"]
PublishCallback = Callable[[str, bytes, int, bool], bool]  # topic, payload, qos, retain -> sent


def describe_validation_error(exc: ValidationError) -> str:
    """Turn a pydantic error into ``field: message; field: message``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


@dataclass(slots=True)
class _Route:
    """What a topic resolves to, cached: devices publish on the same few topics again and again."""

    machine: MachineKey
    channel: str
    format: Format
    # metric name -> series id, for names already validated on this topic; None until the first (a state or
    # count topic never has one: no empty dict for each)
    sids: dict[str, int] | None


class BatchBuilder:
    """Accumulates decoded rows in compact arrays until the pipeline flushes them."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.series = array("q")
        self.ts_ns = array("q")
        self.values = array("d")
        # One chunk per columnar message (time-major), and the scalar row count when it arrived: take()
        # interleaves them, so the detect rows come out in arrival order.
        self.column_chunks: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
        self.chunk_at: list[int] = []
        # scalar rows where a message starts at the timestamp of the row before it: one machine's samples
        # at one timestamp are modelled as a group, and a group must not span two messages (a batch may
        # be cut between them)
        self.breaks: list[int] = []
        self.last_ts = -(2**63)  # timestamp of the last scalar row
        # Raw samples of fixed-rate blocks: written, but analysed by window features, not the detectors.
        self.wave_chunks: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
        self.waveforms: list[WaveformBlock] = []
        self.states: list[StateEvent] = []
        self.counts: list[CountEvent] = []
        # where each state / count arrived: (scalar rows, columnar chunks, messages) before it
        self.state_at: list[tuple[int, int, int]] = []
        self.count_at: list[tuple[int, int, int]] = []
        self.raw_lines: list[bytes] = []
        self.statuses: list[StatusEvent] = []
        self.tokens: list[AckToken] = []
        # Parts of an accepted message that could not be used (the rest was): dead-lettered by the pipeline.
        self.rejects: list[DecodeError] = []
        self.points = 0
        self.messages = 0
        self.first_arrival_ns = 0

    def mark_message(self, first_ts: int, last_ts: int) -> None:
        """Scalar rows of one message at ``first_ts``..``last_ts`` are about to be appended."""
        if first_ts == self.last_ts:
            self.breaks.append(len(self.series))
        self.last_ts = last_ts

    def add_state(self, event: StateEvent) -> None:
        """A state event, arriving after the rows appended so far."""
        self.states.append(event)
        self.state_at.append((len(self.series), len(self.column_chunks), self.messages))

    def add_count(self, event: CountEvent) -> None:
        """A count event, arriving after the rows appended so far."""
        self.counts.append(event)
        self.count_at.append((len(self.series), len(self.column_chunks), self.messages))

    def add_columns(self, sids: list[int], ts: np.ndarray[Any, Any], values: list[np.ndarray[Any, Any]]) -> None:
        """One columnar message: ``values[j]`` of series ``sids[j]`` at ``ts``, kept as rows sorted by
        (timestamp, then metric order), after the rows appended so far."""
        n, m = ts.shape[0], len(sids)
        o = np.argsort(ts, kind="stable")
        if (o == np.arange(n)).all():
            tt = ts
        else:
            tt = ts[o]
            values = [v[o] for v in values]
        self.column_chunks.append((np.tile(np.asarray(sids, np.int64), n), np.repeat(tt, m),
                                   np.stack(values, axis=1).ravel() if m > 1 else values[0]))
        self.chunk_at.append(len(self.series))

    def _breaks(self, before: list[int]) -> list[int]:
        """Detect rows a group must not extend over: the scalar breaks, and every columnar message's
        first row and the row after it."""
        if not self.column_chunks:
            return list(self.breaks)
        at = np.asarray(self.chunk_at, np.int64)
        chunk_rows = np.asarray(before, np.int64)
        scalar = np.asarray(self.breaks, np.int64)
        out = scalar + chunk_rows[np.searchsorted(at, scalar, side="right")]  # the chunks before each
        starts = at + chunk_rows[:-1]
        return sorted({*out.tolist(), *starts.tolist(), *(starts + np.diff(chunk_rows)).tolist()})

    def take(self) -> DecodedBatch:
        """Hand over everything accumulated and start empty.

        The detect rows are in arrival order (a columnar message's rows where it arrived, time-major);
        every state and count gets its arrival position: ``state_rows`` (detect rows before it) and
        ``state_seq`` / ``count_seq`` (messages before it); ``group_breaks`` are the rows where a message
        starts at the timestamp of the row before it.
        """
        s = np.frombuffer(self.series, dtype=np.int64) if self.series else np.empty(0, np.int64)
        t = np.frombuffer(self.ts_ns, dtype=np.int64) if self.ts_ns else np.empty(0, np.int64)
        v = np.frombuffer(self.values, dtype=np.float64) if self.values else np.empty(0, np.float64)
        cc = self.column_chunks
        detect_rows = len(s) + sum(len(c[0]) for c in cc)
        before = [0]  # chunk rows before chunk k
        for c in cc:
            before.append(before[-1] + len(c[0]))
        if cc or self.wave_chunks:
            ps: list[np.ndarray[Any, Any]] = []
            pt: list[np.ndarray[Any, Any]] = []
            pv: list[np.ndarray[Any, Any]] = []
            prev = 0
            for at, (cs, ct, cv) in zip(self.chunk_at, cc, strict=True):
                if at > prev:
                    ps.append(s[prev:at])
                    pt.append(t[prev:at])
                    pv.append(v[prev:at])
                    prev = at
                ps.append(cs)
                pt.append(ct)
                pv.append(cv)
            ps.append(s[prev:])
            pt.append(t[prev:])
            pv.append(v[prev:])
            for c in self.wave_chunks:
                ps.append(c[0])
                pt.append(c[1])
                pv.append(c[2])
            s, t, v = np.concatenate(ps), np.concatenate(pt), np.concatenate(pv)
        batch = DecodedBatch(
            telemetry=TelemetryBatch(s, t, v),
            waveforms=self.waveforms,
            states=self.states,
            counts=self.counts,
            raw_lines=self.raw_lines,
            statuses=self.statuses,
            detect_rows=detect_rows,
            state_rows=[a + before[c] for a, c, _ in self.state_at],
            group_breaks=self._breaks(before),
            state_seq=[q for _, _, q in self.state_at],
            count_seq=[q for _, _, q in self.count_at],
        )
        self._reset()
        return batch


_LP_KEY = re.compile(rb"^((?:[^ \\]|\\.)+) (.+)$", re.S)
_LP_TS = re.compile(rb"^(.*) (-?\d+)$", re.S)
_UNESCAPED_COMMA = re.compile(rb"(?<!\\),")
_UNESCAPED_QUOTE = re.compile(rb'(?<!\\)(?:\\\\)*"')


def _append_sample(out: BatchBuilder, sids: list[int], ts_ns: int, values: dict[str, Any]) -> int:
    """One timestamp, one value per series id (in ``values`` order)."""
    # BatchBuilder.mark_message inline: this is the one-sample JSON hot path (no method call per message)
    if ts_ns == out.last_ts:
        out.breaks.append(len(out.series))
    out.last_ts = ts_ns
    out.series.extend(sids)
    out.ts_ns.extend([ts_ns] * len(sids))
    out.values.extend(values.values())
    return len(sids)


class Decoder:
    """Validates payloads against :mod:`gateway.schema` and appends them to a :class:`BatchBuilder`."""

    def __init__(
        self,
        topic_template: str,
        subscriptions: list[Subscription],
        limits: GatewaySection,
        registry: SeriesRegistry,
        *,
        check_time_window: bool = True,
    ) -> None:
        self.topics = TopicParser(topic_template)
        self.subscriptions = subscriptions
        self.limits = limits
        self.registry = registry
        self.check_time_window = check_time_window
        self._past_ns = int(limits.max_past_s * 1e9)
        self._future_ns = int(limits.max_future_s * 1e9)
        self._tag_cache: dict[MachineKey, tuple[tuple[bytes, bytes], ...]] = {}
        self._routes: dict[str, _Route] = {}

    @classmethod
    def from_context(cls, ctx: DecoderContext) -> Decoder:
        """The registry's factory (json, line and auto subscriptions share one)."""
        cfg = ctx.cfg
        return cls(cfg.mqtt.topic_template, cfg.mqtt.subscriptions(), cfg.gateway, ctx.registry,
                   check_time_window=ctx.check_time_window)

    def reconfigure(self, cfg: GatewayConfig) -> None:
        """Take reloaded settings in place; the topic caches start over (the template may have changed)."""
        self.topics = TopicParser(cfg.mqtt.topic_template)
        self.subscriptions = cfg.mqtt.subscriptions()
        self.limits = cfg.gateway
        self._past_ns = int(cfg.gateway.max_past_s * 1e9)
        self._future_ns = int(cfg.gateway.max_future_s * 1e9)
        self._routes = {}

    def _route(self, topic: str) -> _Route:
        route = self._routes.get(topic)
        if route is None:
            machine, channel = self.topics.parse_uncached(topic)  # the route is the topic's cache
            route = _Route(machine, channel, self._format(topic), None)
            if len(self._routes) < 200_000:
                self._routes[topic] = route
        return route

    def _format(self, topic: str) -> Format:
        """The payload format of the first subscription matching ``topic`` (cached in its route)."""
        fmt = next((sub.format for sub in self.subscriptions if topic_matches(sub.topic, topic)), "auto")
        if fmt == "json":
            return "json"
        if fmt == "line":
            return "line"
        return "auto"  # sparkplug subscriptions are routed to their own decoder by DecoderRouter

    def decode(self, topic: str, payload: bytes, arrival_ns: int, out: BatchBuilder) -> int:
        """Decode one message into ``out``; return the number of points it produced."""
        if len(payload) > self.limits.max_payload_bytes:
            raise DecodeError(
                f"payload is {len(payload)} bytes, over max_payload_bytes={self.limits.max_payload_bytes}",
                reason="too_large",
            )
        route = self._route(topic)
        machine, channel = route.machine, route.channel
        if channel == "telemetry":
            fmt = route.format
            if fmt == "line" or (fmt == "auto" and payload.lstrip()[:1] not in (b"{", b"[")):
                n = self._decode_lines(machine, payload, arrival_ns, out)
            else:
                data = self._json(payload)
                fast = self._fast_sample(route, data, arrival_ns, out) if type(data) is dict else None
                n = fast if fast is not None else self._decode_telemetry(route, data, arrival_ns, out)
        elif channel == "state":
            msg = self._validate(StateMessage, self._json(payload))
            self.registry.machine_id(machine)  # the machine cap (OEE keeps state per machine)
            ts = self._ts(msg.ts, arrival_ns, "ts")
            out.add_state(StateEvent(machine, ts, msg.state, msg.reason))
            n = 1
        else:
            cmsg = self._validate(CountMessage, self._json(payload))
            self.registry.machine_id(machine)
            ts = self._ts(cmsg.ts, arrival_ns, "ts")
            out.add_count(CountEvent(machine, ts, cmsg.total, cmsg.good))
            n = 1
        out.points += n
        out.messages += 1
        return n

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _json(payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            if isinstance(exc.__cause__, UnicodeDecodeError) or "utf-8" in str(exc).lower():
                raise DecodeError(f"payload is not valid UTF-8: {exc}", reason="encoding") from exc
            raise DecodeError(f"payload is not valid JSON: {exc}", reason="json") from exc

    @staticmethod
    def _validate(model: type[Any], data: Any) -> Any:
        if not isinstance(data, dict):
            raise DecodeError(f"payload must be a JSON object, got {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(describe_validation_error(exc)) from exc

    def _check_window(self, ts_min: int, ts_max: int, arrival_ns: int, field: str) -> None:
        if not self.check_time_window:
            return
        if ts_min < arrival_ns - self._past_ns:
            raise DecodeError(f"{field}: timestamp is more than max_past_s={self.limits.max_past_s:g} s old",
                              reason="time_window")
        if ts_max > arrival_ns + self._future_ns:
            raise DecodeError(f"{field}: timestamp is more than max_future_s={self.limits.max_future_s:g} s ahead",
                              reason="time_window")

    def _ts(self, ts: float | str | None, arrival_ns: int, field: str) -> int:
        if ts is None:
            return arrival_ns
        ns = ts_to_ns(ts)
        self._check_window(ns, ns, arrival_ns, field)
        return ns

    def _series_ids(self, route: _Route, names: list[str]) -> list[int]:
        reg = self.registry
        new = [n for n in names if reg.lookup(route.machine, n) is None]
        if new and len(reg) + len(new) > reg.max_series:
            # Checked before registering any, so a rejected message uses none of the budget.
            raise CardinalityError(
                f"values: {len(new)} new series ({new[0]!r}...) on {route.machine.machine} would exceed "
                f"max_series={reg.max_series}"
            )
        ids = [reg.series_id(route.machine, name) for name in names]
        if route.sids is None:
            route.sids = {}
        route.sids.update(zip(names, ids, strict=True))  # validated: later messages take the fast path
        return ids

    def _fast_sample(self, route: _Route, data: dict[str, Any], arrival_ns: int, out: BatchBuilder) -> int | None:
        """The common case, one sample of known metrics, checked without building a model.

        Returns None whenever anything is unusual; the full :class:`TelemetrySample` validation then
        decides (and names the problem), so this path accepts a subset of what the model accepts.
        """
        values = data.get("values")
        if type(values) is not dict or not values or len(data) > 3:
            return None
        sids = route.sids
        if sids is None:
            return None
        ids = []
        for name, v in values.items():
            tv = type(v)
            sid = sids.get(name)
            if sid is None or (tv is not float and tv is not int):
                return None
            ids.append(sid)
        seq = data.get("seq")
        if seq is not None and type(seq) is not int:
            return None
        ts = data.get("ts")
        if ts is None:
            if "ts" in data or len(data) > 1 + ("seq" in data):
                return None
            ns = arrival_ns
        else:
            tt = type(ts)
            if (tt is not float and tt is not int) or not 0 <= ts < MAX_EPOCH_S:
                return None
            ns = ts_to_ns(ts)
            self._check_window(ns, ns, arrival_ns, "ts")
        return _append_sample(out, ids, ns, values)

    def _decode_telemetry(self, route: _Route, data: Any, arrival_ns: int, out: BatchBuilder) -> int:
        if not isinstance(data, dict):
            raise DecodeError(f"payload must be a JSON object, got {type(data).__name__}")
        if "t0" in data:
            fixed: TelemetryFixedRate = self._validate(TelemetryFixedRate, data)
            return self._append_fixed(route, fixed, arrival_ns, out)
        if isinstance(data.get("ts"), list):
            col: TelemetryColumnar = self._validate(TelemetryColumnar, data)
            return self._append_columnar(route, col, arrival_ns, out)
        sample: TelemetrySample = self._validate(TelemetrySample, data)
        ts = self._ts(sample.ts, arrival_ns, "ts")
        return _append_sample(out, self._series_ids(route, list(sample.values)), ts, sample.values)

    def _append_columnar(self, route: _Route, msg: TelemetryColumnar, arrival_ns: int, out: BatchBuilder) -> int:
        if all(isinstance(t, float | int) for t in msg.ts):
            ts = np.rint(np.asarray(msg.ts, dtype=np.float64) * 1e6).astype(np.int64) * 1000
        else:
            ts = np.asarray([ts_to_ns(t) for t in msg.ts], dtype=np.int64)
        self._check_window(int(ts.min()), int(ts.max()), arrival_ns, "ts")
        names = list(msg.values)
        sids = self._series_ids(route, names)
        n = len(ts)
        out.add_columns(sids, ts, [np.asarray(msg.values[name], dtype=np.float64) for name in names])
        return n * len(names)

    def _append_fixed(self, route: _Route, msg: TelemetryFixedRate, arrival_ns: int, out: BatchBuilder) -> int:
        t0 = ts_to_ns(msg.t0)
        dt_ns = int(round(msg.dt * 1e9))
        if dt_ns <= 0:
            raise DecodeError(f"dt: {msg.dt} s is below 1 ns")
        names = list(msg.values)
        n = len(msg.values[names[0]])
        self._check_window(t0, t0 + dt_ns * (n - 1), arrival_ns, "t0")
        sids = self._series_ids(route, names)
        ts = t0 + np.arange(n, dtype=np.int64) * dt_ns
        for sid, name in zip(sids, names, strict=True):
            vals = np.asarray(msg.values[name], dtype=np.float64)
            out.waveforms.append(WaveformBlock(sid, t0, dt_ns, vals))
            if self.limits.store_waveforms:
                out.wave_chunks.append((np.full(n, sid, np.int64), ts, vals))
        return n * len(names) if self.limits.store_waveforms else 0

    def _machine_tags(self, machine: MachineKey) -> tuple[tuple[bytes, bytes], ...]:
        """(key, ``,key=value``) of the topic's tags, escaped by the shared line-protocol rules."""
        tags = self._tag_cache.get(machine)
        if tags is None:
            tags = tuple((k.encode(), f",{k}={v}".encode()) for k, v in machine_tag_pairs(machine))
            self._tag_cache[machine] = tags
        return tags

    def _decode_lines(self, machine: MachineKey, payload: bytes, arrival_ns: int, out: BatchBuilder) -> int:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"payload is not valid UTF-8: {exc}", reason="encoding") from exc
        tags = self._machine_tags(machine)
        lines: list[bytes] = []
        for lineno, raw in enumerate(payload.split(b"\n"), 1):
            line = raw.strip(b"\r \t")
            if not line or line.startswith(b"#"):
                continue
            m = _LP_KEY.match(line)
            if m is None or b"=" not in m.group(2):
                raise DecodeError(f"line {lineno}: not line protocol (expected 'measurement[,tags] fields [ts]')",
                                  reason="line_protocol")
            key, rest = m.group(1), m.group(2)
            present = {p.split(b"=", 1)[0] for p in _UNESCAPED_COMMA.split(key)[1:]}
            # Tags the device already set win over the topic's (a duplicate key is an error in InfluxDB).
            extra = b"".join(tag for key, tag in tags if key not in present)
            tsm = _LP_TS.match(rest)
            if tsm is not None and len(_UNESCAPED_QUOTE.findall(tsm.group(1))) % 2 == 0 and b"=" in tsm.group(1):
                fields, ts = tsm.group(1), int(tsm.group(2))
            else:
                fields, ts = rest, arrival_ns
            self._check_window(ts, ts, arrival_ns, f"line {lineno} timestamp")
            lines.append(key + extra + b" " + fields + b" " + str(ts).encode())
        if not lines:
            raise DecodeError("payload holds no line-protocol lines", reason="line_protocol")
        out.raw_lines.extend(lines)
        return len(lines)



# -- one decoder per payload format ---------------------------------------------------------------------
class MessageDecoder(Protocol):
    """A payload format: turns one message into rows of the open batch.

    Each owns its topic mapping and its session state (a Sparkplug alias table, say), and takes a
    reloaded config in place, so a SIGHUP loses none of that state.
    """

    def decode(self, topic: str, payload: bytes, arrival_ns: int, out: BatchBuilder) -> int: ...

    def reconfigure(self, cfg: GatewayConfig) -> None: ...


@dataclass(slots=True)
class DecoderContext:
    """What a decoder factory is given: settings, the shared series registry, and a way to publish.

    ``publish(topic, payload, qos, retain)`` reaches the source (a host application answers on the
    broker, e.g. a Sparkplug rebirth request); it returns False while there is no connection.
    """

    cfg: GatewayConfig
    registry: SeriesRegistry
    check_time_window: bool = True
    publish: PublishCallback = field(default=lambda topic, payload, qos, retain: False)


# Subscription ``format`` -> factory, as ``module:callable`` import strings (imported on first use).
# Formats naming the same factory share one decoder.
DECODERS: dict[str, str] = {
    "auto": "gateway.decode:Decoder.from_context",
    "json": "gateway.decode:Decoder.from_context",
    "line": "gateway.decode:Decoder.from_context",
    "sparkplug": "gateway.sparkplug.decode:SparkplugDecoder.from_context",
}


def _import(spec: str) -> Callable[[DecoderContext], MessageDecoder]:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class DecoderRouter:
    """Routes each topic to the decoder of the first subscription that matches it (cached per topic).

    >>> from gateway.config import GatewayConfig
    >>> router = DecoderRouter(DecoderContext(GatewayConfig(), SeriesRegistry()))
    >>> out = BatchBuilder()
    >>> router.decode("factory/s/a/l/m1/telemetry", b'{"values": {"t": 1.5}}', 1763900000_000000000, out)
    1
    """

    def __init__(self, ctx: DecoderContext) -> None:
        self.ctx = ctx
        self._by_spec: dict[str, MessageDecoder] = {}
        self._routes: dict[str, MessageDecoder] = {}
        self._subscriptions: list[tuple[str, MessageDecoder]] = []
        self._build(ctx.cfg)

    def _build(self, cfg: GatewayConfig) -> None:
        subs = []
        for sub in cfg.mqtt.subscriptions():
            spec = DECODERS[sub.format]
            dec = self._by_spec.get(spec)
            if dec is None:
                dec = self._by_spec[spec] = _import(spec)(self.ctx)
            subs.append((sub.topic, dec))
        self._subscriptions = subs
        self._routes = {}
        self._fallback = self._by_spec.get(DECODERS["auto"]) or _import(DECODERS["auto"])(self.ctx)
        # every topic goes to one decoder when all subscriptions have the fallback's: no cache per topic
        self._only = self._fallback if all(d is self._fallback for _, d in subs) else None

    @property
    def decoders(self) -> dict[str, MessageDecoder]:
        """The live decoders by factory (one per distinct format family)."""
        return dict(self._by_spec)

    def will(self) -> tuple[str, bytes, bytes] | None:
        """``(topic, will, birth)`` of a decoder that is a host application on the broker (Sparkplug STATE)."""
        for dec in self._by_spec.values():
            will = getattr(dec, "will", None)
            state = will() if will is not None else None
            if state is not None:
                return state  # type: ignore[no-any-return]
        return None

    def snapshot(self) -> State:
        """The session state of the decoders that keep one (Sparkplug alias and sequence tables)."""
        st = State()
        for spec, dec in self._by_spec.items():
            snap = getattr(dec, "snapshot", None)
            if snap is not None:
                st.put(spec, snap())
        return st

    def restore(self, state: State) -> None:
        for spec, dec in self._by_spec.items():
            restore = getattr(dec, "restore", None)
            if restore is not None and state.has(spec):
                restore(state.sub(spec))

    def decode(self, topic: str, payload: bytes, arrival_ns: int, out: BatchBuilder) -> int:
        if self._only is not None:
            return self._only.decode(topic, payload, arrival_ns, out)
        dec = self._routes.get(topic)
        if dec is None:
            dec = next((d for f, d in self._subscriptions if topic_matches(f, topic)), self._fallback)
            if len(self._routes) < 200_000:
                self._routes[topic] = dec
        return dec.decode(topic, payload, arrival_ns, out)

    def reconfigure(self, cfg: GatewayConfig) -> None:
        """Reconfigure every live decoder in place (their state survives), add the ones new formats need."""
        self.ctx.cfg = cfg
        for dec in self._by_spec.values():
            dec.reconfigure(cfg)
        self._build(cfg)
