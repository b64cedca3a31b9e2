"""InfluxDB line-protocol escaping rules, defined once for the decoder (device lines) and the encoder.

>>> print(escape_tag("plant 1,north"), machine_tags(MachineKey("s", "a b", "l", "m=1")))
plant\\ 1\\,north area=a\\ b,line=l,machine=m\\=1,site=s
"""

from __future__ import annotations

from gateway.batch import MachineKey

__all__ = [
    "escape_field_key",
    "escape_measurement",
    "escape_string_value",
    "escape_tag",
    "machine_tag_pairs",
    "machine_tags",
]

_MEAS = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\r": r"\r", "\t": r"\t"})
_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\r": r"\r", "\t": r"\t"})
_STR = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def escape_measurement(name: str) -> str:
    """Escape a measurement name (commas and spaces)."""
    return name.translate(_MEAS)


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs and spaces)."""
    return text.translate(_TAG)


escape_field_key = escape_tag


def escape_string_value(text: str) -> str:
    """Quote a string field value (backslashes and double quotes escaped)."""
    return '"' + text.translate(_STR) + '"'


def machine_tag_pairs(machine: MachineKey) -> tuple[tuple[str, str], ...]:
    """The topic tags of a machine as (key, escaped value), sorted by key as InfluxDB prefers."""
    return (
        ("area", escape_tag(machine.area)),
        ("line", escape_tag(machine.line)),
        ("machine", escape_tag(machine.machine)),
        ("site", escape_tag(machine.site)),
    )


def machine_tags(machine: MachineKey) -> str:
    """``area=..,line=..,machine=..,site=..``."""
    return ",".join(f"{k}={v}" for k, v in machine_tag_pairs(machine))
