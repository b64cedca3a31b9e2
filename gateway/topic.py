"""Topic parsing: ``factory/<site>/<area>/<line>/<machine>/<channel>`` → tags and channel.

Topic segments become InfluxDB tag values. ``,`` ``=`` and spaces are escaped by the encoder; a
backslash, a control character or an empty segment is refused here, so no topic can inject a second
point or tag.

>>> t = TopicParser("factory/{site}/{area}/{line}/{machine}/{channel}")
>>> t.parse("factory/plant1/assembly/line1/press1/telemetry")
(MachineKey(site='plant1', area='assembly', line='line1', machine='press1'), 'telemetry')
"""

from __future__ import annotations

import re

from gateway.batch import MachineKey
from gateway.errors import DecodeError
from gateway.schema import CHANNELS

__all__ = ["TopicParser", "topic_matches"]

_BAD_SEGMENT = re.compile(r"[\x00-\x1f\x7f\\]")


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest).

    >>> topic_matches("factory/+/#", "factory/a/b/c"), topic_matches("factory/+", "factory/a/b")
    (True, False)
    """
    fparts = filter_.split("/")
    tparts = topic.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            return True
        if i >= len(tparts) or (f != "+" and f != tparts[i]):
            return False
    return len(fparts) == len(tparts)


class TopicParser:
    """Splits topics by a template; results are cached because devices reuse their topics."""

    def __init__(self, template: str, cache_size: int = 200_000) -> None:
        self._parts = template.split("/")
        self._slots: dict[str, int] = {}
        self._literals: list[tuple[int, str]] = []
        for i, part in enumerate(self._parts):
            if part.startswith("{") and part.endswith("}"):
                self._slots[part[1:-1]] = i
            else:
                self._literals.append((i, part))
        self._cache: dict[str, tuple[MachineKey, str]] = {}
        self._cache_size = cache_size
        # one MachineKey per machine, whichever of its topics (telemetry, state, count...) came first
        self._machines: dict[MachineKey, MachineKey] = {}

    def parse(self, topic: str) -> tuple[MachineKey, str]:
        """Return ``(machine, channel)``; raise DecodeError naming the bad segment."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        result = self.parse_uncached(topic)
        if len(self._cache) < self._cache_size:
            self._cache[topic] = result
        return result

    def parse_uncached(self, topic: str) -> tuple[MachineKey, str]:
        """:meth:`parse` without the topic cache, for a caller that caches what it makes of a topic itself
        (the decoder's routes: a second cache of every topic cost ~100 bytes per topic). The machine is
        still the one :class:`MachineKey` of its machine."""
        parts = topic.split("/")
        if len(parts) != len(self._parts):
            raise DecodeError(
                f"topic {topic!r} has {len(parts)} levels, template {'/'.join(self._parts)!r} has "
                f"{len(self._parts)}",
                reason="topic",
            )
        for i, lit in self._literals:
            if parts[i] != lit:
                raise DecodeError(f"topic {topic!r}: level {i + 1} is {parts[i]!r}, expected {lit!r}", reason="topic")
        values: dict[str, str] = {}
        for name, i in self._slots.items():
            seg = parts[i]
            if not seg:
                raise DecodeError(f"topic {topic!r}: {name} is empty", reason="topic")
            if _BAD_SEGMENT.search(seg):
                raise DecodeError(f"topic {topic!r}: {name} {seg!r} holds a backslash or control character",
                                  reason="topic")
            values[name] = seg
        channel = values["channel"]
        if channel not in CHANNELS:
            raise DecodeError(f"topic {topic!r}: unknown channel {channel!r}; expected one of {list(CHANNELS)}",
                              reason="topic")
        key = MachineKey(values["site"], values["area"], values["line"], values["machine"])
        return (self._machines.setdefault(key, key) if len(self._machines) < self._cache_size else key, channel)
