"""Data-driven decoder cases (``tests/data/decode/*.json``) plus the cardinality cap.

Each case file is a list of ``{"name", "topic", "payload" | "payload_b64", "format"?, "limits"?,
"expect": {...}}`` or ``{..., "error": "substring"}``; a case may carry ``"xfail": "BUG: ..."`` when it
pins down a known bug. ``expect`` may hold ``points``, ``telemetry`` ([metric, ts_ns, value], compared
sorted), ``waveforms`` ([metric, t0_ns, dt_ns, n]), ``lines`` (raw line protocol, in order),
``states`` ([state, ts_ns, reason]) and ``counts`` ([total, good, ts_ns]).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.batch import DecodedBatch, MachineKey, SeriesRegistry
from gateway.config import GatewaySection, Subscription
from gateway.decode import BatchBuilder, Decoder
from gateway.errors import CardinalityError, DecodeError
from gateway.schema import TelemetrySample, parse_rfc3339_ns, ts_to_ns

ARRIVAL_NS = 1763900000_000000000
TEMPLATE = "factory/{site}/{area}/{line}/{machine}/{channel}"
CASE_DIR = Path(__file__).resolve().parent.parent / "data" / "decode"
_KNOWN_KEYS = {"name", "topic", "payload", "payload_b64", "format", "limits", "expect", "error", "xfail"}


def _load_cases() -> list[Any]:
    params = []
    for path in sorted(CASE_DIR.glob("*.json")):
        for case in json.loads(path.read_text(encoding="utf-8")):
            marks = []
            if "xfail" in case:
                marks.append(pytest.mark.xfail(strict=True, reason=case["xfail"]))
            params.append(pytest.param(case, id=f"{path.stem}:{case['name']}", marks=marks))
    return params


CASES = _load_cases()


def _payload(case: dict[str, Any]) -> bytes:
    if "payload_b64" in case:
        return base64.b64decode(case["payload_b64"])
    return str(case["payload"]).encode("utf-8")


def _decoder(case: dict[str, Any], registry: SeriesRegistry | None = None) -> Decoder:
    subs = [Subscription(topic="#", format=case.get("format", "auto"))]
    limits = GatewaySection(instance="test", **case.get("limits", {}))
    return Decoder(TEMPLATE, subs, limits, registry if registry is not None else SeriesRegistry())


def assert_empty(out: BatchBuilder) -> None:
    """Nothing at all was appended: a rejected message leaves no half points."""
    assert out.points == 0
    assert out.messages == 0
    batch = out.take()
    assert len(batch.telemetry) == 0
    assert batch.waveforms == []
    assert batch.states == []
    assert batch.counts == []
    assert batch.raw_lines == []


def _telemetry_rows(batch: DecodedBatch, registry: SeriesRegistry) -> list[tuple[str, int, float]]:
    t = batch.telemetry
    return sorted(
        (registry.metric(s), ts, v)
        for s, ts, v in zip(t.series.tolist(), t.ts_ns.tolist(), t.value.tolist(), strict=True)
    )


def test_case_files_are_well_formed() -> None:
    names: set[str] = set()
    assert len(CASES) > 50
    for param in CASES:
        case = param.values[0]
        assert set(case) <= _KNOWN_KEYS, case["name"]
        assert ("expect" in case) != ("error" in case), case["name"]
        assert ("payload" in case) != ("payload_b64" in case), case["name"]
        assert param.id not in names
        names.add(param.id)


@pytest.mark.parametrize("case", CASES)
def test_decode_case(case: dict[str, Any]) -> None:
    registry = SeriesRegistry()
    decoder = _decoder(case, registry)
    out = BatchBuilder()
    payload = _payload(case)
    if "error" in case:
        with pytest.raises(DecodeError, match=re.escape(case["error"])):
            decoder.decode(case["topic"], payload, ARRIVAL_NS, out)
        assert_empty(out)
        return

    expect = case["expect"]
    n = decoder.decode(case["topic"], payload, ARRIVAL_NS, out)
    assert n == expect["points"]
    assert out.points == n
    assert out.messages == 1
    batch = out.take()
    want_rows = sorted((m, ts, float(v)) for m, ts, v in expect.get("telemetry", []))
    assert _telemetry_rows(batch, registry) == want_rows
    waves = [(registry.metric(w.series), w.t0_ns, w.dt_ns, len(w.values)) for w in batch.waveforms]
    assert waves == [tuple(w) for w in expect.get("waveforms", [])]
    assert [line.decode() for line in batch.raw_lines] == expect.get("lines", [])
    assert [[e.state.value, e.ts_ns, e.reason] for e in batch.states] == expect.get("states", [])
    assert [[e.total, e.good, e.ts_ns] for e in batch.counts] == expect.get("counts", [])


def test_bad_message_after_good_leaves_good_rows_only() -> None:
    """A rejected message between good ones removes nothing that was already appended."""
    decoder = _decoder({})
    out = BatchBuilder()
    topic = "factory/s/a/l/m/telemetry"
    decoder.decode(topic, b'{"values": {"v": 1}}', ARRIVAL_NS, out)
    with pytest.raises(DecodeError):
        decoder.decode(topic, b'{"ts": [1763900000, 1763900000], "values": {"v": [1, 2], "w": [1]}}', ARRIVAL_NS, out)
    decoder.decode(topic, b'{"values": {"v": 2}}', ARRIVAL_NS, out)
    assert (out.points, out.messages) == (2, 2)
    assert out.take().telemetry.value.tolist() == [1.0, 2.0]


def test_time_window_check_can_be_disabled() -> None:
    decoder = Decoder(
        TEMPLATE, [Subscription(topic="#")], GatewaySection(instance="t"), SeriesRegistry(), check_time_window=False
    )
    out = BatchBuilder()
    decoder.decode("factory/s/a/l/m/telemetry", b'{"ts": 1.0, "values": {"v": 1}}', ARRIVAL_NS, out)
    assert out.take().telemetry.ts_ns.tolist() == [1_000_000_000]


def test_format_chosen_by_first_matching_subscription() -> None:
    subs = [
        Subscription(topic="factory/+/+/+/lp/#", format="line"),
        Subscription(topic="factory/#", format="json"),
    ]
    decoder = Decoder(TEMPLATE, subs, GatewaySection(instance="t"), SeriesRegistry())
    out = BatchBuilder()
    decoder.decode("factory/s/a/l/lp/telemetry", b"m v=1", ARRIVAL_NS, out)
    with pytest.raises(DecodeError, match="not valid JSON"):
        decoder.decode("factory/s/a/l/js/telemetry", b"m v=1", ARRIVAL_NS, out)
    assert len(out.take().raw_lines) == 1


class TestCardinality:
    def test_fourth_series_refused_earlier_still_fine(self) -> None:
        registry = SeriesRegistry(max_series=3)
        decoder = _decoder({}, registry)
        topic = "factory/s/a/l/m/telemetry"
        out = BatchBuilder()
        assert decoder.decode(topic, b'{"values": {"a": 1, "b": 2, "c": 3}}', ARRIVAL_NS, out) == 3
        out.take()
        with pytest.raises(CardinalityError, match="max_series=3"):
            decoder.decode(topic, b'{"values": {"d": 4}}', ARRIVAL_NS, out)
        assert_empty(out)
        with pytest.raises(CardinalityError):
            decoder.decode("factory/s/a/l/other/telemetry", b'{"values": {"a": 1}}', ARRIVAL_NS, out)
        assert_empty(out)
        assert decoder.decode(topic, b'{"values": {"c": 30, "a": 10}}', ARRIVAL_NS, out) == 2
        batch = out.take()
        assert _telemetry_rows(batch, registry) == [("a", ARRIVAL_NS, 10.0), ("c", ARRIVAL_NS, 30.0)]
        assert len(registry) == 3

    def test_cardinality_error_is_a_decode_error(self) -> None:
        registry = SeriesRegistry(max_series=1)
        m = MachineKey("s", "a", "l", "m")
        assert registry.series_id(m, "x") == 0
        with pytest.raises(DecodeError):
            registry.series_id(m, "y")
        assert registry.series_id(m, "x") == 0
        assert registry.lookup(m, "y") is None

    def test_columnar_over_cap_appends_nothing(self) -> None:
        registry = SeriesRegistry(max_series=1)
        decoder = _decoder({}, registry)
        out = BatchBuilder()
        payload = b'{"ts": [1763899999, 1763900000], "values": {"a": [1, 2], "b": [3, 4]}}'
        with pytest.raises(CardinalityError):
            decoder.decode("factory/s/a/l/m/telemetry", payload, ARRIVAL_NS, out)
        assert_empty(out)


class TestSchema:
    def test_rfc3339_ns(self) -> None:
        assert parse_rfc3339_ns("2025-11-23T12:00:00.000000001Z") == 1763899200000000001
        assert parse_rfc3339_ns("2025-11-23T12:00:00.1Z") == 1763899200100000000
        assert parse_rfc3339_ns("2025-11-23T14:00:00+02:00") == 1763899200000000000
        assert parse_rfc3339_ns("1969-12-31T23:59:59.5Z") == -500_000_000

    @pytest.mark.parametrize(
        "text", ["2025-11-23", "2025-11-23T12:00:00", "2025-11-23T12:00:00.1234567890Z", "12:00:00Z", ""]
    )
    def test_rfc3339_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="RFC 3339"):
            parse_rfc3339_ns(text)

    def test_ts_to_ns(self) -> None:
        assert ts_to_ns(1763900000.25) == 1763900000250000000
        assert ts_to_ns(1763900000) == 1763900000000000000
        assert ts_to_ns("2025-11-23T12:00:00Z") == 1763899200000000000

    def test_sample_model_is_frozen_and_strict(self) -> None:
        msg = TelemetrySample.model_validate_json(b'{"ts": 1763900000.25, "values": {"temp_c": 61.2}}')
        assert msg.values == {"temp_c": 61.2}
        with pytest.raises(ValueError, match="valid number"):
            TelemetrySample.model_validate({"values": {"v": "1"}})
