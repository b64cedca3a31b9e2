"""TopicParser (default and custom templates, refusals, cache) and MQTT filter matching."""

from __future__ import annotations

import pytest

from gateway.batch import MachineKey
from gateway.errors import DecodeError
from gateway.topic import TopicParser, topic_matches

DEFAULT = "factory/{site}/{area}/{line}/{machine}/{channel}"
CUSTOM = "plant/{site}/x/{area}/{line}/{machine}/{channel}"


class TestDefaultTemplate:
    @pytest.mark.parametrize("channel", ["telemetry", "state", "count"])
    def test_parse(self, channel: str) -> None:
        machine, ch = TopicParser(DEFAULT).parse(f"factory/plant1/assembly/line1/press1/{channel}")
        assert machine == MachineKey("plant1", "assembly", "line1", "press1")
        assert ch == channel

    def test_specials_allowed_in_segments(self) -> None:
        machine, _ = TopicParser(DEFAULT).parse('factory/plant 1/a,b/l=1/m"#+/count')
        assert machine == MachineKey("plant 1", "a,b", "l=1", 'm"#+')

    @pytest.mark.parametrize(
        ("topic", "message"),
        [
            ("factory/plant1/assembly/line1/telemetry", "has 5 levels, template"),
            ("factory/plant1/assembly/line1/press1/telemetry/extra", "has 7 levels"),
            ("", "has 1 levels"),
            ("plant/plant1/assembly/line1/press1/telemetry", "level 1 is 'plant', expected 'factory'"),
            ("factory/plant1/assembly/line1/press1/alarm", "unknown channel 'alarm'"),
            ("factory/plant1/assembly/line1/press1/Telemetry", "unknown channel 'Telemetry'"),
            ("factory//assembly/line1/press1/telemetry", "site is empty"),
            ("factory/plant1/assembly/line1/press1/", "channel is empty"),
            ("factory/plant1/assembly/li\\ne1/press1/telemetry", "line 'li\\\\ne1' holds a backslash"),
            ("factory/plant1/assembly/line1/press1\x00/telemetry", "machine"),
            ("factory/plant1/as\x7fsembly/line1/press1/telemetry", "area"),
            ("factory/plant1/assembly/line1/press1\r/telemetry", "control character"),
        ],
    )
    def test_refused(self, topic: str, message: str) -> None:
        with pytest.raises(DecodeError) as info:
            TopicParser(DEFAULT).parse(topic)
        assert message in str(info.value)

    @pytest.mark.parametrize("ch", [chr(c) for c in [*range(0x20), 0x7F]] + ["\\"])
    def test_every_control_char_and_backslash_refused(self, ch: str) -> None:
        with pytest.raises(DecodeError, match="backslash or control character"):
            TopicParser(DEFAULT).parse(f"factory/s{ch}/a/l/m/telemetry")


class TestCustomTemplate:
    def test_parse(self) -> None:
        parser = TopicParser(CUSTOM)
        assert parser.parse("plant/s1/x/a1/l1/m1/state") == (MachineKey("s1", "a1", "l1", "m1"), "state")

    def test_second_literal_mismatch(self) -> None:
        with pytest.raises(DecodeError, match=r"level 3 is 'y', expected 'x'"):
            TopicParser(CUSTOM).parse("plant/s1/y/a1/l1/m1/state")

    def test_level_count_names_template(self) -> None:
        with pytest.raises(DecodeError, match=r"has 6 levels, template 'plant/\{site\}/x/.*' has 7"):
            TopicParser(CUSTOM).parse("plant/s1/x/a1/l1/m1")

    def test_reordered_placeholders(self) -> None:
        parser = TopicParser("{channel}/{machine}/{line}/{area}/{site}")
        assert parser.parse("count/m/l/a/s") == (MachineKey("s", "a", "l", "m"), "count")


class TestCache:
    def test_repeated_topic_returns_cached_result(self) -> None:
        parser = TopicParser(DEFAULT)
        first = parser.parse("factory/s/a/l/m/telemetry")
        assert parser.parse("factory/s/a/l/m/telemetry") is first

    def test_cache_size_bounds_cache(self) -> None:
        parser = TopicParser(DEFAULT, cache_size=1)
        a1 = parser.parse("factory/s/a/l/m1/telemetry")
        b1 = parser.parse("factory/s/a/l/m2/telemetry")
        assert parser.parse("factory/s/a/l/m1/telemetry") is a1
        b2 = parser.parse("factory/s/a/l/m2/telemetry")
        assert b2 == b1
        assert b2 is not b1  # the cache was full: parsed again, still correct

    def test_errors_are_not_cached(self) -> None:
        parser = TopicParser(DEFAULT)
        for _ in range(2):
            with pytest.raises(DecodeError):
                parser.parse("factory/s/a/l/m/nope")

    def test_zero_cache(self) -> None:
        parser = TopicParser(DEFAULT, cache_size=0)
        assert parser.parse("factory/s/a/l/m/count") == parser.parse("factory/s/a/l/m/count")


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        ("factory/+/+/+/+/+", "factory/s/a/l/m/telemetry", True),
        ("factory/+/+/+/+/+", "factory/s/a/l/m", False),
        ("factory/+/+/+/+/+", "factory/s/a/l/m/telemetry/x", False),
        ("factory/#", "factory/s/a/l/m/telemetry", True),
        ("factory/#", "factory", True),  # '#' also matches the parent level
        ("#", "anything/at/all", True),
        ("factory/+", "factory/a/b", False),
        ("factory/+", "factory/", True),  # '+' matches an empty level
        ("factory/+/#", "factory/a/b/c", True),
        ("factory/+/a/#", "factory/x/b/c", False),
        ("+/+", "/x", True),
        ("factory/s1/#", "factory/s2/a", False),
        ("factory/s", "factory/s", True),
        ("factory/s", "factory/S", False),
        ("factory/+/count", "factory/m/count", True),
        ("factory/+/count", "factory/m/state", False),
    ],
)
def test_topic_matches(filter_: str, topic: str, expected: bool) -> None:
    assert topic_matches(filter_, topic) is expected
