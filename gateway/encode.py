"""Encode stage: columnar batches and computed results → InfluxDB line protocol.

Built directly rather than through influxdb-client's ``Point`` (several times slower per point), with
the line-protocol escaping rules applied to every measurement, tag key, tag value, field key and
string field value.

>>> from gateway.batch import MachineKey, SeriesRegistry, TelemetryBatch
>>> import numpy as np
>>> reg = SeriesRegistry()
>>> sid = reg.series_id(MachineKey("plant 1", "a", "l", "m=1"), "temp,c")
>>> enc = LineProtocolEncoder(reg)
>>> print(enc.telemetry(TelemetryBatch(np.array([sid]), np.array([1000]), np.array([61.5]))).decode())
telemetry,area=a,line=l,machine=m\\=1,site=plant\\ 1 temp\\,c=61.5 1000
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gateway.batch import F64, I64, CountEvent, MachineKey, SeriesRegistry, StateEvent, StatusEvent, TelemetryBatch
from gateway.lineproto import (
    escape_field_key,
    escape_measurement,
    escape_string_value,
    escape_tag,
    machine_tags,
)

__all__ = [
    "LineProtocolEncoder",
    "escape_field_key",
    "escape_measurement",
    "escape_string_value",
    "escape_tag",
    "format_fields",
]

if TYPE_CHECKING:  # types of the compute stage's outputs; no runtime import between stages
    from gateway.features import FeatureRows
    from gateway.oee import OeeRecord


class AnomalyEvents(Protocol):
    """What the encoder needs of the compute stage's flagged events (parallel arrays)."""

    series: I64
    ts_ns: I64
    code: I64
    score: F64
    value: F64
    expected: F64
    zscore: F64
    names: tuple[str, ...]

    def __len__(self) -> int: ...


FieldValue = float | int | str | bool | None
_TAGS_AT = len("telemetry,")


def format_fields(fields: Mapping[str, FieldValue]) -> str:
    """``k=v,k=v`` with floats as shortest round-trip text, ints with ``i``; None and NaN are skipped.

    >>> format_fields({"a": 1.0, "n": 3, "s": 'say "hi"', "skip": None, "ok": True})
    'a=1.0,n=3i,s="say \\\\"hi\\\\"",ok=true'
    """
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool | np.bool_):
            text = "true" if value else "false"
        elif isinstance(value, numbers.Integral):
            text = f"{int(value)}i"
        elif isinstance(value, float | np.floating):
            if not math.isfinite(value):
                continue
            text = repr(float(value))
        else:
            text = escape_string_value(str(value))
        parts.append(f"{escape_field_key(key)}={text}")
    return ",".join(parts)


class LineProtocolEncoder:
    """Encodes every measurement the gateway writes; per-series line heads and field keys are built once
    and cached (shared strings: one head per machine, one key per metric name)."""

    def __init__(self, registry: SeriesRegistry) -> None:
        self.registry = registry
        self._heads: list[str] = []  # per series: "telemetry,<tags> "
        self._keys: list[str] = []  # per series: "<field key>="
        self._templates: dict[bytes, str] = {}  # series ids of a line (int64 bytes) -> its %-template
        self._f32_epoch = 0  # the registry's float32 declarations the templates were made with
        self._head_of: dict[MachineKey, str] = {}  # per machine: "telemetry,<tags> " (its tags are inside)
        self._key_of: dict[str, str] = {}

    def _head(self, machine: MachineKey) -> str:
        head = self._head_of.get(machine)
        if head is None:
            head = self._head_of[machine] = f"telemetry,{machine_tags(machine)} "
        return head

    def tags(self, machine: MachineKey) -> str:
        """The machine's escaped tags, ``area=..,line=..,machine=..,site=..`` (cut from its line head: one
        string per machine, not two)."""
        return self._head(machine)[_TAGS_AT:-1]

    def _series_parts(self) -> tuple[list[str], list[str]]:
        """Per series id: its line head and its field key (no string per series: 10 MB at 80,000 series)."""
        reg = self.registry
        known = len(self._heads)
        if known == len(reg):
            return self._heads, self._keys
        keys = self._key_of  # one string per machine and per metric name, shared
        for sid in range(known, len(reg)):
            machine, metric = reg.machines[sid], reg.metrics[sid]
            head = self._head(machine)
            key = keys.get(metric)
            if key is None:
                key = keys[metric] = f"{escape_field_key(metric)}="
            self._heads.append(head)
            self._keys.append(key)
        return self._heads, self._keys

    def telemetry(self, batch: TelemetryBatch) -> bytes:
        """``telemetry,<tags> <metric>=<float>[,<metric>=<float>...] <ts_ns>``.

        Consecutive samples of one machine with the same timestamp (a Sparkplug DATA message, a JSON
        sample with several values) share a line, as long as their series ids increase (so no field
        repeats in a line); the database stores exactly what one line per sample would, at a fraction
        of the bytes and of its parsing work.

        >>> from gateway.batch import MachineKey, SeriesRegistry
        >>> reg = SeriesRegistry()
        >>> m = MachineKey("s", "a", "l", "m")
        >>> a, b = reg.series_id(m, "a"), reg.series_id(m, "b")
        >>> enc = LineProtocolEncoder(reg)
        >>> tb = TelemetryBatch(np.array([a, b, a, a]), np.array([5, 5, 6, 6]), np.array([1.0, 2.0, 3.0, 4.0]))
        >>> print(enc.telemetry(tb).decode())
        telemetry,area=a,line=l,machine=m,site=s a=1.0,b=2.0 5
        telemetry,area=a,line=l,machine=m,site=s a=3.0 6
        telemetry,area=a,line=l,machine=m,site=s a=4.0 6
        """
        n = len(batch)
        if n == 0:
            return b""
        heads, keys = self._series_parts()
        finite = np.isfinite(batch.value)
        if not finite.all():  # the decoder refuses NaN/Inf; computed features may still produce them
            batch = TelemetryBatch(batch.series[finite], batch.ts_ns[finite], batch.value[finite])
            n = len(batch)
        series, ts = batch.series, batch.ts_ns
        # float32 at the source (a Sparkplug Float): "%.9g" (FLT_DECIMAL_DIG) identifies the float32 exactly,
        # in half the digits of the float64's repr and a third of the time; only for values that are one
        f32 = None  # per row: its line may be written float32 (every float32 series' value in it is one)
        as32 = None  # per row: this value is written float32
        reg = self.registry
        if reg.float32_epoch != self._f32_epoch:
            self._templates.clear()
            self._f32_epoch = reg.float32_epoch
        if reg.float32_epoch:
            flagged = reg.float32_mask()[series]
            if flagged.any():
                v = batch.value
                exact = v.astype(np.float32).astype(np.float64) == v
                as32 = flagged & exact
                if as32.any():
                    f32 = as32 | ~flagged
                else:
                    as32 = None
        starts = None
        if n > 1:
            mach = self.registry.series_machine_ids()[series]
            new_line = np.empty(n, np.bool_)
            new_line[0] = True
            np.not_equal(mach[1:], mach[:-1], out=new_line[1:])
            new_line[1:] |= ts[1:] != ts[:-1]
            new_line[1:] |= series[1:] <= series[:-1]
            starts = np.flatnonzero(new_line)
        if starts is None or len(starts) == n:  # every sample on its own line
            if as32 is not None:
                flag = as32.tolist()
                lines = [
                    f"{heads[s]}{keys[s]}{f'{v:.9g}' if f else repr(v)} {t}"
                    for s, v, t, f in zip(series.tolist(), batch.value.tolist(), ts.tolist(), flag, strict=True)
                ]
                return "\n".join(lines).encode()
            lines = [
                f"{heads[s]}{keys[s]}{v!r} {t}"
                for s, v, t in zip(series.tolist(), batch.value.tolist(), ts.tolist(), strict=True)
            ]
            return "\n".join(lines).encode()
        # short lines (a JSON sample of a few metrics): one format for the batch saves the per-line work;
        # long ones (a 20-metric Sparkplug DATA) amortise it, and a template per line is faster there
        fast = self._telemetry_templated(series, ts, batch.value, starts) \
            if n < 8 * len(starts) and f32 is None else None
        if fast is not None:
            return fast
        # A machine sends the same metrics line after line: one %-template per run of series ids formats
        # a whole line in C ("%r" is the float's repr, as above).
        values = batch.value.tolist()
        bounds = [*starts.tolist(), n]
        template = self._template
        if f32 is not None:
            use = np.logical_and.reduceat(f32, starts).tolist()
            lines = [template(series[a:b], f) % (*values[a:b], t)
                     for a, b, t, f in zip(bounds, bounds[1:], ts[starts].tolist(), use, strict=False)]
            return "\n".join(lines).encode()
        lines = [template(series[a:b]) % (*values[a:b], t)
                 for a, b, t in zip(bounds, bounds[1:], ts[starts].tolist(), strict=False)]
        return "\n".join(lines).encode()

    def _telemetry_templated(self, series: I64, ts: I64, values: F64, starts: I64) -> bytes | None:
        """The whole batch as one %-format: lines keyed by (first series, length), each key's template
        checked to fit every line it is used for (else None: the per-line path). No Python per value."""
        n = int(series.shape[0])
        lines = int(starts.shape[0])
        bounds = np.append(starts, n)
        lens = np.diff(bounds)
        if int(lens.max()) >= 4096:
            return None
        key = series[starts] * 4096 + lens
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        line_of = np.repeat(np.arange(lines), lens)
        pos = np.arange(n) - starts[line_of]
        ref = starts[first[inverse]]  # start of the first line with the same key
        if not np.array_equal(series, series[ref[line_of] + pos]):
            return None  # two lines with one key and different series (rare): per line
        fmts = [self._template(series[a:b])
                for a, b in zip(starts[first].tolist(), bounds[first + 1].tolist(), strict=True)]
        args = np.empty(n + lines, dtype=object)  # each line's values, then its timestamp
        args[np.arange(n) + line_of] = values
        args[bounds[1:] + np.arange(lines)] = ts[starts]
        body = "\n".join([fmts[j] for j in inverse.tolist()]) % tuple(args)
        return body.encode()

    def _template(self, sids: I64, f32: bool = False) -> str:
        """The %-template of a line holding these series (cached by their ids: a machine repeats them);
        ``f32``: the float32 series' values as ``%.9g``."""
        key = sids.tobytes() + (b"f" if f32 else b"")
        fmt = self._templates.get(key)
        if fmt is None:
            if len(self._templates) >= 10_000:
                self._templates.clear()
            ids = sids.tolist()
            is32 = self.registry.float32_mask() if f32 else None
            fields = ",".join(self._keys[s].replace("%", "%%") + ("%.9g" if is32 is not None and is32[s] else "%r")
                              for s in ids)
            fmt = self._templates[key] = f"{self._heads[ids[0]].replace('%', '%%')}{fields} %d"
        return fmt

    def states(self, events: Sequence[StateEvent]) -> bytes:
        return "\n".join(
            f"machine_state,{self.tags(e.machine)} {format_fields({'state': e.state.value, 'reason': e.reason})}"
            f" {e.ts_ns}"
            for e in events
        ).encode()

    def counts(self, events: Sequence[CountEvent]) -> bytes:
        return "\n".join(
            f"production,{self.tags(e.machine)} total={e.total}i,good={e.good}i {e.ts_ns}" for e in events
        ).encode()

    def device_status(self, events: Sequence[StatusEvent]) -> bytes:
        """``device_status,<tags> online=true|false[,bdseq=..i] <ts>``: births and deaths of devices."""
        return "\n".join(
            f"device_status,{self.tags(e.machine)} {format_fields({'online': e.online, 'bdseq': e.bdseq})} {e.ts_ns}"
            for e in events
        ).encode()

    def anomalies(self, events: AnomalyEvents) -> bytes:
        """``anomaly,<tags>,metric=..,detector=.. score=..,value=..,expected=..,zscore=.. <ts>``."""
        if len(events) == 0:
            return b""
        reg = self.registry
        names = [escape_tag(n) for n in events.names]
        keys: dict[tuple[int, int], str] = {}
        lines = []
        for sid, code, ts, score, value, expected, z in zip(
            events.series.tolist(), events.code.tolist(), events.ts_ns.tolist(), events.score.tolist(),
            events.value.tolist(), events.expected.tolist(), events.zscore.tolist(), strict=True,
        ):
            key = keys.get((sid, code))
            if key is None:
                key = (f"anomaly,{self.tags(reg.machines[sid])},metric={escape_tag(reg.metrics[sid])},"
                       f"detector={names[code]} ")
                keys[(sid, code)] = key
            fields = format_fields({"score": score, "value": value, "expected": expected, "zscore": z})
            lines.append(f"{key}{fields} {ts}")
        return "\n".join(lines).encode()

    def oee(self, records: Sequence[OeeRecord]) -> bytes:
        """``oee,<tags>,window=..[,shift=..] availability=..,... <window start>``; unknown ratios omitted."""
        lines = []
        for r in records:
            shift = f",shift={escape_tag(r.shift)}" if r.shift else ""
            fields = format_fields({
                "availability": r.availability, "performance": r.performance, "quality": r.quality,
                "oee": r.oee, "planned_s": r.planned_s, "run_s": r.run_s, "down_s": r.down_s,
                "total_count": r.total_count, "good_count": r.good_count, "mtbf_s": r.mtbf_s,
                "mttr_s": r.mttr_s, "throughput_per_h": r.throughput_per_h,
            })
            lines.append(f"oee,{self.tags(r.machine)},window={escape_tag(r.window)}{shift} {fields} {r.start_ns}")
        return "\n".join(lines).encode()

    def features(self, rows: FeatureRows) -> bytes:
        """``vibration_features,<tags>,metric=.. rms=..,peak=..,crest_factor=..,kurtosis=..[,zone=".."]``."""
        lines = []
        for i in range(len(rows)):
            fields = format_fields({
                "rms": float(rows.rms[i]), "peak": float(rows.peak[i]), "crest_factor": float(rows.crest[i]),
                "kurtosis": float(rows.kurtosis[i]), "zone": str(rows.zone[i]) or None,
            })
            lines.append(
                f"vibration_features,{self.tags(rows.machine[i])},metric={escape_tag(rows.metric[i])} "
                f"{fields} {int(rows.ts_ns[i])}"
            )
        return "\n".join(lines).encode()

    def point(self, measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue], ts_ns: int) -> str:
        """A single generic line (tags sorted by key); empty if no field survives."""
        body = format_fields(fields)
        if not body:
            return ""
        tag_text = "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")
        return f"{escape_measurement(measurement)}{tag_text} {body} {ts_ns}"

    @staticmethod
    def join(chunks: Iterable[bytes]) -> bytes:
        """Join encoded chunks into one write body, skipping empty ones."""
        return b"\n".join(c for c in chunks if c)
