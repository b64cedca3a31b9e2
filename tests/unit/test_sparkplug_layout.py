"""The Sparkplug DATA fast path (gateway.sparkplug.layout) decodes exactly what the protobuf path does."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.batch import SeriesRegistry
from gateway.config import GatewayConfig
from gateway.decode import BatchBuilder, DecoderContext
from gateway.errors import DecodeError
from gateway.sparkplug import SparkplugDecoder
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.decode import DataType
from gateway.sparkplug.layout import DataLayout

NOW_MS = 1_763_900_000_000
T = DataType
# datatype -> the value field a writer uses and a strategy of its values
KINDS: dict[int, tuple[str, Any]] = {
    T.Int8: ("int_value", st.integers(0, 2**32 - 1)),
    T.Int16: ("int_value", st.integers(0, 2**32 - 1)),
    T.Int32: ("int_value", st.integers(0, 2**32 - 1)),
    T.Int64: ("long_value", st.integers(0, 2**63 - 1)),
    T.UInt8: ("int_value", st.integers(0, 255)),
    T.UInt16: ("int_value", st.integers(0, 65535)),
    T.UInt32: ("int_value", st.integers(0, 2**32 - 1)),
    T.UInt64: ("long_value", st.integers(0, 2**63 - 1)),
    T.DateTime: ("long_value", st.integers(0, 2**45)),
    T.Float: ("float_value", st.floats(width=32, allow_nan=True, allow_infinity=True)),
    T.Double: ("double_value", st.floats(allow_nan=True, allow_infinity=True)),
    T.Boolean: ("boolean_value", st.booleans()),
}


class _Run:
    """A decoder fed message by message; ``fast`` False: every message through the protobuf runtime."""

    def __init__(self, fast: bool) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.reg = SeriesRegistry()

        def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
            self.published.append((topic, payload))
            return True

        self.dec = SparkplugDecoder(DecoderContext(GatewayConfig(), self.reg, publish=publish))
        self.out = BatchBuilder()
        self.errors: list[str] = []
        self.fast = fast

    def feed(self, topic: str, payload: bytes, at_ms: int = NOW_MS) -> None:
        if not self.fast:
            for node in self.dec._nodes.values():
                node.layouts.clear()
        try:
            self.dec.decode(topic, payload, at_ms * 1_000_000, self.out)
        except DecodeError as exc:
            self.errors.append(f"{exc.reason}: {exc}")

    def result(self) -> dict[str, Any]:
        rejects = [str(e) for e in self.out.rejects]
        b = self.out.take()
        tel = b.telemetry
        rows = [(self.reg.metric(s), t, v if not math.isnan(v) else "nan")
                for s, t, v in zip(tel.series.tolist(), tel.ts_ns.tolist(), tel.value.tolist(), strict=True)]
        return {"rows": rows, "detect_rows": b.detect_rows, "rejects": rejects, "errors": self.errors,
                "published": [t for t, _ in self.published], "lines": b.raw_lines}


def _births(types: list[int]) -> list[tuple[str, bytes]]:
    nb = pb.Payload(timestamp=NOW_MS, seq=0, metrics=[pb.Payload.Metric(name="bdSeq", datatype=T.Int64, long_value=0)])
    db = pb.Payload(timestamp=NOW_MS, seq=1, metrics=[
        pb.Payload.Metric(name=f"m{k}", alias=k + 1, datatype=dt, **{KINDS[dt][0]: 0}) for k, dt in enumerate(types)])
    return [("spBv1.0/G/NBIRTH/E", nb.SerializeToString()), ("spBv1.0/G/DBIRTH/E/D", db.SerializeToString())]


@st.composite
def _plant(draw: Any) -> tuple[list[int], list[tuple[str, bytes]]]:
    """Births of one device, then DATA messages mostly of one shape with occasional odd ones."""
    types = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=6))
    msgs = _births(types)
    seq = draw(st.integers(1, 255))  # the next seq after the births' 0, 1 may jump (a gap) or wrap
    for i in range(draw(st.integers(2, 12))):
        seq = (seq + draw(st.sampled_from([1, 1, 1, 1, 2, 0]))) % 256
        ts = NOW_MS + i * 10 + draw(st.sampled_from([0] * 6 + [-10**9, 10**9]))  # a few outside the window
        metrics = []
        odd_one = draw(st.integers(0, len(types) - 1))  # at most one odd metric per message
        odd_kind = draw(st.sampled_from(["plain"] * 6 + ["no_ts", "null", "historical", "other_kind", "bad_alias"]))
        for k, dt in enumerate(types):
            field, values = KINDS[dt]
            kw: dict[str, Any] = {field: draw(values)}
            odd = odd_kind if k == odd_one else "plain"
            if odd != "no_ts":
                kw["timestamp"] = ts
            if odd == "null":
                kw["is_null"] = True
            if odd == "historical":
                kw["is_historical"] = True
            if odd == "other_kind":
                kw = {"string_value": "x", "timestamp": ts}
            metrics.append(pb.Payload.Metric(alias=k + 1 if odd != "bad_alias" else 99, **kw))
        payload = pb.Payload(seq=seq, metrics=metrics)
        if draw(st.booleans()):
            payload.timestamp = ts
        msgs.append(("spBv1.0/G/DDATA/E/D", payload.SerializeToString()))
    return types, msgs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plant=_plant(), repeats=st.integers(1, 3))
def test_fast_path_decodes_what_protobuf_does(plant: tuple[list[int], list[tuple[str, bytes]]], repeats: int) -> None:
    _, msgs = plant
    fast, slow = _Run(True), _Run(False)
    for topic, payload in msgs:
        for _ in range(repeats if "DDATA" in topic else 1):  # repeats: learnt, then read by the layout
            fast.feed(topic, payload)
            slow.feed(topic, payload)
    assert fast.result() == slow.result()
    assert slow.dec.fast_data == 0


def test_layout_is_used_for_repeated_shapes() -> None:
    types = [T.Float, T.Double, T.Int16, T.UInt64, T.Boolean]
    run = _Run(True)
    for topic, payload in _births(types):
        run.feed(topic, payload)
    for i in range(5):
        p = pb.Payload(timestamp=NOW_MS + i, seq=2 + i, metrics=[
            pb.Payload.Metric(alias=1, timestamp=NOW_MS + i, float_value=1.5 + i),
            pb.Payload.Metric(alias=2, timestamp=NOW_MS + i, double_value=-2.25),
            pb.Payload.Metric(alias=3, timestamp=NOW_MS + i, int_value=0xFFFF),  # Int16 -1
            pb.Payload.Metric(alias=4, timestamp=NOW_MS + i, long_value=2**40),
            pb.Payload.Metric(alias=5, int_value=0, timestamp=NOW_MS + i, boolean_value=i % 2 == 1)])
        run.feed("spBv1.0/G/DDATA/E/D", p.SerializeToString())
    (node,) = run.dec._nodes.values()
    (layout,) = [v for v in node.layouts.values() if isinstance(v, DataLayout)]
    assert layout.misses == 0
    assert run.dec.fast_data == 4  # the first was learnt from
    rows = run.result()["rows"]
    assert rows[-5:] == [("m0", (NOW_MS + 4) * 10**6, 5.5), ("m1", (NOW_MS + 4) * 10**6, -2.25),
                         ("m2", (NOW_MS + 4) * 10**6, -1.0), ("m3", (NOW_MS + 4) * 10**6, float(2**40)),
                         ("m4", (NOW_MS + 4) * 10**6, 0.0)]


def test_a_rebirth_forgets_the_layouts() -> None:
    run = _Run(True)
    for topic, payload in _births([T.Float]):
        run.feed(topic, payload)
    data = pb.Payload(seq=2, metrics=[pb.Payload.Metric(alias=1, timestamp=NOW_MS, float_value=1.0)])
    run.feed("spBv1.0/G/DDATA/E/D", data.SerializeToString())
    (node,) = run.dec._nodes.values()
    assert any(isinstance(v, DataLayout) for v in node.layouts.values())
    db = pb.Payload(seq=3, metrics=[pb.Payload.Metric(name="renamed", alias=1, datatype=T.Float, float_value=0)])
    run.feed("spBv1.0/G/DBIRTH/E/D", db.SerializeToString())
    assert node.layouts == {}
    data.seq = 4
    run.feed("spBv1.0/G/DDATA/E/D", data.SerializeToString())
    assert run.result()["rows"][-1][0] == "renamed"


@pytest.mark.parametrize("payload", [b"", b"\x0b", b"\x12\xff", b"\x12\x02\x10", b"\x12\x80", bytes(range(40))])
def test_learn_refuses_what_it_cannot_walk(payload: bytes) -> None:
    assert DataLayout.learn(payload, [(12, 0, False)]) is None


def test_extract_refuses_a_changed_byte() -> None:
    p = pb.Payload(seq=1, metrics=[pb.Payload.Metric(alias=1, timestamp=NOW_MS, float_value=1.0)])
    raw = p.SerializeToString()
    layout = DataLayout.learn(raw, [(12, 0, False)])
    assert layout is not None
    p.metrics[0].alias = 2
    assert layout.extract(p.SerializeToString()) is None
    p.metrics[0].alias, p.metrics[0].float_value = 1, 7.0
    got = layout.extract(p.SerializeToString())
    assert got is not None
    assert got[2].tolist() == [7.0]
    assert np.array_equal(got[1], [NOW_MS])


def test_a_reload_that_names_an_oee_metric_stops_the_fast_path_for_it() -> None:
    run = _Run(True)
    for topic, payload in _births([T.Int64]):
        run.feed(topic, payload)
    for seq in (2, 3):
        data = pb.Payload(seq=seq, metrics=[pb.Payload.Metric(alias=1, timestamp=NOW_MS + seq, long_value=10 * seq)])
        run.feed("spBv1.0/G/DDATA/E/D", data.SerializeToString())
    assert run.dec.fast_data == 1
    cfg = GatewayConfig.model_validate({"sparkplug": {"total_metric": "m0"}})
    run.dec.reconfigure(cfg)  # m0 is now the part counter: each value must reach the OEE engine
    data = pb.Payload(seq=4, metrics=[pb.Payload.Metric(alias=1, timestamp=NOW_MS + 4, long_value=40)])
    run.feed("spBv1.0/G/DDATA/E/D", data.SerializeToString())
    assert run.dec.fast_data == 1
    assert [(c.total, c.good) for c in run.out.counts] == [(40, 40)]
