"""The decoder registry: a decoder per subscription format, chosen by the first matching filter, and
reconfigured in place on reload (its state survives)."""

from __future__ import annotations

from typing import Any, get_args

from gateway.batch import SeriesRegistry
from gateway.config import GatewayConfig, Subscription
from gateway.decode import DECODERS, BatchBuilder, Decoder, DecoderContext, DecoderRouter


def _cfg(topics: list[Any]) -> GatewayConfig:
    return GatewayConfig.model_validate({"mqtt": {"topics": topics}})


def test_every_subscription_format_has_a_decoder() -> None:
    formats = get_args(Subscription.model_fields["format"].annotation)
    assert sorted(DECODERS) == sorted(formats)


def test_json_line_and_auto_share_one_decoder_kept_across_reloads() -> None:
    router = DecoderRouter(DecoderContext(_cfg([{"topic": "factory/#", "format": "json"},
                                                {"topic": "legacy/#", "format": "line"}]), SeriesRegistry()))
    [dec] = router.decoders.values()
    assert isinstance(dec, Decoder)
    out = BatchBuilder()
    assert router.decode("factory/s/a/l/m/telemetry", b'{"values": {"t": 1.0}}', 1763900000_000000000, out) == 1
    router.reconfigure(_cfg([{"topic": "factory/#", "format": "auto"}]))
    assert list(router.decoders.values()) == [dec]  # the same object: reconfigured, not rebuilt
    assert dec.subscriptions[0].format == "auto"


