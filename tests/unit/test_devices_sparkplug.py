"""The simulator's Sparkplug edge node: births, aliases, seq, rebirth, what it leaves out."""

from __future__ import annotations

import orjson
import pytest

from devices.sparkplug import GOOD_METRIC, STATE_METRIC, TOTAL_METRIC, SparkplugEdge
from gateway.sparkplug import sparkplug_b_pb2 as pb

T = "factory/plant1/a/l1/{m}/{ch}"


def _edge() -> tuple[SparkplugEdge, list[tuple[str, pb.Payload]]]:
    sent: list[tuple[str, pb.Payload]] = []
    return SparkplugEdge("plant1", "n1", lambda t, p: sent.append((t, pb.Payload.FromString(p)))), sent


def _send(edge: SparkplugEdge, m: str, ch: str, doc: dict[str, object]) -> None:
    edge.handle(T.format(m=m, ch=ch), orjson.dumps(doc))


def test_births_then_alias_only_data_with_one_seq_per_node() -> None:
    edge, sent = _edge()
    _send(edge, "m1", "state", {"ts": 10.0, "state": "RUNNING"})
    _send(edge, "m2", "count", {"ts": 10.5, "total": 5, "good": 4})
    _send(edge, "m1", "state", {"ts": 11.0, "state": "IDLE"})
    _send(edge, "m2", "count", {"ts": 11.5, "total": 7})
    assert [t.split("/")[2] for t, _ in sent] == ["NBIRTH", "DBIRTH", "DBIRTH", "DDATA", "DDATA"]
    assert [p.seq for _, p in sent] == [0, 1, 2, 3, 4]
    birth = sent[1][1]
    assert {m.name for m in birth.metrics} == {STATE_METRIC, TOTAL_METRIC, GOOD_METRIC}
    assert [m.is_null for m in birth.metrics if m.name == TOTAL_METRIC] == [True]  # no value seen yet
    alias = {m.name: m.alias for m in birth.metrics}
    data = sent[3][1]
    assert [(m.name, m.alias, m.string_value, m.timestamp) for m in data.metrics] == [
        ("", alias[STATE_METRIC], "IDLE", 11_000)]
    assert [(m.long_value, m.timestamp) for m in sent[4][1].metrics] == [(7, 11_500)]


def test_a_new_metric_is_a_new_birth_and_blocks_are_left_out() -> None:
    edge, sent = _edge()
    _send(edge, "m1", "telemetry", {"ts": 1.0, "values": {"a": 1.0}})
    _send(edge, "m1", "telemetry", {"ts": 2.0, "values": {"a": 2.0, "b": 3.0}})
    _send(edge, "m1", "telemetry", {"ts": [3.0, 4.0], "values": {"a": [1.0, 2.0]}})  # columnar
    _send(edge, "m1", "telemetry", {"t0": 5.0, "dt": 0.001, "values": {"accel_g": [0.1, 0.2]}})  # fixed rate
    assert [t.split("/")[2] for t, _ in sent] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert [(m.name, m.double_value) for m in sent[2][1].metrics if m.name in ("a", "b")] == [("a", 2.0), ("b", 3.0)]


def test_seq_wraps_and_a_rebirth_renews_every_birth_with_the_next_bdseq() -> None:
    edge, sent = _edge()
    for i in range(300):
        _send(edge, "m1", "state", {"ts": float(i), "state": "RUNNING"})
    assert [p.seq for _, p in sent][255:259] == [255, 0, 1, 2]
    cmd = pb.Payload(metrics=[pb.Payload.Metric(name="Node Control/Rebirth", datatype=11, boolean_value=True)])
    edge.command("spBv1.0/plant1/NCMD/other", cmd.SerializeToString())  # not ours
    edge.command("spBv1.0/plant1/NCMD/n1", b"\xff\x00 not protobuf")  # logged, ignored
    assert edge.rebirths == 0
    before = len(sent)
    edge.command("spBv1.0/plant1/NCMD/n1", cmd.SerializeToString())
    assert [t.split("/")[2] for t, _ in sent[before:]] == ["NBIRTH", "DBIRTH"]
    assert [p.seq for _, p in sent[before:]] == [0, 1]
    assert [m.long_value for m in sent[before][1].metrics if m.name == "bdSeq"] == [1]
    topic, payload = edge.death()
    assert topic == "spBv1.0/plant1/NDEATH/n1"
    assert [m.long_value for m in pb.Payload.FromString(payload).metrics] == [1]


@pytest.mark.parametrize("channel", ["unknown", "telemetry"])
def test_nothing_to_send_sends_nothing(channel: str) -> None:
    edge, sent = _edge()
    _send(edge, "m1", channel, {"ts": [1.0], "values": {"a": [1.0]}})
    assert sent == []
