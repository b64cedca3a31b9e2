"""Wire-level fast path for Sparkplug DATA: a device's messages repeat one byte layout.

An edge node sends its devices' DDATA (and its own NDATA) with the same metrics, aliases and datatypes
in the same order every time; only the values, the timestamps and ``seq`` change, and those sit at the
same byte offsets as long as the varints keep their width (a millisecond timestamp is a 6-byte varint
from 1971 to 2109). The first such message is decoded by the protobuf runtime; :meth:`DataLayout.learn`
then walks its wire bytes once and records where each variable field is. Later messages of the same
length are checked against the layout in one big-integer comparison (every other byte equal, every
varint slot of the same width) and their values read straight from the bytes into arrays: no
protobuf object and no Python loop per metric. Anything else (a different length, a changed alias, a
flag, a NaN, a timestamp outside the window) goes through the protobuf runtime as before.

Written by hand because no library reads repeated protobuf fields into numpy arrays, and the protobuf
runtime's per-field Python access is what bounded Sparkplug ingest (~1.5 µs per metric).

Soundness: protobuf decoding is a function of the bytes; two payloads equal everywhere except inside
fixed-width value fields and same-width varints parse to the same tree, with the same aliases, flags,
datatypes and field order, differing only in those values.

>>> from gateway.sparkplug import sparkplug_b_pb2 as pb
>>> def ddata(seq: int, ts: int, v: float) -> bytes:
...     return pb.Payload(timestamp=ts, seq=seq, metrics=[
...         pb.Payload.Metric(alias=1, timestamp=ts, float_value=v),
...         pb.Payload.Metric(alias=2, timestamp=ts, long_value=7)]).SerializeToString()
>>> first = ddata(5, 1_700_000_000_000, 20.5)
>>> lay = DataLayout.learn(first, [(12, 0, False), (11, 64, True)])
>>> seq, ts, values = lay.extract(ddata(6, 1_700_000_000_010, 21.25))
>>> seq, ts.tolist(), values.tolist()
(6, [1700000000010, 1700000000010], [21.25, 7.0])
>>> lay.extract(ddata(200, 1_700_000_000_010, 1.0)) is None  # seq 200 is a 2-byte varint: another layout
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DataLayout"]

_MAX_VARINT = 9  # bytes; a wider varint (a uint64 above 2^63) is left to the protobuf runtime
# Metric fields: value kinds the fast path reads (field number -> kind); others keep their bytes fixed.
_FIXED32, _FIXED64, _VARINT = "f4", "f8", "varint"
_VALUE_FIELDS = {10: _VARINT, 11: _VARINT, 12: _FIXED32, 13: _FIXED64, 14: _VARINT}
_OTHER_VALUES = frozenset({15, 16, 17, 18, 19})  # string, bytes, dataset, template, extension


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """``(value, next offset)`` of the varint at ``buf[i]``."""
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


class _NoLayout(Exception):
    """The payload has no layout the fast path reads (the protobuf runtime handles it)."""


def _fields(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """``(field number, wire type, value start, value end)`` of each field in ``buf[start:end]``."""
    out = []
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            j = i + size
        elif wire == 5:
            j = i + 4
        else:  # groups: not in Sparkplug
            raise _NoLayout
        if j > end:
            raise _NoLayout
        out.append((number, wire, i, j))
        i = j
    return out


class _Walk:
    """One walk of a DATA payload's wire bytes: where its variable bytes are (raises _NoLayout for
    anything the fast path does not read; ``types`` as in :meth:`DataLayout.learn`)."""

    def __init__(self, payload: bytes, types: list[tuple[int, int, bool]]) -> None:
        self.slots: list[list[int]] = []  # byte offsets of each varint slot
        self.var_bytes: list[int] = []  # offsets of varint bytes: their high bit is fixed, the rest free
        self.free: list[int] = []  # offsets of fixed-width value bytes: free
        self.seq_slot = self.ts_slot = -1
        self.metric_ts: list[int] = []
        self.f4_at: list[int] = []
        self.f8_at: list[int] = []
        self.f4_idx: list[int] = []
        self.f8_idx: list[int] = []
        self.int_at: list[int] = []
        self.int_slot: list[int] = []
        self.int_types: list[tuple[int, int, bool]] = []
        k = 0
        for number, wire, a, b in _fields(payload, 0, len(payload)):
            if number == 1 and wire == 0:
                self.ts_slot = self._slot(a, b)
            elif number == 3 and wire == 0:
                self.seq_slot = self._slot(a, b)
            elif number == 2 and wire == 2:
                if k >= len(types):
                    raise _NoLayout
                self._metric(k, types[k], _fields(payload, a, b))
                k += 1
        if k != len(types):
            raise _NoLayout

    def _slot(self, a: int, b: int) -> int:
        if b - a > _MAX_VARINT:
            raise _NoLayout
        self.slots.append(list(range(a, b)))
        self.var_bytes.extend(range(a, b))
        return len(self.slots) - 1

    def _metric(self, k: int, typ: tuple[int, int, bool], inner: list[tuple[int, int, int, int]]) -> None:
        want, bits, signed = typ
        ts = -1
        seen_value = False
        for n2, w2, a2, b2 in inner:
            if n2 == 3 and w2 == 0:
                ts = self._slot(a2, b2)
            elif n2 == want and n2 in _VALUE_FIELDS:
                kind = _VALUE_FIELDS[n2]
                if seen_value:
                    raise _NoLayout
                seen_value = True
                if kind == _FIXED32 and w2 == 5:
                    self.f4_at.append(k)
                    self.f4_idx.extend(range(a2, b2))
                    self.free.extend(range(a2, b2))
                elif kind == _FIXED64 and w2 == 1:
                    self.f8_at.append(k)
                    self.f8_idx.extend(range(a2, b2))
                    self.free.extend(range(a2, b2))
                elif kind == _VARINT and w2 == 0:
                    self.int_at.append(k)
                    self.int_slot.append(self._slot(a2, b2))
                    self.int_types.append((n2, bits, signed))
                else:
                    raise _NoLayout
            elif n2 in _VALUE_FIELDS or n2 in _OTHER_VALUES:
                raise _NoLayout  # a value the caller did not expect: the protobuf runtime decides
        if not seen_value:
            raise _NoLayout
        self.metric_ts.append(ts)


@dataclass(slots=True)
class DataLayout:
    """Where the variable bytes of one device's DATA messages are (see the module docs)."""

    size: int
    expected: int  # the payload as a little-endian integer, variable bits zeroed
    mask: int  # 1 bits where a payload must equal ``expected``
    var_idx: np.ndarray[Any, Any]  # (slots, _MAX_VARINT) byte offsets, ``size`` = a zero pad byte
    var_bias: np.ndarray[Any, Any]  # per slot: what its continuation bits add to ``bytes @ _WEIGHTS``
    f4_idx: np.ndarray[Any, Any]  # 4 byte offsets per Float value
    f8_idx: np.ndarray[Any, Any]  # 8 byte offsets per Double value
    seq_slot: int  # varint slot of seq, -1: no seq
    ts_slot: int  # varint slot of the payload timestamp, -1: none
    metric_ts: np.ndarray[Any, Any]  # per metric: its varint slot, or -1 (the payload's, else arrival)
    f4_at: np.ndarray[Any, Any]  # metric positions of the Float values
    f8_at: np.ndarray[Any, Any]
    int_at: np.ndarray[Any, Any]  # metric positions of the varint values and their slots
    int_slot: np.ndarray[Any, Any]
    ints: _IntRules
    all_f4: bool  # every value a Float, in metric order
    all_ts: bool  # every metric has its own timestamp
    series: bytes = b""  # the caller's series id per metric (int64 bytes, appended as they are)
    misses: int = 0  # payloads of this size that did not match (the caller re-learns after a few)

    @classmethod
    def learn(cls, payload: bytes, types: list[tuple[int, int, bool]]) -> DataLayout | None:
        """The layout of ``payload`` (which protobuf decoded) or None if it has none the fast path reads.

        ``types``: per metric in payload order, as the caller decided from the births: ``(value field
        number, bits, signed)`` with bits 0 for a boolean; floats ignore bits.
        """
        size = len(payload)
        if not types:
            return None
        try:
            w = _Walk(payload, types)
        except (_NoLayout, IndexError):  # IndexError: a varint past the end (protobuf would have refused it)
            return None
        slots, metric_ts, f4_at, int_types = w.slots, w.metric_ts, w.f4_at, w.int_types
        pad = size  # index of the zero byte appended when extracting
        var_idx = np.full((max(len(slots), 1), _MAX_VARINT), pad, np.intp)
        var_bias = np.zeros(len(var_idx), np.int64)
        for i, offsets in enumerate(slots):
            var_idx[i, : len(offsets)] = offsets
            var_bias[i] = sum(1 << (7 * (j + 1)) for j in range(len(offsets) - 1))
        # The mask: all bits of fixed bytes; the continuation bit of each varint byte; nothing of a float.
        mask_bytes = bytearray(b"\xff" * size)
        for i in w.var_bytes:
            mask_bytes[i] = 0x80
        for i in w.free:
            mask_bytes[i] = 0
        mask = int.from_bytes(mask_bytes, "little")
        ints = _IntRules.of(int_types)
        return cls(
            size=size,
            expected=int.from_bytes(payload, "little") & mask,
            mask=mask,
            var_idx=var_idx,
            var_bias=var_bias,
            f4_idx=np.array(w.f4_idx, np.intp),
            f8_idx=np.array(w.f8_idx, np.intp),
            seq_slot=w.seq_slot,
            ts_slot=w.ts_slot,
            metric_ts=np.array(metric_ts, np.intp),
            f4_at=np.array(f4_at, np.intp),
            f8_at=np.array(w.f8_at, np.intp),
            int_at=np.array(w.int_at, np.intp),
            int_slot=np.array(w.int_slot, np.intp),
            ints=ints,
            all_f4=f4_at == list(range(len(types))),
            all_ts=all(t >= 0 for t in metric_ts),
        )

    def matches(self, payload: bytes) -> bool:
        return len(payload) == self.size and int.from_bytes(payload, "little") & self.mask == self.expected

    def extract(self, payload: bytes) -> tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """``(seq or -1, per-metric timestamp in ms or -1, per-metric value)`` or None if it does not match.

        Timestamps are milliseconds as sent (-1: the metric has none; the caller uses the payload's
        timestamp, then the arrival time).
        """
        if not self.matches(payload):
            self.misses += 1
            return None
        raw = np.frombuffer(payload + b"\0", np.uint8)
        # varints: bytes times 128^j, less the continuation bits the match guaranteed (int64 wraps back)
        ints = raw[self.var_idx] @ _WEIGHTS - self.var_bias
        if self.all_f4:  # the usual DATA: every value a Float
            values = raw[self.f4_idx].view("<f4").astype(np.float64)
        else:
            values = np.empty(len(self.metric_ts), np.float64)
            if len(self.f4_at):
                values[self.f4_at] = raw[self.f4_idx].view("<f4")
            if len(self.f8_at):
                values[self.f8_at] = raw[self.f8_idx].view("<f8")
            if len(self.int_at):
                values[self.int_at] = self.ints.apply(ints[self.int_slot].view(np.uint64))
        if self.all_ts:  # every metric has its timestamp
            ts_ms = ints[self.metric_ts]
        else:
            ts_ms = np.where(self.metric_ts >= 0, ints[self.metric_ts], -1)
            if self.ts_slot >= 0:
                ts_ms = np.where(self.metric_ts >= 0, ts_ms, int(ints[self.ts_slot]))
        seq = int(ints[self.seq_slot]) if self.seq_slot >= 0 else -1
        return seq, ts_ms, values


@dataclass(slots=True)
class _IntRules:
    """How varint values become floats, per slot, as the protobuf runtime and the decoder's rules do."""

    mask: np.ndarray[Any, Any]  # uint64: the field's width (uint32 for int_value) and the datatype's bits
    half: np.ndarray[Any, Any]  # float64: 2^(bits-1) for signed types narrower than 64 bits, else inf
    full: np.ndarray[Any, Any]  # float64: 2^bits (subtracted at or above ``half``)
    s64: np.ndarray[Any, Any]  # bool: signed 64-bit (the int64 view)
    boolean: np.ndarray[Any, Any]  # bool: Boolean (any non-zero is 1)

    @classmethod
    def of(cls, types: list[tuple[int, int, bool]]) -> _IntRules:
        """``types``: per varint value ``(field number, bits, signed)``, bits 0 for a Boolean."""
        mask, half, full, s64, boolean = [], [], [], [], []
        for number, bits, signed in types:
            width = 32 if number == 10 else 64  # int_value is a uint32: the runtime keeps its low 32 bits
            eff = width if bits == 0 else min(bits, width)
            mask.append((1 << eff) - 1)
            narrow_signed = signed and 0 < bits <= width and bits < 64
            half.append(float(1 << (bits - 1)) if narrow_signed else np.inf)
            full.append(float(1 << bits) if narrow_signed else 0.0)
            s64.append(signed and bits == 64 and width == 64)
            boolean.append(bits == 0)
        return cls(np.array(mask, np.uint64), np.array(half), np.array(full), np.array(s64, np.bool_),
                   np.array(boolean, np.bool_))

    def apply(self, raw: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        u = raw & self.mask
        v = u.astype(np.float64)
        v = np.where(v >= self.half, v - self.full, v)
        if self.s64.any():
            v = np.where(self.s64, u.view(np.int64).astype(np.float64), v)
        if self.boolean.any():
            v = np.where(self.boolean, (u != 0).astype(np.float64), v)
        return np.asarray(v, np.float64)


_WEIGHTS = np.array([1 << (7 * j) for j in range(_MAX_VARINT)], np.int64)
