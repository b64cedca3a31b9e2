"""MQTT source reload: the connection task brings subscriptions to the reloaded config, or reconnects."""

from __future__ import annotations

from typing import Any

import aiomqtt
import pytest

from gateway.config import MqttConfig
from gateway.sources.mqtt import MqttSource


class FakeClient:
    """Stands in for aiomqtt.Client: records (un)subscribe calls; can fail them."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    async def subscribe(self, topics: list[tuple[str, int]]) -> None:
        if self.fail:
            raise aiomqtt.MqttError("broker went away")
        self.calls.append(("sub", sorted(topics)))

    async def unsubscribe(self, topics: list[str]) -> None:
        if self.fail:
            raise aiomqtt.MqttError("broker went away")
        self.calls.append(("unsub", sorted(topics)))


def _cfg(topics: list[Any], **kw: Any) -> MqttConfig:
    return MqttConfig.model_validate({"topics": topics, **kw})


def _connected(cfg: MqttConfig) -> MqttSource:
    """A source as right after connecting with ``cfg``: subscribed to its filters."""
    src = MqttSource(cfg, lambda *a: None)
    src._subscribed = {s.topic: s.qos or 0 for s in cfg.subscriptions()}
    return src


async def test_topics_are_swapped_on_the_live_connection() -> None:
    applied = _cfg(["a/#", "b/#"])
    src, client = _connected(applied), FakeClient()
    src.reconfigure(_cfg(["b/#", {"topic": "c/#", "qos": 0}]))
    assert src._changed.is_set()
    assert await src._sync(client, applied) is False  # no reconnect needed
    assert client.calls == [("unsub", ["a/#"]), ("sub", [("c/#", 0)])]
    assert src._subscribed == {"b/#": 1, "c/#": 0}
    assert await src._sync(client, applied) is False  # nothing left to do
    assert len(client.calls) == 2


@pytest.mark.parametrize(
    "change",
    [{"port": 1884}, {"host": "10.0.0.5"}, {"keepalive_s": 20}, {"client_id": "gw2"}, {"username": "u"},
     {"protocol": "3.1.1"}, {"receive_maximum": 100}],
)
async def test_connection_changes_ask_for_a_reconnect_after_subscribing_the_new_topics(change: dict[str, Any]) -> None:
    applied = _cfg(["a/#"])
    src, client = _connected(applied), FakeClient()
    src.reconfigure(_cfg(["a/#", "new/#"], **change))
    assert await src._sync(client, applied) is True
    assert client.calls == [("sub", [("new/#", 1)])]  # at once: nothing published meanwhile is missed


async def test_a_reload_made_while_connecting_is_applied_by_the_first_sync() -> None:
    applied = _cfg(["a/#"])
    src = _connected(applied)  # connected with the old settings...
    src.reconfigure(_cfg(["z/#"], keepalive_s=20))  # ...while the reload arrived during subscribe
    client = FakeClient()
    assert await src._sync(client, applied) is True
    assert client.calls == [("unsub", ["a/#"]), ("sub", [("z/#", 1)])]


async def test_a_failed_unsubscribe_is_retried_on_the_next_connection() -> None:
    applied = _cfg(["a/#", "b/#"])
    src = _connected(applied)
    src.reconfigure(_cfg(["b/#"]))
    assert await src._sync(FakeClient(fail=True), applied) is False
    assert src._unsubscribe == {"a/#"}
    # Next connection (subscribed to the new list): the persistent session still holds a/#.
    src._subscribed = {"b/#": 1}
    client = FakeClient()
    assert await src._sync(client, _cfg(["b/#"])) is False
    assert client.calls == [("unsub", ["a/#"])]
    assert src._unsubscribe == set()


async def test_a_filter_removed_then_added_back_stays_subscribed() -> None:
    applied = _cfg(["a/#"])
    src = _connected(applied)
    src.reconfigure(_cfg(["b/#"]))
    src.reconfigure(_cfg(["a/#"]))
    client = FakeClient()
    assert await src._sync(client, applied) is False
    # b/# may have reached the broker's session in between, so it is unsubscribed (harmless if not);
    # a/# is neither unsubscribed nor subscribed twice.
    assert client.calls == [("unsub", ["b/#"])]
    assert src._subscribed == {"a/#": 1}
