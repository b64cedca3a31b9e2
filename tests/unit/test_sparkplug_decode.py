"""Sparkplug B decoder, case by case from tests/data/sparkplug/cases.json (payloads as protobuf JSON)."""

from __future__ import annotations

import base64
import doctest
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from google.protobuf import json_format

import gateway.sparkplug.decode as spdecode
from gateway.batch import MachineKey, SeriesRegistry
from gateway.config import GatewayConfig
from gateway.decode import BatchBuilder, DecoderContext, DecoderRouter
from gateway.errors import REJECT_REASONS, DecodeError
from gateway.sparkplug import SparkplugDecoder, rebirth_payload
from gateway.sparkplug import sparkplug_b_pb2 as pb

CASES = json.loads((Path(__file__).resolve().parents[1] / "data" / "sparkplug" / "cases.json").read_text())["cases"]
DEFAULT_AT_MS = 1763900001000


def _key(m: MachineKey) -> str:
    return f"{m.site}/{m.area}/{m.line}/{m.machine}"


def _payload(msg: dict[str, Any]) -> bytes:
    if "raw" in msg:
        return base64.b64decode(msg["raw"])
    if "raw_text" in msg:
        return str(msg["raw_text"]).encode()
    return json_format.ParseDict(msg["payload"], pb.Payload()).SerializeToString()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    cfg = GatewayConfig.model_validate({"sparkplug": case.get("sparkplug", {})})
    published: list[tuple[str, bytes, int, bool]] = []

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        published.append((topic, payload, qos, retain))
        return True

    reg = SeriesRegistry()
    dec = SparkplugDecoder(DecoderContext(cfg, reg, publish=publish))
    out = BatchBuilder()
    for i, msg in enumerate(case["messages"]):
        at_ns = msg.get("at", DEFAULT_AT_MS) * 1_000_000
        before = out.points
        if "error" in msg:
            reason, text = msg["error"]
            with pytest.raises(DecodeError) as err:
                dec.decode(msg["topic"], _payload(msg), at_ns, out)
            assert (err.value.reason, text in str(err.value)) == (reason, True), (i, str(err.value))
        else:
            n = dec.decode(msg["topic"], _payload(msg), at_ns, out)
            assert n == out.points - before
            if "points" in msg:
                assert n == msg["points"], i
    rejects = [[e.reason, str(e)] for e in out.rejects]
    assert rejects == case.get("rejects", [])
    assert all(r in REJECT_REASONS for r, _ in rejects)
    batch = out.take()
    tel = batch.telemetry
    rows = [[_key(reg.machine_of(s)), reg.metric(s), t // 1_000_000, v]
            for s, t, v in zip(tel.series.tolist(), tel.ts_ns.tolist(), tel.value.tolist(), strict=True)]
    assert rows == case["rows"]
    if "detect_rows" in case:
        assert batch.detect_rows == case["detect_rows"]
    if "lines" in case:
        assert [line.decode() for line in batch.raw_lines] == case["lines"]
    if "statuses" in case:
        assert [[_key(s.machine), s.ts_ns // 1_000_000, s.online, s.bdseq] for s in batch.statuses] == case["statuses"]
    if "states" in case:
        assert [[_key(s.machine), s.ts_ns // 1_000_000, s.state.value] for s in batch.states] == case["states"]
    if "counts" in case:
        assert [[_key(c.machine), c.ts_ns // 1_000_000, c.total, c.good] for c in batch.counts] == case["counts"]
    ncmds = [p for p in published if "/NCMD/" in p[0]]
    if "ncmd" in case:
        assert [p[0] for p in ncmds] == case["ncmd"]
    for topic, payload, qos, retain in ncmds:  # the spec's rebirth request: QoS 0, not retained, no seq
        cmd = pb.Payload.FromString(payload)
        assert (qos, retain, cmd.HasField("seq")) == (0, False, False), topic
        [metric] = cmd.metrics
        assert (metric.name, metric.datatype, metric.boolean_value) == ("Node Control/Rebirth", 11, True)
    if "published" in case:
        states = [p for p in published if "/STATE/" in p[0]]
        assert [[t, q, r, orjson.loads(p)["online"]] for t, p, q, r in states] == case["published"]


def test_rebirth_payload_round_trips() -> None:
    cmd = pb.Payload.FromString(rebirth_payload(1763900000000))
    assert cmd.timestamp == 1763900000000
    assert cmd.metrics[0].timestamp == 1763900000000


def test_alias_tables_survive_a_reload() -> None:
    cfg = GatewayConfig.model_validate({"mqtt": {"topics": [{"topic": "spBv1.0/#", "format": "sparkplug"}]}})
    router = DecoderRouter(DecoderContext(cfg, SeriesRegistry(), check_time_window=False))
    birth = pb.Payload(seq=0, metrics=[pb.Payload.Metric(name="bdSeq", datatype=4, long_value=0),
                                       pb.Payload.Metric(name="T", alias=5, datatype=10, is_null=True)])
    out = BatchBuilder()
    router.decode("spBv1.0/G/NBIRTH/E", birth.SerializeToString(), 0, out)
    router.reconfigure(cfg.model_copy(update={"sparkplug": cfg.sparkplug.model_copy(update={"area": "cell"})}))
    data = pb.Payload(seq=1, metrics=[pb.Payload.Metric(alias=5, double_value=1.0, timestamp=1)])
    assert router.decode("spBv1.0/G/NDATA/E", data.SerializeToString(), 0, out) == 1
    b = out.take()
    assert b.telemetry.value.tolist() == [1.0]
    assert router.ctx.registry.machine_of(int(b.telemetry.series[0])).area == "cell"


def test_host_state_will_matches_the_birth_timestamp() -> None:
    cfg = GatewayConfig.model_validate({"mqtt": {"topics": [{"topic": "spBv1.0/#", "format": "sparkplug"}]},
                                        "sparkplug": {"host_id": "gw1"}})
    state = DecoderRouter(DecoderContext(cfg, SeriesRegistry())).will()
    assert state is not None
    topic, will, birth = state
    assert topic == "spBv1.0/STATE/gw1"
    w, b = orjson.loads(will), orjson.loads(birth)
    assert (w["online"], b["online"], w["timestamp"]) == (False, True, b["timestamp"])


def test_module_examples() -> None:
    assert doctest.testmod(spdecode).failed == 0


def test_alias_tables_survive_a_restart_through_a_checkpoint(tmp_path: Path) -> None:
    """Births restored from a checkpoint: DATA decodes without a rebirth; seq resynchronises."""
    from gateway.checkpoint import read_checkpoint, write_checkpoint

    cfg = GatewayConfig.model_validate({"mqtt": {"topics": [{"topic": "spBv1.0/#", "format": "sparkplug"}]}})
    published: list[str] = []

    def router() -> DecoderRouter:
        def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
            published.append(topic)
            return True
        return DecoderRouter(DecoderContext(cfg, SeriesRegistry(), check_time_window=False, publish=publish))

    before = router()
    birth = pb.Payload(seq=0, metrics=[pb.Payload.Metric(name="bdSeq", datatype=4, long_value=3),
                                       pb.Payload.Metric(name="T", alias=5, datatype=10, is_null=True)])
    dbirth = pb.Payload(seq=1, metrics=[pb.Payload.Metric(name="P", alias=6, datatype=10, is_null=True)])
    out = BatchBuilder()
    before.decode("spBv1.0/G/NBIRTH/E", birth.SerializeToString(), 0, out)
    before.decode("spBv1.0/G/DBIRTH/E/D1", dbirth.SerializeToString(), 0, out)
    path = tmp_path / "checkpoint.npz"
    write_checkpoint(path, before.snapshot(), fingerprint="f", wal_id=0)

    after = router()
    after.restore(read_checkpoint(path, fingerprint="f").state)
    out = BatchBuilder()
    for seq, topic, alias, value in ((40, "NDATA/E", 5, 1.0), (41, "DDATA/E/D1", 6, 2.0)):
        data = pb.Payload(seq=seq, metrics=[pb.Payload.Metric(alias=alias, double_value=value, timestamp=1)])
        assert after.decode(f"spBv1.0/G/{topic}", data.SerializeToString(), 0, out) == 1
    b = out.take()
    assert b.telemetry.value.tolist() == [1.0, 2.0]
    reg = after.ctx.registry
    assert [reg.metric(int(s)) for s in b.telemetry.series] == ["T", "P"]
    assert published == []  # no rebirth requested



def test_float_metrics_are_declared_float32_and_double_metrics_are_not() -> None:
    """A birth's Float makes its series float32 (written with 9 digits); a rebirth as Double undoes it."""
    cfg = GatewayConfig.model_validate({"mqtt": {"topics": [{"topic": "spBv1.0/#", "format": "sparkplug"}]}})
    reg = SeriesRegistry()
    router = DecoderRouter(DecoderContext(cfg, reg, check_time_window=False))
    out = BatchBuilder()

    def birth(bdseq: int, t_type: int) -> bytes:
        return pb.Payload(seq=0, metrics=[
            pb.Payload.Metric(name="bdSeq", datatype=4, long_value=bdseq),
            pb.Payload.Metric(name="T", alias=1, datatype=t_type, is_null=True),
            pb.Payload.Metric(name="P", alias=2, datatype=10, is_null=True)]).SerializeToString()

    router.decode("spBv1.0/G/NBIRTH/E", birth(0, 9), 0, out)  # T Float, P Double
    data = pb.Payload(seq=1, metrics=[pb.Payload.Metric(alias=1, float_value=20.1, timestamp=1),
                                      pb.Payload.Metric(alias=2, double_value=20.1, timestamp=1)])
    router.decode("spBv1.0/G/NDATA/E", data.SerializeToString(), 0, out)
    t, p = (reg.lookup(MachineKey("G", "sparkplug", "E", "E"), m) for m in ("T", "P"))
    assert t is not None
    assert p is not None
    assert reg.float32_mask()[[t, p]].tolist() == [True, False]
    router.decode("spBv1.0/G/NBIRTH/E", birth(1, 10), 0, out)  # T reborn as Double
    data = pb.Payload(seq=1, metrics=[pb.Payload.Metric(alias=1, double_value=20.1, timestamp=2)])
    router.decode("spBv1.0/G/NDATA/E", data.SerializeToString(), 0, out)
    assert reg.float32_mask()[t] == np.False_
