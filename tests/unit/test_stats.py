"""The stats registry: each stage's snapshot and :func:`gateway.stats.collect` report what the stages did."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from gateway import __version__
from gateway.batch import AckToken
from gateway.config import GatewayConfig
from gateway.deadletter import DeadLetterFile
from gateway.errors import REJECT_REASONS
from gateway.pipeline import Pipeline, collect
from gateway.wal import WriteAheadLog
from tests.fakes import RecordingSink

TOPIC = "factory/s/a/l/m1/telemetry"


def _cfg() -> GatewayConfig:
    return GatewayConfig.model_validate({
        "influx": {"batch_size": 1000, "max_retry_s": 0.05},
        "detect": {"detectors": ["flatline"]},
        "gateway": {"instance": "gw-test", "max_series": 77},
    })


def _msg(i: int) -> bytes:
    return orjson.dumps({"ts": time.time() - 10 + i * 0.001, "values": {"t": float(i), "u": 1.0}})


async def test_collect_reports_every_stage(tmp_path: Path) -> None:
    sink = RecordingSink()
    dead = DeadLetterFile(tmp_path / "dl.jsonl")
    wal = WriteAheadLog(tmp_path / "wal", max_bytes=1 << 20)
    try:
        await _run(Pipeline(_cfg(), sink, wal=wal, deadletter=dead, emit_stats=False))
    finally:
        wal.close()
        dead.close()


async def _run(p: Pipeline) -> None:

    def ack(tokens: Sequence[AckToken]) -> int:
        return len(tokens)

    p.ack = ack
    for i in range(4):
        p.submit(TOPIC, _msg(i) if i != 1 else b"{broken", AckToken(i + 1, 1, 1))
    before = collect(p)
    assert before.pipeline.pending_messages == 4
    await p.flush()
    st = collect(p)
    assert (st.version, st.instance, st.mqtt) == (__version__, "gw-test", None)
    assert st.pipeline.messages_in == 4
    assert st.pipeline.acks == 4
    assert st.pipeline.points_in == 6
    assert st.pipeline.decode_errors == 1
    assert st.pipeline.pending_messages == 0
    assert st.pipeline.accepting
    assert (st.pipeline.series, st.pipeline.max_series) == (2, 77)
    assert set(st.pipeline.rejected) == set(REJECT_REASONS)
    assert sum(st.pipeline.rejected.values()) == 1
    assert st.pipeline.anomalies_by_detector["flatline"] == 0
    assert st.output.writes == 0
    assert not st.output.failing
    assert st.deadletter is not None
    assert st.deadletter.records_written == 1
    assert st.wal is not None
    assert st.wal.max_bytes == 1 << 20
    assert st.wal.records_pending == 1
    assert 0 < st.wal.bytes_pending < st.wal.max_bytes
    assert st.wal.oldest_pending_age_s is not None
    json = st.to_json()
    assert json["pipeline"]["rejected"] == dict(st.pipeline.rejected)
    orjson.dumps(json)  # JSON-ready as it is


async def test_output_snapshot_while_failing(tmp_path: Path) -> None:
    p = Pipeline(_cfg(), RecordingSink(), emit_stats=False)
    p.output.failing_since = time.monotonic() - 5
    p.output.last_error = "influx down"
    out = collect(p).output
    assert out.failing
    assert out.failing_for_s is not None
    assert 5 <= out.failing_for_s < 60
    assert out.last_error == "influx down"
    assert collect(p).wal is None
    assert collect(p).deadletter is None
