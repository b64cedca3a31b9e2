"""A small, independent InfluxDB line-protocol parser, used only by the tests to check the encoder.

Written from the line-protocol reference, not from :mod:`gateway.encode`:

- ``measurement[,tag_key=tag_value...] field_key=field_value[,...] [timestamp]``, one point per line
  (lines are split on ``\\n`` only; empty lines and ``#`` comments are skipped).
- Measurement: ``,`` and space are escaped with a backslash.
- Tag keys, tag values and field keys: ``,`` ``=`` and space are escaped with a backslash.
- A doubled backslash stands for one backslash; a backslash before any other character is literal.
- String field values are double-quoted; inside them ``\\"`` is a quote and ``\\\\`` a backslash.
- Other field values: ``1.5`` / ``1e3`` (float), ``3i`` (int), ``3u`` (uint), ``t``/``true``/``F``... (bool).

>>> parse_line('cpu,host=a\\\\ b usage=1.5,n=3i,ok=t,s="x \\\\"y\\\\"" 1000')
LinePoint(measurement='cpu', tags={'host': 'a b'}, fields={'usage': 1.5, 'n': 3, 'ok': True, 's': 'x "y"'}, \
timestamp=1000)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["LinePoint", "LineProtocolError", "parse_body", "parse_line"]

_MEAS_SPECIAL = frozenset(", \\")
_KEY_SPECIAL = frozenset(",= \\")
_TRUE = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE = frozenset({"f", "F", "false", "False", "FALSE"})
_FLOAT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_INT = re.compile(r"^[+-]?\d+i$")
_UINT = re.compile(r"^\d+u$")
_TS = re.compile(r"^-?\d+$")


class LineProtocolError(ValueError):
    """The text is not valid line protocol."""


@dataclass(slots=True)
class LinePoint:
    measurement: str
    tags: dict[str, str] = field(default_factory=dict)
    fields: dict[str, float | int | bool | str] = field(default_factory=dict)
    timestamp: int | None = None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, special: frozenset[str], stops: str) -> str:
        """Read an escaped token up to (not including) an unescaped character of ``stops``."""
        out: list[str] = []
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "\\" and self.pos + 1 < len(text) and text[self.pos + 1] in special:
                out.append(text[self.pos + 1])
                self.pos += 2
                continue
            if ch in stops:
                break
            out.append(ch)
            self.pos += 1
        return "".join(out)

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise LineProtocolError(f"expected {ch!r} at column {self.pos}, found {self.peek()!r} in {self.text!r}")
        self.pos += 1


def _string_value(sc: _Scanner) -> str:
    sc.expect('"')
    out: list[str] = []
    text = sc.text
    while True:
        if sc.pos >= len(text):
            raise LineProtocolError(f"unterminated string in {text!r}")
        ch = text[sc.pos]
        if ch == "\\" and sc.pos + 1 < len(text) and text[sc.pos + 1] in '"\\':
            out.append(text[sc.pos + 1])
            sc.pos += 2
            continue
        sc.pos += 1
        if ch == '"':
            return "".join(out)
        out.append(ch)


def _scalar_value(raw: str, line: str) -> float | int | bool:
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if _INT.match(raw):
        value = int(raw[:-1])
        if not -(2**63) <= value < 2**63:
            raise LineProtocolError(f"integer {raw!r} out of int64 range in {line!r}")
        return value
    if _UINT.match(raw):
        return int(raw[:-1])
    if _FLOAT.match(raw):
        f = float(raw)
        if not math.isfinite(f):
            raise LineProtocolError(f"float {raw!r} out of range in {line!r}")
        return f
    raise LineProtocolError(f"bad field value {raw!r} in {line!r}")


def parse_line(line: str) -> LinePoint:
    """Parse one line of line protocol (no newline inside)."""
    if "\n" in line:
        raise LineProtocolError(f"newline inside a line: {line!r}")
    sc = _Scanner(line)
    measurement = sc.token(_MEAS_SPECIAL, ", ")
    if not measurement:
        raise LineProtocolError(f"empty measurement in {line!r}")
    point = LinePoint(measurement)
    while sc.peek() == ",":
        sc.pos += 1
        key = sc.token(_KEY_SPECIAL, ",= ")
        sc.expect("=")
        value = sc.token(_KEY_SPECIAL, ",= ")
        if not key or not value:
            raise LineProtocolError(f"empty tag key or value in {line!r}")
        if key in point.tags:
            raise LineProtocolError(f"duplicate tag {key!r} in {line!r}")
        point.tags[key] = value
    sc.expect(" ")
    while True:
        key = sc.token(_KEY_SPECIAL, ",= ")
        if not key:
            raise LineProtocolError(f"empty field key in {line!r}")
        sc.expect("=")
        if sc.peek() == '"':
            value: float | int | bool | str = _string_value(sc)
        else:
            value = _scalar_value(sc.token(frozenset(), ", "), line)
        if key in point.fields:
            raise LineProtocolError(f"duplicate field {key!r} in {line!r}")
        point.fields[key] = value
        if sc.peek() != ",":
            break
        sc.pos += 1
    if sc.peek() == " ":
        sc.pos += 1
        rest = line[sc.pos :]
        if not _TS.match(rest):
            raise LineProtocolError(f"bad timestamp {rest!r} in {line!r}")
        point.timestamp = int(rest)
    elif sc.pos != len(line):
        raise LineProtocolError(f"trailing text {line[sc.pos :]!r} in {line!r}")
    return point


def parse_body(body: bytes | str) -> list[LinePoint]:
    """Parse a write body: one point per non-empty, non-comment line."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    return [parse_line(line) for line in text.split("\n") if line and not line.startswith("#")]
