"""The simulated fleet as a Sparkplug B 3.0 edge node: one edge node, each machine a device.

:class:`SparkplugEdge` turns the fleet's JSON messages (``telemetry`` one-sample, ``state``, ``count``)
into Sparkplug payloads built with the same protobuf schema as the gateway's host
(``gateway/sparkplug/sparkplug_b.proto``): an NBIRTH with ``bdSeq``, a DBIRTH per device the first time
it is seen (every metric with name, alias and datatype; again when a new metric appears), then DDATA by
alias only, ``seq`` 0-255 per edge node over all of them. An NCMD ``Node Control/Rebirth = true``
republishes the NBIRTH and every DBIRTH with the next ``bdSeq``; :meth:`death` is the NDEATH, also set
as the MQTT Will so a killed simulator goes offline. Machine state is the String metric
``Machine/State``; part counters are ``Counts/Total`` and ``Counts/Good`` (UInt64): the gateway's
``[sparkplug] state_metric`` / ``total_metric`` / ``good_metric`` make OEE of them.

>>> sent = []
>>> edge = SparkplugEdge("plant1", "sim1", lambda t, p: sent.append((t, p)))
>>> edge.handle("factory/plant1/a/l1/m001/telemetry", b'{"ts": 1763900000.5, "values": {"temp_c": 61.5}}')
>>> edge.handle("factory/plant1/a/l1/m001/telemetry", b'{"ts": 1763900001.5, "values": {"temp_c": 61.7}}')
>>> [t for t, _ in sent]  # the first message of a device is its birth (which carries its values)
['spBv1.0/plant1/NBIRTH/sim1', 'spBv1.0/plant1/DBIRTH/sim1/m001', 'spBv1.0/plant1/DDATA/sim1/m001']
>>> data = pb.Payload.FromString(sent[-1][1])
>>> data.seq, [(m.alias, m.double_value, m.timestamp) for m in data.metrics], data.metrics[0].name
(2, [(4, 61.7, 1763900001500)], '')
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.decode import DataType

__all__ = ["GOOD_METRIC", "STATE_METRIC", "TOTAL_METRIC", "SparkplugEdge"]

log = logging.getLogger(__name__)

STATE_METRIC = "Machine/State"
TOTAL_METRIC = "Counts/Total"
GOOD_METRIC = "Counts/Good"
_FIXED = ((STATE_METRIC, DataType.String), (TOTAL_METRIC, DataType.UInt64), (GOOD_METRIC, DataType.UInt64))

Send = Callable[[str, bytes], object]


@dataclass(slots=True)
class _Device:
    aliases: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (alias, datatype)
    last: dict[str, object] = field(default_factory=dict)  # name -> last value (what a rebirth reports)


class SparkplugEdge:
    """One edge node ``group/edge`` whose devices are the fleet's machines (see the module docstring)."""

    def __init__(self, group: str, edge: str, send: Send, *, bdseq: int = 0) -> None:
        self.group = group
        self.edge = edge
        self._send = send
        self.bdseq = bdseq % 256
        self._seq = 0
        self._born = False
        self._devices: dict[str, _Device] = {}
        self._next_alias = 1
        self._lock = threading.Lock()  # handle() runs in the simulator's thread, rebirths in paho's
        self.rebirths = 0

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"spBv1.0/{self.group}/{kind}/{self.edge}"
        return base if device is None else f"{base}/{device}"

    def death(self) -> tuple[str, bytes]:
        """The NDEATH (topic, payload) of the current session: the MQTT Will, or sent on a clean exit."""
        msg = pb.Payload(metrics=[pb.Payload.Metric(name="bdSeq", datatype=DataType.Int64, long_value=self.bdseq)])
        return self.topic("NDEATH"), msg.SerializeToString()

    def handle(self, topic: str, payload: bytes) -> None:
        """Translate one fleet message (``factory/<site>/<area>/<line>/<machine>/<channel>``) and send it."""
        parts = topic.split("/")
        device, channel = parts[-2], parts[-1]
        doc = orjson.loads(payload)
        ts = doc.get("ts", time.time())
        if not isinstance(ts, (int, float)):
            return  # columnar blocks have no Sparkplug scalar form here
        ts_ms = int(round(float(ts) * 1000))
        if channel == "telemetry":
            vals = doc.get("values", {})
            if "t0" in doc or any(isinstance(v, list) for v in vals.values()):
                return  # nor have fixed-rate blocks
            metrics: dict[str, tuple[object, int]] = {k: (float(v), DataType.Double) for k, v in vals.items()}
        elif channel == "state":
            metrics = {STATE_METRIC: (str(doc["state"]), DataType.String)}
        elif channel == "count":
            metrics = {TOTAL_METRIC: (int(doc["total"]), DataType.UInt64)}
            if "good" in doc:
                metrics[GOOD_METRIC] = (int(doc["good"]), DataType.UInt64)
        else:
            return
        with self._lock:
            if not self._born:
                self._node_birth()
            dev = self._devices.get(device)
            if dev is None or any(name not in dev.aliases for name in metrics):
                dev = self._devices.setdefault(device, _Device())
                for name, (_, dt) in [*((n, (None, d)) for n, d in _FIXED), *metrics.items()]:
                    if name not in dev.aliases:
                        dev.aliases[name] = (self._next_alias, dt)
                        self._next_alias += 1
                for name, (value, _) in metrics.items():
                    dev.last[name] = value
                self._device_birth(device, dev, ts_ms)
                return  # the birth carries the values
            msg = pb.Payload(timestamp=ts_ms, seq=self._next_seq())
            for name, (value, dt) in metrics.items():
                dev.last[name] = value
                m = msg.metrics.add(alias=dev.aliases[name][0], timestamp=ts_ms)
                _set_value(m, dt, value)
            self._send(self.topic("DDATA", device), msg.SerializeToString())

    def command(self, topic: str, payload: bytes) -> None:
        """An NCMD for this node: ``Node Control/Rebirth = true`` republishes every birth."""
        if topic != self.topic("NCMD"):
            return
        try:
            msg = pb.Payload.FromString(payload)
        except Exception as exc:  # a malformed command is logged, never fatal for the simulator
            log.warning("NCMD on %s is not a Sparkplug payload: %s", topic, exc)
            return
        if any(m.name == "Node Control/Rebirth" and m.boolean_value for m in msg.metrics):
            with self._lock:
                self.rebirths += 1
                self._born = False
                self.bdseq = (self.bdseq + 1) % 256
                self._node_birth()
                now = int(time.time() * 1000)
                for device, dev in self._devices.items():
                    self._device_birth(device, dev, now)
            log.info("rebirth requested by the host: NBIRTH and %d DBIRTH sent", len(self._devices))

    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (s + 1) % 256
        return s

    def _node_birth(self) -> None:
        self._seq = 0
        msg = pb.Payload(timestamp=int(time.time() * 1000), seq=self._next_seq(), metrics=[
            pb.Payload.Metric(name="bdSeq", datatype=DataType.Int64, long_value=self.bdseq),
            pb.Payload.Metric(name="Node Control/Rebirth", datatype=DataType.Boolean, boolean_value=False)])
        self._send(self.topic("NBIRTH"), msg.SerializeToString())
        self._born = True

    def _device_birth(self, device: str, dev: _Device, ts_ms: int) -> None:
        msg = pb.Payload(timestamp=ts_ms, seq=self._next_seq())
        for name, (alias, dt) in dev.aliases.items():
            m = msg.metrics.add(name=name, alias=alias, datatype=dt, timestamp=ts_ms)
            if name in dev.last:
                _set_value(m, dt, dev.last[name])
            else:
                m.is_null = True
        self._send(self.topic("DBIRTH", device), msg.SerializeToString())


def _set_value(m: pb.Payload.Metric, datatype: int, value: object) -> None:
    if datatype == DataType.String:
        m.string_value = str(value)
    elif datatype == DataType.UInt64:
        m.long_value = int(value)  # type: ignore[call-overload]
    else:
        m.double_value = float(value)  # type: ignore[arg-type]
