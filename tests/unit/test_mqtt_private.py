"""The private aiomqtt/paho attributes the MQTT adapter relies on: present in the installed versions,
and reached from nowhere else in the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

from gateway.sources.mqtt import PAHO_PRIVATE

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
ADAPTER = GATEWAY / "sources" / "mqtt.py"


def _owner(name: str) -> object:
    if name == "aiomqtt.Client":
        return aiomqtt.Client("127.0.0.1", 1883, identifier="pin-test")
    if name == "paho.Client":
        return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pin-test")
    assert name == "paho.MQTTMessage"
    return paho.MQTTMessage(mid=1, topic=b"a/b")


@pytest.mark.parametrize(("owner", "attr"), PAHO_PRIVATE, ids=[f"{o}.{a}" for o, a in PAHO_PRIVATE])
async def test_private_attribute_exists(owner: str, attr: str) -> None:  # aiomqtt.Client wants a running loop
    assert hasattr(_owner(owner), attr), f"{owner}.{attr} is gone: update gateway/sources/mqtt.py's _paho_* helpers"


def test_private_attributes_are_reached_only_from_the_adapter() -> None:
    names = {attr for _, attr in PAHO_PRIVATE}
    found = []
    for path in sorted(GATEWAY.rglob("*.py")):
        if path == ADAPTER or path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # An object's own private attribute (self._client in the InfluxDB sink) is not paho's.
            if (isinstance(node, ast.Attribute) and node.attr in names
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                found.append(f"{path.relative_to(GATEWAY.parent)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_adapter_reaches_paho_privates_only_in_its_helpers() -> None:
    tree = ast.parse(ADAPTER.read_text(encoding="utf-8"))
    names = {attr for _, attr in PAHO_PRIVATE}
    outside = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and not fn.name.startswith("_paho_"):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Attribute) and node.attr in names
                        and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                    outside.append(f"{fn.name}:{node.lineno} .{node.attr}")
    assert not outside, outside


def test_every_private_attribute_the_adapter_touches_is_pinned() -> None:
    # getattr/setattr/hasattr with a literal name count too: a getattr default once hid paho 2.x's
    # missing _last_msg_in, so the stall watchdog never fired
    tree = ast.parse(ADAPTER.read_text(encoding="utf-8"))
    touched = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
            touched.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            touched.add(node.args[1].value)
    private = {a for a in touched if a.startswith("_") and not a.startswith("__")}
    assert private - {attr for _, attr in PAHO_PRIVATE} == set()
