"""What a WAL record holds: the batch's line protocol, and the decoded inputs compute needs to rebuild.

A record payload is ``b"\\x00FGB" | lp length u64 | line protocol | compute input``; a payload without
the prefix (written by an older gateway) is line protocol only (line protocol never starts with NUL).
The writer sends the line protocol; a restart re-runs compute over the inputs of the records after the
last checkpoint, without sending anything again.

The decoded inputs, not the line protocol, are kept: a rebuild copies arrays instead of parsing text,
and waveform blocks (whose windows the features need) survive whole. Cost: 24 bytes per scalar sample
and 8 per waveform sample next to ~60-100 bytes of line protocol per point; states and counts as JSON.

The compute input is ``header length u32 | JSON header | padding to 8 | arrays``: the header holds the
wall clock compute read, the series and machines registered since the previous record (so ids map back
without the checkpoint), states, counts, where they arrived (``sr``: samples before each state; ``sq``,
``cq``: messages before each state and count; ``br``: rows where a message starts at the timestamp of
the row before; absent in older records) and waveform block metadata; the
arrays are the scalar samples' series id, timestamp and value (in arrival order), then the waveform values.

>>> import numpy as np
>>> from gateway.batch import DecodedBatch, MachineKey, SeriesRegistry, StateEvent, TelemetryBatch
>>> from gateway.schema import MachineState
>>> reg = SeriesRegistry()
>>> m = MachineKey("s", "a", "l", "m1")
>>> sid = reg.series_id(m, "temp_c")
>>> tel = TelemetryBatch(np.array([sid]), np.array([5]), np.array([61.5]))
>>> batch = DecodedBatch(tel, states=[StateEvent(m, 5, MachineState.RUNNING)], detect_rows=1)
>>> payload = pack(b"telemetry temp_c=61.5 5", encode_input(batch, 99, reg, 0, 0))
>>> line_protocol(payload)
b'telemetry temp_c=61.5 5'
>>> again = SeriesRegistry()
>>> back, now = decode_input(compute_input(payload), again)
>>> now, back.telemetry.value.tolist(), back.states[0].state, again.metric(0)
(99, [61.5], <MachineState.RUNNING: 'RUNNING'>, 'temp_c')
"""

from __future__ import annotations

import struct

import numpy as np
import orjson

from gateway.batch import (
    CountEvent,
    DecodedBatch,
    MachineKey,
    SeriesRegistry,
    StateEvent,
    TelemetryBatch,
    WaveformBlock,
)
from gateway.errors import GatewayError
from gateway.schema import MachineState

__all__ = ["JournalError", "compute_input", "decode_input", "encode_input", "line_protocol", "pack"]

_MAGIC = b"\x00FGB"
_PREFIX = struct.Struct("<4sQ")
_HLEN = struct.Struct("<I")
_STATES = list(MachineState)


class JournalError(GatewayError):
    """A record's compute input cannot be used (corrupt, or its series numbering does not continue)."""


def pack(lp: bytes, compute: bytes) -> bytes:
    """One record payload: line protocol plus compute input."""
    return b"".join((_PREFIX.pack(_MAGIC, len(lp)), lp, compute))


def line_protocol(payload: bytes) -> bytes:
    """The line protocol of a record payload (all of an old-format payload)."""
    if payload[:4] != _MAGIC:
        return payload
    _, n = _PREFIX.unpack_from(payload)
    return payload[_PREFIX.size : _PREFIX.size + n]


def compute_input(payload: bytes) -> bytes | None:
    """The compute input of a record payload; None for an old-format payload."""
    if payload[:4] != _MAGIC:
        return None
    _, n = _PREFIX.unpack_from(payload)
    return payload[_PREFIX.size + n :]


def encode_input(batch: DecodedBatch, now_ns: int, registry: SeriesRegistry, machine_base: int,
                 series_base: int) -> bytes:
    """The inputs of one computed batch, with the registry entries from ``machine_base``/``series_base`` on."""
    n = batch.detect_rows
    tel = batch.telemetry
    mids = registry.machine_index  # a lookup: decode registered every machine it saw (the header lists them)
    header = {
        "now": now_ns,
        "mb": machine_base,
        "sb": series_base,
        "machines": [[k.site, k.area, k.line, k.machine] for k in registry.machine_list[machine_base:]],
        "series": [registry.series_machine_ids()[series_base:].tolist(), registry.metrics[series_base:]],
        "states": [[mids(e.machine), e.ts_ns, _STATES.index(e.state), e.reason] for e in batch.states],
        "counts": [[mids(e.machine), e.ts_ns, e.total, e.good] for e in batch.counts],
        # where the states and counts arrived (detect rows / messages before each)
        "sr": batch.state_rows,
        "sq": batch.state_seq,
        "cq": batch.count_seq,
        "br": batch.group_breaks,
        "n": n,
        "waves": [[w.series, w.t0_ns, w.dt_ns, int(w.values.shape[0])] for w in batch.waveforms],
    }
    head = orjson.dumps(header)
    pad = b"\0" * (-(_HLEN.size + len(head)) % 8)
    parts = [_HLEN.pack(len(head)), head, pad]
    if n:
        parts += [np.ascontiguousarray(tel.series[:n], np.int64).tobytes(),
                  np.ascontiguousarray(tel.ts_ns[:n], np.int64).tobytes(),
                  np.ascontiguousarray(tel.value[:n], np.float64).tobytes()]
    parts += [np.ascontiguousarray(w.values, np.float64).tobytes() for w in batch.waveforms]
    return b"".join(parts)


def decode_input(data: bytes, registry: SeriesRegistry) -> tuple[DecodedBatch, int]:
    """The batch and wall clock of a compute input; extends ``registry`` with the entries it carries.

    Raises :class:`JournalError` when it is corrupt or its numbering does not continue ``registry``.
    """
    try:
        (hlen,) = _HLEN.unpack_from(data)
        h = orjson.loads(data[_HLEN.size : _HLEN.size + hlen])
        off = _HLEN.size + hlen
        off += -off % 8
        _extend(registry, int(h["mb"]), [MachineKey(*k) for k in h["machines"]], int(h["sb"]),
                list(zip(h["series"][0], h["series"][1], strict=True)))
        machines = registry.machine_list
        n = int(h["n"])
        arrays = np.frombuffer(data, np.uint8, offset=off)
        need = 24 * n + 8 * sum(int(w[3]) for w in h["waves"])
        if arrays.shape[0] != need:
            raise JournalError(f"compute input holds {arrays.shape[0]} array bytes, its header says {need}")
        raw = arrays.copy()  # aligned, and owned by the batch
        series = raw[: 8 * n].view(np.int64)
        ts = raw[8 * n : 16 * n].view(np.int64)
        value = raw[16 * n : 24 * n].view(np.float64)
        at = 24 * n
        waves = []
        for sid, t0, dt, k in h["waves"]:
            waves.append(WaveformBlock(int(sid), int(t0), int(dt), raw[at : at + 8 * k].view(np.float64)))
            at += 8 * k
        batch = DecodedBatch(
            TelemetryBatch(series, ts, value),
            waveforms=waves,
            states=[StateEvent(machines[m], int(t), _STATES[c], r) for m, t, c, r in h["states"]],
            counts=[CountEvent(machines[m], int(t), int(a), int(b)) for m, t, a, b in h["counts"]],
            detect_rows=n,
            # absent in a record of an older gateway: states before every sample, OEE merges by time
            state_rows=[int(r) for r in h.get("sr", ())],
            state_seq=[int(q) for q in h.get("sq", ())],
            count_seq=[int(q) for q in h.get("cq", ())],
            group_breaks=[int(r) for r in h.get("br", ())],
        )
        if len(batch.state_rows) not in (0, len(batch.states)) or len(batch.state_seq) not in (0, len(batch.states)) \
                or len(batch.count_seq) not in (0, len(batch.counts)):
            raise JournalError("compute input: arrival positions do not match its states and counts")
        return batch, int(h["now"])
    except JournalError:
        raise
    except (struct.error, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise JournalError(f"corrupt compute input ({type(exc).__name__}: {exc})") from exc


def _extend(registry: SeriesRegistry, mb: int, machines: list[MachineKey], sb: int,
            series: list[tuple[int, str]]) -> None:
    """Add the carried entries; those the registry has already must be the same ones."""
    have_m, have_s = registry.machine_count(), len(registry)
    if mb > have_m or sb > have_s:
        raise JournalError(f"series numbering does not continue: record starts at machine {mb} / series {sb}, "
                           f"the registry holds {have_m} / {have_s}")
    known = registry.machine_list
    for i, key in enumerate(machines[: have_m - mb]):
        if known[mb + i] != key:
            raise JournalError(f"machine {mb + i} is {known[mb + i]} in the registry but {key} in the record")
    for i, (mid, metric) in enumerate(series[: have_s - sb]):
        sid = sb + i
        if registry.metrics[sid] != metric or registry.machines[sid] != known[mid]:
            raise JournalError(f"series {sid} differs between the registry and the record")
    registry.add(machines[have_m - mb :], series[have_s - sb :])
