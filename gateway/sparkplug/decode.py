"""Sparkplug B decoder: protobuf payloads → the same columnar batches as JSON telemetry.

One :class:`SparkplugDecoder` serves every ``format = "sparkplug"`` subscription and keeps, per edge
node, what its births said (metric name and datatype per alias), its ``bdSeq`` and its ``seq``:

* NBIRTH / DBIRTH define the metrics (and are data too: their values are stored). NDATA / DDATA are
  resolved by alias (or name) to the birth's name and datatype and written under that name.
* ``seq`` is checked per edge node (0-255, wrapping). A message may arrive ahead of a missing one (QoS 1
  redelivery, a bridge); it is written at once (each metric has its own timestamp, so order does not
  matter to the database) and the gap gets ``reorder_timeout_s`` to fill. Unfilled, a DATA before any
  BIRTH, or an unknown alias ask the edge node for a rebirth (NCMD ``Node Control/Rebirth``, at most one
  per ``rebirth_interval_s``); what could not be resolved is dead-lettered, the rest is kept.
* Births and deaths become ``device_status`` points; an NDEATH whose ``bdSeq`` is not the current
  birth's is stale (a late Will) and ignored; an NDEATH marks the node's devices offline too.

Values: integers, floats, booleans (0/1) and DateTime (ms since the epoch) go to ``telemetry`` as
floats, the way JSON samples do, so detectors and OEE see them; String, Text and UUID are written as
string fields; ``is_null`` is skipped, ``is_transient`` not stored, ``is_historical`` stored with its
own timestamp but kept out of the detectors. Arrays, DataSet, Template instances, Bytes, File and
property sets are dead-lettered with a reason (template definitions in a birth are not data).

>>> from gateway.batch import SeriesRegistry
>>> from gateway.config import GatewayConfig
>>> from gateway.decode import BatchBuilder, DecoderContext
>>> dec = SparkplugDecoder(DecoderContext(GatewayConfig(), SeriesRegistry(), check_time_window=False))
>>> birth = pb.Payload(seq=0, metrics=[pb.Payload.Metric(name="bdSeq", datatype=DataType.Int64, long_value=0),
...     pb.Payload.Metric(name="Temp", alias=1, datatype=DataType.Float, float_value=20.5, timestamp=1000)])
>>> data = pb.Payload(seq=1, metrics=[pb.Payload.Metric(alias=1, float_value=21.0, timestamp=2000)])
>>> out = BatchBuilder()
>>> dec.decode("spBv1.0/G/NBIRTH/E", birth.SerializeToString(), 0, out)  # Temp and a device_status point
2
>>> dec.decode("spBv1.0/G/NDATA/E", data.SerializeToString(), 0, out)
1
>>> b = out.take(); b.telemetry.value.tolist(), b.telemetry.ts_ns.tolist(), b.statuses[0].online
([20.5, 21.0], [1000000000, 2000000000], True)
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import orjson
from google.protobuf.message import DecodeError as ProtobufDecodeError

from gateway.batch import CountEvent, MachineKey, StateEvent, StatusEvent
from gateway.checkpoint import State
from gateway.config import GatewayConfig, SparkplugConfig
from gateway.errors import CardinalityError, DecodeError, RejectReason
from gateway.lineproto import escape_field_key, escape_string_value, machine_tags
from gateway.schema import MachineState
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.layout import DataLayout

if TYPE_CHECKING:
    from gateway.decode import BatchBuilder, DecoderContext

__all__ = ["DataType", "SparkplugDecoder", "host_state_payloads", "rebirth_payload"]

log = logging.getLogger("gateway.sparkplug")
_RESYNC = -2  # a restored node: the next seq is taken as it comes

NAMESPACE: Final = "spBv1.0"
REBIRTH_METRIC: Final = "Node Control/Rebirth"


class DataType:
    """The spec's datatype numbers (``sparkplug_b.proto`` enum ``DataType``)."""

    Int8, Int16, Int32, Int64 = 1, 2, 3, 4
    UInt8, UInt16, UInt32, UInt64 = 5, 6, 7, 8
    Float, Double, Boolean, String, DateTime, Text = 9, 10, 11, 12, 13, 14
    UUID, DataSet, Bytes, File, Template, PropertySet, PropertySetList = 15, 16, 17, 18, 19, 20, 21


# datatype -> (bits, signed) for the integer types; their values travel in int_value / long_value.
_INTEGERS: Final = {
    DataType.Int8: (8, True), DataType.Int16: (16, True), DataType.Int32: (32, True), DataType.Int64: (64, True),
    DataType.UInt8: (8, False), DataType.UInt16: (16, False), DataType.UInt32: (32, False),
    DataType.UInt64: (64, False), DataType.DateTime: (64, False),
}
_FLOATS: Final = frozenset({DataType.Float, DataType.Double})
_STRINGS: Final = frozenset({DataType.String, DataType.Text, DataType.UUID})
_NODE_TYPES: Final = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
_DEVICE_TYPES: Final = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})
_BAD_SEGMENT = re.compile(r"[\x00-\x1f\x7f\\]")
_STATES: Final = {s.value: s for s in MachineState}


def _type_name(datatype: int) -> str:
    try:
        return pb.DataType.Name(datatype)
    except ValueError:
        return f"datatype {datatype}"


def rebirth_payload(now_ms: int) -> bytes:
    """An NCMD asking an edge node for a rebirth (no ``seq``: commands carry none)."""
    metric = pb.Payload.Metric(name=REBIRTH_METRIC, timestamp=now_ms, datatype=DataType.Boolean, boolean_value=True)
    return pb.Payload(timestamp=now_ms, metrics=[metric]).SerializeToString()


def host_state_payloads(host_id: str, ts_ms: int) -> tuple[str, bytes, bytes]:
    """``(topic, will, birth)`` of a primary host: ``{"online": false|true, "timestamp": ts_ms}``.

    >>> host_state_payloads("gw", 5)
    ('spBv1.0/STATE/gw', b'{"online":false,"timestamp":5}', b'{"online":true,"timestamp":5}')
    """
    return (f"{NAMESPACE}/STATE/{host_id}", orjson.dumps({"online": False, "timestamp": ts_ms}),
            orjson.dumps({"online": True, "timestamp": ts_ms}))


@dataclass(slots=True)
class _Metric:
    """What a birth said about one metric."""

    device: str | None  # None: the edge node's own metric
    name: str
    datatype: int
    sid: int = -1  # series id, -1 until resolved (string metrics have none)
    prefix: bytes = b""  # line-protocol prefix of string metrics


@dataclass(slots=True)
class _Node:
    """One edge node's session as the births told it."""

    group: str
    edge: str
    born: bool = False
    bdseq: int | None = None
    seq: int = -1  # last seq in order
    missing: set[int] = field(default_factory=set)  # seqs skipped, waiting for reorder_timeout_s
    gap_deadline_ns: int = 0
    aliases: dict[int, _Metric] = field(default_factory=dict)
    names: dict[tuple[str | None, str], _Metric] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)  # devices born (online)
    last_rebirth_ns: int = -(1 << 62)
    counts: dict[str | None, list[int]] = field(default_factory=dict)  # device -> [total, good] last seen
    # (device, payload size) -> the DATA layout (gateway.sparkplug.layout), or messages since a failed learn
    layouts: dict[tuple[str | None, int], DataLayout | int] = field(default_factory=dict)


class SparkplugDecoder:
    """The Sparkplug B host application's decode side (see the module docs)."""

    def __init__(self, ctx: DecoderContext) -> None:
        self.ctx = ctx
        self.registry = ctx.registry
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._machines: dict[tuple[str, str, str | None], MachineKey] = {}
        self.rebirths_requested = 0
        self.stale_deaths = 0
        self.fast_data = 0  # DATA messages read by their layout (gateway.sparkplug.layout)
        self._data_topics: dict[str, tuple[str, str, str, str | None]] = {}  # DATA topics already parsed
        self._host_ts_ms = time.time_ns() // 1_000_000  # the Will's timestamp; the STATE birth repeats it
        self.reconfigure(ctx.cfg)

    @classmethod
    def from_context(cls, ctx: DecoderContext) -> SparkplugDecoder:
        return cls(ctx)

    def reconfigure(self, cfg: GatewayConfig) -> None:
        """Take reloaded settings; alias, seq and bdSeq tables are kept (no rebirth needed)."""
        old: SparkplugConfig | None = getattr(self, "cfg", None)
        self.cfg = cfg.sparkplug
        self.limits = cfg.gateway
        self._past_ns = int(cfg.gateway.max_past_s * 1e9)
        self._future_ns = int(cfg.gateway.max_future_s * 1e9)
        for node in self._nodes.values():  # learnt under the old settings (OEE metrics, series ids): relearn
            node.layouts.clear()
        if old is not None and (old.site, old.area, old.line, old.machine) != (
                self.cfg.site, self.cfg.area, self.cfg.line, self.cfg.machine):
            self._machines.clear()
            for node in self._nodes.values():  # series ids follow the new tags
                for m in node.names.values():
                    m.sid, m.prefix = -1, b""

    def snapshot(self) -> State:
        """Births, alias tables, bdSeq and counters per edge node (see :mod:`gateway.checkpoint`)."""
        nodes = []
        for n in self._nodes.values():
            metrics = [[m.device, m.name, m.datatype, alias] for alias, m in n.aliases.items()]
            aliased = {id(m) for m in n.aliases.values()}
            metrics += [[m.device, m.name, m.datatype, None] for m in n.names.values() if id(m) not in aliased]
            nodes.append({"group": n.group, "edge": n.edge, "born": n.born, "bdseq": n.bdseq,
                          "devices": sorted(n.devices), "metrics": metrics,
                          "counts": [[d, list(c)] for d, c in n.counts.items()]})  # copies: written later
        return State({"nodes": nodes})

    def restore(self, state: State) -> None:
        """Continue from a :meth:`snapshot`: DATA after a restart decodes without a rebirth.

        Sequence numbers resynchronise on each node's next message (the checkpoint is older than what
        the node sent since); series ids are resolved again against the restored registry.
        """
        self._nodes.clear()
        self._machines.clear()
        for d in state.meta["nodes"]:
            node = _Node(d["group"], d["edge"], born=bool(d["born"]), bdseq=d["bdseq"], seq=_RESYNC)
            node.devices = set(d["devices"])
            node.counts = {dev: [int(a), int(b)] for dev, (a, b) in d["counts"]}
            for device, name, datatype, alias in d["metrics"]:
                m = _Metric(device, name, int(datatype))
                node.names[(device, name)] = m
                if alias is not None:
                    node.aliases[int(alias)] = m
            self._nodes[(node.group, node.edge)] = node

    def will(self) -> tuple[str, bytes, bytes] | None:
        """The primary host's STATE ``(topic, will, birth)`` when ``[sparkplug] host_id`` is set."""
        if self.cfg.host_id is None:
            return None
        return host_state_payloads(self.cfg.host_id, self._host_ts_ms)

    # -- entry ------------------------------------------------------------------------------------------
    def decode(self, topic: str, payload: bytes, arrival_ns: int, out: BatchBuilder) -> int:
        if len(payload) > self.limits.max_payload_bytes:
            raise DecodeError(
                f"payload is {len(payload)} bytes, over max_payload_bytes={self.limits.max_payload_bytes}",
                reason="too_large",
            )
        known = self._data_topics.get(topic)
        if known is not None:
            group, mtype, edge, device = known
        else:
            parts = topic.split("/")
            if len(parts) == 3 and parts[0] == NAMESPACE and parts[1] == "STATE":
                self._host_state(parts[2], payload)
                out.messages += 1
                return 0
            group, mtype, edge, device = self._parse_topic(topic, parts)
            if mtype[1:] == "DATA" and len(self._data_topics) < 100_000:  # valid, and seen again and again
                self._data_topics[topic] = (group, mtype, edge, device)
        if mtype in ("NCMD", "DCMD"):  # commands to edge nodes (ours included): nothing to store
            out.messages += 1
            return 0
        node = self._nodes.get((group, edge))
        if node is None:
            node = self._nodes[(group, edge)] = _Node(group, edge)
        elif mtype[1:] == "DATA" and node.born:
            layout = node.layouts.get((device, len(payload)))
            if type(layout) is DataLayout and (device is None or device in node.devices):
                n = self._fast_data(node, layout, payload, mtype, arrival_ns, out)
                if n >= 0:
                    out.points += n
                    out.messages += 1
                    return n
        try:
            msg = pb.Payload.FromString(payload)
        except (ProtobufDecodeError, RuntimeWarning) as exc:
            raise DecodeError(f"payload is not a Sparkplug B protobuf Payload: {exc}", reason="protobuf") from exc
        if mtype == "NBIRTH":
            n = self._node_birth(node, msg, arrival_ns, out)
        elif mtype == "NDEATH":
            n = self._node_death(node, msg, arrival_ns, out)
        else:
            if not node.born:
                self._rebirth(node, f"{mtype} before NBIRTH", arrival_ns)
                raise DecodeError(f"{mtype} from edge node {group}/{edge} before its NBIRTH; rebirth requested",
                                  reason="no_birth")
            self._check_seq(node, msg.seq if msg.HasField("seq") else None, mtype, arrival_ns)
            if mtype == "NDATA":
                n = self._metrics(node, None, msg, arrival_ns, out, birth=False)
                self._maybe_learn(node, None, payload, msg, n, out)
            else:
                assert device is not None
                if mtype == "DBIRTH":
                    n = self._device_birth(node, device, msg, arrival_ns, out)
                elif device not in node.devices:
                    self._rebirth(node, f"{mtype} for device {device} before its DBIRTH", arrival_ns)
                    raise DecodeError(f"{mtype} from device {group}/{edge}/{device} before its DBIRTH; "
                                      "rebirth requested", reason="no_birth")
                elif mtype == "DDATA":
                    n = self._metrics(node, device, msg, arrival_ns, out, birth=False)
                    self._maybe_learn(node, device, payload, msg, n, out)
                else:  # DDEATH
                    node.devices.discard(device)
                    ts = msg.timestamp * 1_000_000 if msg.HasField("timestamp") else arrival_ns
                    out.statuses.append(StatusEvent(self._machine(group, edge, device), ts, False, node.bdseq))
                    n = 1
        out.points += n
        out.messages += 1
        return n

    def _parse_topic(self, topic: str, parts: list[str]) -> tuple[str, str, str, str | None]:
        if parts[0] != NAMESPACE or len(parts) not in (4, 5):
            raise DecodeError(f"topic {topic!r} is not {NAMESPACE}/<group_id>/<message_type>/<edge_node_id>"
                              "[/<device_id>]", reason="topic")
        mtype = parts[2]
        if mtype not in (_NODE_TYPES if len(parts) == 4 else _DEVICE_TYPES):
            kinds = sorted(_NODE_TYPES) if len(parts) == 4 else sorted(_DEVICE_TYPES)
            raise DecodeError(f"topic {topic!r}: message type {mtype!r} is not one of {kinds}", reason="topic")
        for name, seg in zip(("group_id", "edge_node_id", "device_id"), (parts[1], *parts[3:]), strict=False):
            if not seg:
                raise DecodeError(f"topic {topic!r}: {name} is empty", reason="topic")
            if _BAD_SEGMENT.search(seg):
                raise DecodeError(f"topic {topic!r}: {name} {seg!r} holds a backslash or control character",
                                  reason="topic")
        return parts[1], mtype, parts[3], parts[4] if len(parts) == 5 else None

    def _host_state(self, host_id: str, payload: bytes) -> None:
        """Our own STATE seen ``online: false`` while we are connected: say we are online again."""
        if host_id != self.cfg.host_id:
            return
        try:
            state = orjson.loads(payload)
        except orjson.JSONDecodeError:
            state = None
        if isinstance(state, dict) and state.get("online") is False:
            topic, _, birth = host_state_payloads(host_id, self._host_ts_ms)
            if self.ctx.publish(topic, birth, 1, True):
                log.warning("STATE of host %s read offline while connected: republished online", host_id)

    # -- sessions ---------------------------------------------------------------------------------------
    def _node_birth(self, node: _Node, msg: pb.Payload, arrival_ns: int, out: BatchBuilder) -> int:
        bdseq = next((m.long_value or m.int_value for m in msg.metrics if m.name == "bdSeq"), None)
        # A new session: forget the old definitions (a rebirth repeats every one), devices re-birth too.
        node.born, node.bdseq = True, bdseq
        node.seq = msg.seq if msg.HasField("seq") else 0
        node.missing.clear()
        node.aliases.clear()
        node.names.clear()
        node.devices.clear()
        node.layouts.clear()
        n = self._metrics(node, None, msg, arrival_ns, out, birth=True)
        ts = msg.timestamp * 1_000_000 if msg.HasField("timestamp") else arrival_ns
        out.statuses.append(StatusEvent(self._machine(node.group, node.edge, None), ts, True, bdseq))
        return n + 1

    def _device_birth(self, node: _Node, device: str, msg: pb.Payload, arrival_ns: int, out: BatchBuilder) -> int:
        for key in [k for k in node.names if k[0] == device]:  # this device's previous definitions
            old = node.names.pop(key)
            node.aliases = {a: m for a, m in node.aliases.items() if m is not old}
        node.devices.add(device)
        for size_key in [k for k in node.layouts if k[0] == device]:
            del node.layouts[size_key]
        n = self._metrics(node, device, msg, arrival_ns, out, birth=True)
        ts = msg.timestamp * 1_000_000 if msg.HasField("timestamp") else arrival_ns
        out.statuses.append(StatusEvent(self._machine(node.group, node.edge, device), ts, True, node.bdseq))
        return n + 1

    def _node_death(self, node: _Node, msg: pb.Payload, arrival_ns: int, out: BatchBuilder) -> int:
        bdseq = next((m.long_value or m.int_value for m in msg.metrics if m.name == "bdSeq"), None)
        if not node.born or bdseq != node.bdseq:
            self.stale_deaths += 1
            log.info("NDEATH of %s/%s with bdSeq %s ignored: the current birth has bdSeq %s",
                     node.group, node.edge, bdseq, node.bdseq if node.born else "none (not born)")
            return 0
        node.born = False
        node.missing.clear()
        # The node and its devices are stale from our receive time (the Will has no useful timestamp).
        out.statuses.append(StatusEvent(self._machine(node.group, node.edge, None), arrival_ns, False, bdseq))
        for device in sorted(node.devices):
            out.statuses.append(StatusEvent(self._machine(node.group, node.edge, device), arrival_ns, False, bdseq))
        n = 1 + len(node.devices)
        node.devices.clear()
        return n

    def _check_seq(self, node: _Node, seq: int | None, mtype: str, arrival_ns: int) -> None:
        if node.missing and arrival_ns >= node.gap_deadline_ns:
            self._gap_unfilled(node, arrival_ns)
        if seq is None:
            return
        seq &= 0xFF
        if node.seq == _RESYNC:  # restored from a checkpoint: this message sets the baseline
            node.seq = seq
            return
        expected = (node.seq + 1) & 0xFF
        if seq == expected:
            node.seq = seq
            return
        if seq in node.missing:  # a late message filling a gap
            node.missing.discard(seq)
            return
        ahead = (seq - expected) & 0xFF
        if ahead >= 128:  # behind: a duplicate or a redelivery; its points rewrite the same values
            return
        node.missing.update((expected + i) & 0xFF for i in range(ahead))
        node.seq = seq
        if node.gap_deadline_ns <= arrival_ns:
            timeout_ns = int(self.cfg.reorder_timeout_s * 1e9)
            node.gap_deadline_ns = arrival_ns + timeout_ns
            log.info("%s of %s/%s has seq %d, expected %d: waiting %.1f s for the %d missing",
                     mtype, node.group, node.edge, seq, expected, self.cfg.reorder_timeout_s, ahead)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (replay, tests): the next message of the node checks the deadline
                return
            loop.call_later(self.cfg.reorder_timeout_s + 0.01, self._gap_due, node)

    def _gap_due(self, node: _Node) -> None:
        now = time.time_ns()
        if node.missing and now >= node.gap_deadline_ns:
            self._gap_unfilled(node, now)

    def _gap_unfilled(self, node: _Node, now_ns: int) -> None:
        missing = sorted(node.missing)
        node.missing.clear()
        self._rebirth(node, f"seq {missing[:8]}{'...' if len(missing) > 8 else ''} missing after "
                            f"{self.cfg.reorder_timeout_s:g} s", now_ns)

    def _rebirth(self, node: _Node, why: str, now_ns: int) -> None:
        """Ask the edge node to publish its births again (rate-limited per node)."""
        if now_ns - node.last_rebirth_ns < self.cfg.rebirth_interval_s * 1e9:
            return
        topic = f"{NAMESPACE}/{node.group}/NCMD/{node.edge}"
        if self.ctx.publish(topic, rebirth_payload(now_ns // 1_000_000), 0, False):
            node.last_rebirth_ns = now_ns
            self.rebirths_requested += 1
            log.warning("requested a rebirth of %s/%s: %s", node.group, node.edge, why)
        else:
            log.warning("could not request a rebirth of %s/%s (%s): not connected", node.group, node.edge, why)

    # -- DATA fast path (gateway.sparkplug.layout) -----------------------------------------------------
    def _fast_data(self, node: _Node, layout: DataLayout, payload: bytes, mtype: str, arrival_ns: int,
                   out: BatchBuilder) -> int:
        """Append a DATA message that has a known layout; -1: it does not, or needs the protobuf path."""
        got = layout.extract(payload)
        if got is None:
            return -1
        seq, ts_ms, values = got
        ts = ts_ms * 1_000_000
        if layout.ts_slot < 0 and (ts_ms < 0).any():  # no timestamp at all: the arrival time
            ts = np.where(ts_ms < 0, arrival_ns, ts)
        if self.ctx.check_time_window and (ts.min() < arrival_ns - self._past_ns
                                           or ts.max() > arrival_ns + self._future_ns):
            return -1  # the protobuf path says which metric
        if not math.isfinite(values.sum()):  # (a sum can overflow where no value is Inf: then just slower)
            return -1  # NaN/Inf are skipped one by one there
        self._check_seq(node, seq if layout.seq_slot >= 0 else None, mtype, arrival_ns)
        if ts.shape[0]:
            out.mark_message(int(ts[0]), int(ts[-1]))
        out.series.frombytes(layout.series)
        out.ts_ns.frombytes(ts.tobytes())
        out.values.frombytes(values.tobytes())
        self.fast_data += 1
        return len(values)

    def _maybe_learn(self, node: _Node, device: str | None, payload: bytes, msg: pb.Payload, n: int,
                     out: BatchBuilder) -> None:
        """After the protobuf path stored a DATA message: learn its layout when every metric was plain."""
        key = (device, len(payload))
        have = node.layouts.get(key)
        if type(have) is DataLayout:
            if have.misses < 8:  # a few odd messages do not replace a layout
                return
        elif isinstance(have, int) and have < 1000:  # not learnable lately: try again after a while
            node.layouts[key] = have + 1
            return
        if out.rejects or n != len(msg.metrics) or len(node.layouts) >= 256:
            return
        c = self.cfg
        oee_names = (c.state_metric, c.total_metric, c.good_metric)
        types: list[tuple[int, int, bool]] = []
        sids: list[int] = []
        for m in msg.metrics:
            meta = node.aliases.get(m.alias) if m.HasField("alias") else node.names.get((device, m.name))
            if meta is None or meta.device != device or meta.sid < 0 or meta.name in oee_names \
                    or m.is_historical or m.is_null or m.is_transient:
                node.layouts[key] = 0
                return
            kind = m.WhichOneof("value")
            dt = meta.datatype
            if dt in _INTEGERS and kind in ("int_value", "long_value"):
                bits, signed = _INTEGERS[dt]
                types.append((10 if kind == "int_value" else 11, bits, signed))
            elif dt in _FLOATS and kind in ("float_value", "double_value"):
                types.append((12 if kind == "float_value" else 13, 0, False))
            elif dt == DataType.Boolean and kind == "boolean_value":
                types.append((14, 0, False))
            else:
                node.layouts[key] = 0
                return
            sids.append(meta.sid)
        layout = DataLayout.learn(payload, types)
        if layout is None:
            node.layouts[key] = 0
            return
        layout.series = np.array(sids, np.int64).tobytes()
        node.layouts[key] = layout

    # -- metrics ----------------------------------------------------------------------------------------
    def _machine(self, group: str, edge: str, device: str | None) -> MachineKey:
        key = (group, edge, device)
        m = self._machines.get(key)
        if m is None:
            values = {"group_id": group, "edge_node_id": edge, "device_id": device if device is not None else edge}
            c = self.cfg
            m = MachineKey(c.site.format(**values), c.area.format(**values), c.line.format(**values),
                           c.machine.format(**values))
            if len(self._machines) < 200_000:
                self._machines[key] = m
        return m

    def _metrics(self, node: _Node, device: str | None, msg: pb.Payload, arrival_ns: int, out: BatchBuilder,
                 *, birth: bool) -> int:
        """Append the message's metrics; define them first when ``birth``. Unusable ones are dead-lettered."""
        machine = self._machine(node.group, node.edge, device)
        default_ts = msg.timestamp * 1_000_000 if msg.HasField("timestamp") else arrival_ns
        sids, tss, vals = array("q"), array("q"), array("d")
        hsids, htss, hvals = array("q"), array("q"), array("d")  # historical: stored, not detected
        problems: list[tuple[RejectReason, str]] = []
        unknown_alias = False
        n = 0
        for m in msg.metrics:
            if birth:
                if m.name == "bdSeq" or m.name.startswith("Node Control/"):
                    continue  # session bookkeeping and commands, not telemetry
                if not m.name or not m.HasField("datatype"):
                    label = m.name or f"alias {m.alias}"
                    problems.append(("schema", f"metric {label}: a birth needs a name and a datatype"))
                    continue
                if m.datatype == DataType.Template and m.template_value.is_definition:
                    continue  # a template definition, not a value
                meta = node.names[(device, m.name)] = _Metric(device, m.name, m.datatype)
                if m.HasField("alias"):
                    node.aliases[m.alias] = meta
            elif m.HasField("alias"):
                found = node.aliases.get(m.alias)
                if found is None or found.device != device:
                    unknown_alias = True
                    problems.append(("alias", f"alias {m.alias} is not in the births of {node.group}/{node.edge}"
                                     + (f"/{device}" if device else "")))
                    continue
                meta = found
            else:
                named = node.names.get((device, m.name))
                if named is None:
                    unknown_alias = True
                    problems.append(("alias", f"metric {m.name!r} is not in the births"))
                    continue
                meta = named
            if m.is_null or m.is_transient:
                continue
            ts = m.timestamp * 1_000_000 if m.HasField("timestamp") else default_ts
            if self.ctx.check_time_window and not arrival_ns - self._past_ns <= ts <= arrival_ns + self._future_ns:
                problems.append(("time_window", f"{meta.name}: timestamp outside max_past_s/max_future_s"))
                continue
            dt = meta.datatype
            value: float
            if dt in _INTEGERS:
                kind = m.WhichOneof("value")
                if kind not in ("int_value", "long_value"):
                    problems.append(("datatype", f"{meta.name}: {_type_name(dt)} metric carries {kind}"))
                    continue
                bits, signed = _INTEGERS[dt]
                raw = (m.int_value if kind == "int_value" else m.long_value) & ((1 << bits) - 1)
                value = float(raw - (1 << bits) if signed and raw >> (bits - 1) else raw)
            elif dt in _FLOATS:
                kind = m.WhichOneof("value")
                if kind not in ("float_value", "double_value"):
                    problems.append(("datatype", f"{meta.name}: {_type_name(dt)} metric carries {kind}"))
                    continue
                value = m.float_value if kind == "float_value" else m.double_value
                if not np.isfinite(value):
                    continue  # NaN/Inf cannot be stored; a sensor fault, not a payload fault
            elif dt == DataType.Boolean:
                value = 1.0 if m.boolean_value else 0.0
            elif dt in _STRINGS:
                self._string(node, meta, m.string_value, ts, machine, out)
                self._oee(node, device, machine, meta.name, m.string_value, ts, out)
                n += 1
                continue
            else:
                problems.append(("datatype", f"{meta.name}: {_type_name(dt)} values are not stored"))
                continue
            if meta.sid < 0:
                try:
                    meta.sid = self.registry.series_id(machine, meta.name)
                    # a Float metric's values are float32: written with the 9 digits that identify one
                    self.registry.set_float32(meta.sid, dt == DataType.Float)
                except CardinalityError as exc:
                    problems.append(("cardinality", str(exc)))
                    continue
            if m.is_historical:
                hsids.append(meta.sid)
                htss.append(ts)
                hvals.append(value)
            else:
                sids.append(meta.sid)
                tss.append(ts)
                vals.append(value)
                self._oee(node, device, machine, meta.name, value, ts, out)
            n += 1
        if tss:
            out.mark_message(tss[0], tss[-1])
        out.series.extend(sids)
        out.ts_ns.extend(tss)
        out.values.extend(vals)
        if hsids:
            out.wave_chunks.append((np.frombuffer(hsids, np.int64).copy(), np.frombuffer(htss, np.int64).copy(),
                                    np.frombuffer(hvals, np.float64).copy()))
        if unknown_alias:
            self._rebirth(node, "unknown alias or metric", arrival_ns)
        if problems:
            detail = "; ".join(text for _, text in problems[:5]) + ("; ..." if len(problems) > 5 else "")
            out.rejects.append(DecodeError(
                f"{len(problems)} of {len(msg.metrics)} metrics not stored: {detail}", reason=problems[0][0]))
        return n

    def _string(self, node: _Node, meta: _Metric, text: str, ts: int, machine: MachineKey, out: BatchBuilder) -> None:
        if not meta.prefix:
            meta.prefix = f"telemetry,{machine_tags(machine)} {escape_field_key(meta.name)}=".encode()
        out.raw_lines.append(meta.prefix + f"{escape_string_value(text)} {ts}".encode())

    def _oee(self, node: _Node, device: str | None, machine: MachineKey, name: str, value: float | str, ts: int,
             out: BatchBuilder) -> None:
        """The configured state and part-counter metrics become the OEE engine's events."""
        c = self.cfg
        if name == c.state_metric:
            state = _STATES.get(str(value).upper())
            if state is not None:
                self.registry.machine_id(machine)
                out.add_state(StateEvent(machine, ts, state))
        elif name == c.total_metric or name == c.good_metric:
            counts = node.counts.setdefault(device, [-1, -1])
            counts[0 if name == c.total_metric else 1] = int(float(value))
            total, good = counts
            if c.good_metric is None:
                good = total
            if total >= 0 and good >= 0:
                self.registry.machine_id(machine)
                out.add_count(CountEvent(machine, ts, total, good))
