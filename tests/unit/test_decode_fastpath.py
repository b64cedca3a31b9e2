"""The decoder's fast path for one-sample telemetry accepts and rejects exactly like the full model."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.batch import SeriesRegistry
from gateway.config import GatewaySection, Subscription
from gateway.decode import BatchBuilder, Decoder
from gateway.errors import DecodeError

ARRIVAL = 1_763_900_000_000_000_000
TOPIC = "factory/s/a/l/m1/telemetry"

scalar = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53), st.booleans(), st.none(),
    st.text(max_size=3), st.just(1e300),
)
ts = st.one_of(st.none(), st.floats(1.7e9, 1.8e9), st.integers(1_763_000_000, 1_764_000_000), st.just(-1.0),
               st.just(1e12), st.just("2025-11-23T12:00:00Z"), st.booleans(), st.just(1_763_900_400.0))
payloads = st.fixed_dictionaries(
    {"values": st.dictionaries(st.sampled_from(["t", "v", "_x", ""]), scalar, max_size=3)},
    optional={"ts": ts, "seq": st.one_of(st.integers(0, 10), st.text(max_size=2), st.booleans()),
              "extra": st.integers(-(2**63), 2**63 - 1)},
)


def _decode(dec: Decoder, payload: dict[str, Any]) -> tuple[str, Any]:
    out = BatchBuilder()
    try:
        dec.decode(TOPIC, orjson.dumps(payload), ARRIVAL, out)
    except DecodeError as exc:
        return "error", str(exc).split(":")[0]
    b = out.take().telemetry
    return "ok", (b.series.tolist(), b.ts_ns.tolist(), b.value.tolist())


def _decoder() -> Decoder:
    return Decoder("factory/{site}/{area}/{line}/{machine}/{channel}", [Subscription(topic="#")],
                   GatewaySection(), SeriesRegistry())


@settings(max_examples=400, deadline=None)
@given(payloads)
def test_fast_path_agrees_with_model(payload: dict[str, Any]) -> None:
    warm = _decoder()
    # Teach the warm decoder every metric name through the full path, so the payload takes the fast path.
    warm.decode(TOPIC, orjson.dumps({"ts": 1_763_899_999.0, "values": {"t": 1.0, "v": 2.0}}), ARRIVAL, BatchBuilder())
    cold = _decoder()
    cold.decode(TOPIC, orjson.dumps({"ts": 1_763_899_999.0, "values": {"t": 1.0, "v": 2.0}}), ARRIVAL, BatchBuilder())
    cold._routes.clear()  # forget the validated names: the cold decoder takes the full model path
    for route in cold._routes.values():
        route.sids.clear()
    assert _decode(warm, payload) == _decode(cold, payload)
