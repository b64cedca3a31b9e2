"""MQTT packet framing for the fast receive path of :mod:`gateway.sources.mqtt` (used only by it).

:class:`PacketFramer` takes whole socket reads, keeps any partial packet for the next read, and
returns every complete packet in arrival order: a QoS 0/1 PUBLISH decoded as :class:`Publish`
(MQTT 3.1.1 and 5: the v5 property block is skipped), anything else (PINGRESP, SUBACK, DISCONNECT,
QoS 2 PUBLISH whose handshake the library owns, ...) as its raw bytes, to be handed back to the
library unchanged.

>>> f = PacketFramer(v5=False)
>>> pkt = bytes([0x32, 9, 0, 3]) + b"a/b" + bytes([0, 7]) + b"hi"
>>> f.feed(pkt[:4]), f.pending
([], 4)
>>> f.feed(pkt[4:] + bytes([0xD0, 0]))
[Publish(topic=b'a/b', payload=b'hi', qos=1, mid=7, retain=False, dup=False), b'\\xd0\\x00']
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MalformedPacket", "PacketFramer", "Publish"]


class MalformedPacket(ValueError):
    """The broker sent bytes that are not a valid MQTT packet (the connection must be dropped)."""


class Publish(NamedTuple):
    """One decoded PUBLISH (QoS 0 or 1); ``mid`` is 0 for QoS 0."""

    topic: bytes
    payload: bytes
    qos: int
    mid: int
    retain: bool
    dup: bool


class PacketFramer:
    """Frames a byte stream from the broker into packets; see the module docstring."""

    __slots__ = ("_buf", "v5")

    def __init__(self, *, v5: bool) -> None:
        self.v5 = v5
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet kept for the next :meth:`feed`."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Publish | bytes]:
        """Append one socket read; return every packet now complete, in arrival order."""
        buf = self._buf + data if self._buf else data
        out: list[Publish | bytes] = []
        n = len(buf)
        pos = 0
        v5 = self.v5
        while n - pos >= 2:
            first = buf[pos]
            # remaining length: 1-4 bytes, 7 bits each, high bit = more
            i = pos + 1
            length = 0
            shift = 0
            complete = False
            while i < n:
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket(f"remaining length longer than 4 bytes at offset {pos}")
            if not complete:
                break  # the length itself is split across reads
            end = i + length
            if end > n:
                break
            if first >> 4 == 3 and (first >> 1) & 3 < 2:
                qos = (first >> 1) & 3
                if length < 2:
                    raise MalformedPacket("PUBLISH shorter than its topic length")
                tlen = (buf[i] << 8) | buf[i + 1]
                t0 = i + 2
                t1 = t0 + tlen
                mid = 0
                if qos:
                    mid = (buf[t1] << 8) | buf[t1 + 1] if t1 + 2 <= end else -1
                    t1p = t1 + 2
                else:
                    t1p = t1
                if t1p > end or mid == -1:
                    raise MalformedPacket("PUBLISH topic or packet id runs past the packet end")
                if v5:
                    p = t1p
                    plen = 0
                    shift = 0
                    while True:
                        if p >= end:
                            raise MalformedPacket("PUBLISH property length runs past the packet end")
                        b = buf[p]
                        p += 1
                        plen |= (b & 0x7F) << shift
                        if not b & 0x80:
                            break
                        shift += 7
                        if shift > 21:
                            raise MalformedPacket("PUBLISH property length longer than 4 bytes")
                    t1p = p + plen
                    if t1p > end:
                        raise MalformedPacket("PUBLISH properties run past the packet end")
                    if tlen == 0:  # a topic alias; the library resolves those
                        out.append(buf[pos:end])
                        pos = end
                        continue
                out.append(Publish(buf[t0:t1], buf[t1p:end], qos, mid, bool(first & 1), bool(first & 8)))
            else:
                if first >> 4 == 3 and (first >> 1) & 3 == 3:
                    raise MalformedPacket("PUBLISH with QoS 3")
                out.append(buf[pos:end])
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return out
