"""Packet framing for the fast MQTT receive path: data-driven cases, every split point, bad input."""

from __future__ import annotations

import pytest

from gateway.sources.mqtt_frame import MalformedPacket, PacketFramer, Publish


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 0, retain: bool = False,
            dup: bool = False, props: bytes | None = None) -> bytes:
    """An MQTT PUBLISH; ``props`` set means MQTT 5 (the property block, possibly empty)."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if props is not None:
        body += varint(len(props)) + props
    body += payload
    return bytes([0x30 | (dup << 3) | (qos << 1) | retain]) + varint(len(body)) + body


BIG = bytes(range(256)) * 80  # 20,480 bytes: a 3-byte remaining length
CASES = [
    # id, v5, wire bytes, expected items
    ("qos0", False, publish(b"a/b", b"x"), [Publish(b"a/b", b"x", 0, 0, False, False)]),
    ("qos1", False, publish(b"f/s/a", b"{}", qos=1, mid=65535),
     [Publish(b"f/s/a", b"{}", 1, 65535, False, False)]),
    ("retained dup", False, publish(b"t", b"p", qos=1, mid=3, retain=True, dup=True),
     [Publish(b"t", b"p", 1, 3, True, True)]),
    ("empty payload", False, publish(b"t", b"", qos=1, mid=1), [Publish(b"t", b"", 1, 1, False, False)]),
    ("3-byte length", False, publish(b"big", BIG, qos=1, mid=9), [Publish(b"big", BIG, 1, 9, False, False)]),
    ("v5 no props", True, publish(b"t", b"v", qos=1, mid=2, props=b""), [Publish(b"t", b"v", 1, 2, False, False)]),
    ("v5 props skipped", True,
     publish(b"t", b"v", qos=1, mid=2, props=b"\x01\x01" + b"\x26\x00\x01k\x00\x01v"),
     [Publish(b"t", b"v", 1, 2, False, False)]),
    ("v5 long props", True, publish(b"t", b"v", props=b"\x26\x00\x80" + b"k" * 128 + b"\x00\x00"),
     [Publish(b"t", b"v", 0, 0, False, False)]),
    ("pingresp", False, b"\xd0\x00", [b"\xd0\x00"]),
    ("suback", False, b"\x90\x03\x00\x01\x01", [b"\x90\x03\x00\x01\x01"]),
    ("qos2 to library", False, publish(b"t", b"p", qos=2, mid=5), [publish(b"t", b"p", qos=2, mid=5)]),
    ("v5 topic alias to library", True, publish(b"", b"p", props=b"\x23\x00\x01"),
     [publish(b"", b"p", props=b"\x23\x00\x01")]),
    ("mixed in order", False,
     publish(b"a", b"1", qos=1, mid=1) + b"\xd0\x00" + publish(b"b", b"2"),
     [Publish(b"a", b"1", 1, 1, False, False), b"\xd0\x00", Publish(b"b", b"2", 0, 0, False, False)]),
]


@pytest.mark.parametrize(("v5", "wire", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_read(v5: bool, wire: bytes, expected: list[object]) -> None:
    f = PacketFramer(v5=v5)
    assert f.feed(wire) == expected
    assert f.pending == 0


@pytest.mark.parametrize(("v5", "wire", "expected"), [c[1:] for c in CASES if len(c[2]) < 2000],
                         ids=[c[0] for c in CASES if len(c[2]) < 2000])
def test_every_split_point(v5: bool, wire: bytes, expected: list[object]) -> None:
    for cut in range(len(wire) + 1):
        f = PacketFramer(v5=v5)
        got = f.feed(wire[:cut]) + f.feed(wire[cut:])
        assert got == expected, cut
        assert f.pending == 0


def test_byte_at_a_time_across_many_packets() -> None:
    wire = b"".join(publish(f"m/{i}".encode(), b"x" * i, qos=1, mid=i + 1) for i in range(200)) + BIG[:0]
    wire += publish(b"big", BIG, qos=1, mid=999)
    f = PacketFramer(v5=False)
    got: list[object] = []
    for k in range(0, len(wire), 7):
        got += f.feed(wire[k:k + 7])
    assert len(got) == 201
    assert got[150] == Publish(b"m/150", b"x" * 150, 1, 151, False, False)
    assert got[-1] == Publish(b"big", BIG, 1, 999, False, False)
    assert f.pending == 0


def test_partial_kept() -> None:
    f = PacketFramer(v5=False)
    wire = publish(b"t", b"abc", qos=1, mid=1)
    assert f.feed(wire + wire[:3]) == [Publish(b"t", b"abc", 1, 1, False, False)]
    assert f.pending == 3


@pytest.mark.parametrize(("v5", "wire", "match"), [
    (False, b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    (False, b"\x36\x03\x00\x01t", "QoS 3"),
    (False, b"\x32\x03\x00\x01t", "packet id runs past"),
    (False, b"\x30\x02\x00\x05", "topic or packet id runs past"),
    (True, b"\x30\x04\x00\x01t\x05", "properties run past"),
    (True, b"\x30\x03\x00\x01t", "property length runs past"),
])
def test_malformed(v5: bool, wire: bytes, match: str) -> None:
    with pytest.raises(MalformedPacket, match=match):
        PacketFramer(v5=v5).feed(wire)
