"""LineProtocolEncoder and the escaping helpers: exact strings, checked again with the test parser."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gateway.batch import CountEvent, MachineKey, SeriesRegistry, StateEvent, TelemetryBatch
from gateway.encode import (
    LineProtocolEncoder,
    escape_field_key,
    escape_measurement,
    escape_string_value,
    escape_tag,
    format_fields,
)
from gateway.schema import MachineState
from tests.lp_parser import parse_body, parse_line

M1 = MachineKey("plant1", "assembly", "line1", "press1")
TAGS1 = "area=assembly,line=line1,machine=press1,site=plant1"


def _batch(series: list[int], ts: list[int], values: list[float]) -> TelemetryBatch:
    return TelemetryBatch(
        np.asarray(series, dtype=np.int64), np.asarray(ts, dtype=np.int64), np.asarray(values, dtype=np.float64)
    )


class TestEscaping:
    @pytest.mark.parametrize(
        ("raw", "escaped"),
        [
            ("cpu", "cpu"),
            ("my meas", r"my\ meas"),
            ("a,b", r"a\,b"),
            ("a=b", "a=b"),  # '=' needs no escape in a measurement
            ('q"uote', 'q"uote'),
        ],
    )
    def test_measurement(self, raw: str, escaped: str) -> None:
        assert escape_measurement(raw) == escaped

    @pytest.mark.parametrize(
        ("raw", "escaped"),
        [
            ("plain", "plain"),
            ("a b", r"a\ b"),
            ("a,b", r"a\,b"),
            ("a=b", r"a\=b"),
            (" ,=", r"\ \,\="),
            ('q"uote', 'q"uote'),  # quotes are only special in string field values
            ("Überlänge #1", r"Überlänge\ #1"),
        ],
    )
    def test_tag_and_field_key(self, raw: str, escaped: str) -> None:
        assert escape_tag(raw) == escaped
        assert escape_field_key(raw) == escaped

    @pytest.mark.parametrize(
        ("raw", "quoted"),
        [
            ("ok", '"ok"'),
            ('say "hi"', r'"say \"hi\""'),
            ("C:\\path", r'"C:\\path"'),
            ('\\"', r'"\\\""'),
            ("a, b=c", '"a, b=c"'),  # commas, equals and spaces are literal inside quotes
            ("", '""'),
        ],
    )
    def test_string_value(self, raw: str, quoted: str) -> None:
        assert escape_string_value(raw) == quoted
        assert parse_line(f"m f={quoted}").fields["f"] == raw


class TestFormatFields:
    @pytest.mark.parametrize(
        ("value", "text"),
        [
            (1.0, "1.0"),
            (61.2, "61.2"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0.0"),
            (1e20, "1e+20"),
            (1.5e-7, "1.5e-07"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (3, "3i"),
            (-42, "-42i"),
            (0, "0i"),
            (True, "true"),
            (False, "false"),
            ("x", '"x"'),
        ],
    )
    def test_value_formats(self, value: float | int | bool | str, text: str) -> None:
        assert format_fields({"f": value}) == f"f={text}"
        parsed = parse_line(f"m {format_fields({'f': value})}").fields["f"]
        assert parsed == value
        assert type(parsed) is type(value)

    def test_float_is_shortest_round_trip(self) -> None:
        for v in (0.1, 1 / 3, 2**-1074, 123456789.123456789, 9007199254740993.0):
            text = format_fields({"v": v}).removeprefix("v=")
            assert float(text) == v
            assert text == repr(v)

    @pytest.mark.parametrize("skipped", [None, float("nan"), float("inf"), float("-inf")])
    def test_none_and_non_finite_skipped(self, skipped: float | None) -> None:
        assert format_fields({"a": 1.0, "b": skipped, "c": 2}) == "a=1.0,c=2i"

    def test_field_keys_escaped_and_order_kept(self) -> None:
        assert format_fields({"z z": 1, "a,b": 2.5, "k=v": "s"}) == r'z\ z=1i,a\,b=2.5,k\=v="s"'

    def test_all_skipped_is_empty(self) -> None:
        assert format_fields({"a": None, "b": float("nan")}) == ""

    def test_numpy_float_is_a_float(self) -> None:
        assert format_fields({"v": np.float64(2.5)}).startswith("v=")

    @pytest.mark.parametrize(
        ("value", "text"), [(np.float64(2.5), "2.5"), (np.int64(3), "3i"), (np.bool_(True), "true")]
    )
    def test_numpy_scalars_from_compute_stages(self, value: object, text: str) -> None:
        assert format_fields({"v": value}) == f"v={text}"  # type: ignore[dict-item]


class TestEncoder:
    def test_telemetry_exact_lines(self) -> None:
        reg = SeriesRegistry()
        a = reg.series_id(M1, "temp_c")
        b = reg.series_id(M1, "rpm")
        enc = LineProtocolEncoder(reg)
        body = enc.telemetry(_batch([a, b, a], [10, 20, 30], [61.5, 1200.0, 1e-5]))
        assert body.decode().split("\n") == [
            f"telemetry,{TAGS1} temp_c=61.5 10",
            f"telemetry,{TAGS1} rpm=1200.0 20",
            f"telemetry,{TAGS1} temp_c=1e-05 30",
        ]

    def test_telemetry_escapes_tags_and_field_key(self) -> None:
        reg = SeriesRegistry()
        sid = reg.series_id(MachineKey("plant 1", "a,b", "l=1", 'm"1'), "temp, c=x")
        body = LineProtocolEncoder(reg).telemetry(_batch([sid], [1000], [61.5])).decode()
        assert body == r'telemetry,area=a\,b,line=l\=1,machine=m"1,site=plant\ 1 temp\,\ c\=x=61.5 1000'
        (point,) = parse_body(body)
        assert point.tags == {"area": "a,b", "line": "l=1", "machine": 'm"1', "site": "plant 1"}
        assert point.fields == {"temp, c=x": 61.5}
        assert point.timestamp == 1000

    def test_telemetry_skips_non_finite(self) -> None:
        reg = SeriesRegistry()
        sid = reg.series_id(M1, "v")
        body = LineProtocolEncoder(reg).telemetry(_batch([sid] * 4, [1, 2, 3, 4], [1.0, np.nan, np.inf, 2.0]))
        assert body == f"telemetry,{TAGS1} v=1.0 1\ntelemetry,{TAGS1} v=2.0 4".encode()

    def test_telemetry_empty(self) -> None:
        assert LineProtocolEncoder(SeriesRegistry()).telemetry(TelemetryBatch.empty()) == b""

    def test_series_registered_after_first_encode(self) -> None:
        reg = SeriesRegistry()
        enc = LineProtocolEncoder(reg)
        a = reg.series_id(M1, "a")
        assert enc.telemetry(_batch([a], [1], [1.0])) == f"telemetry,{TAGS1} a=1.0 1".encode()
        b = reg.series_id(MachineKey("s", "ar", "l", "m"), "b")
        assert enc.telemetry(_batch([b, a], [2, 3], [2.0, 3.0])).decode().split("\n") == [
            "telemetry,area=ar,line=l,machine=m,site=s b=2.0 2",
            f"telemetry,{TAGS1} a=3.0 3",
        ]

    def test_states_exact(self) -> None:
        enc = LineProtocolEncoder(SeriesRegistry())
        body = enc.states(
            [
                StateEvent(M1, 5, MachineState.DOWN, 'jam at "B2" \\ feeder'),
                StateEvent(M1, 6, MachineState.RUNNING, None),
            ]
        ).decode()
        assert body.split("\n") == [
            f'machine_state,{TAGS1} state="DOWN",reason="jam at \\"B2\\" \\\\ feeder" 5',
            f'machine_state,{TAGS1} state="RUNNING" 6',
        ]
        first, second = parse_body(body)
        assert first.fields == {"state": "DOWN", "reason": 'jam at "B2" \\ feeder'}
        assert second.fields == {"state": "RUNNING"}

    def test_counts_exact(self) -> None:
        enc = LineProtocolEncoder(SeriesRegistry())
        body = enc.counts([CountEvent(M1, 7, 19271, 18848)])
        assert body == f"production,{TAGS1} total=19271i,good=18848i 7".encode()
        (point,) = parse_body(body)
        assert point.fields == {"total": 19271, "good": 18848}

    def test_machine_tags_sorted_by_key(self) -> None:
        enc = LineProtocolEncoder(SeriesRegistry())
        tags = enc.tags(MachineKey(site="z", area="y", line="x", machine="w"))
        keys = [kv.split("=")[0] for kv in tags.split(",")]
        assert keys == sorted(keys) == ["area", "line", "machine", "site"]
        assert enc.tags(MachineKey(site="z", area="y", line="x", machine="w")) == tags
        assert len(enc._head_of) == 1  # escaped once: cut from the machine's cached line head

    def test_point_generic(self) -> None:
        enc = LineProtocolEncoder(SeriesRegistry())
        line = enc.point(
            "anomaly score", {"z": "1", "a b": "x,y", "empty": ""}, {"score": 0.5, "flag": True, "n": 2}, 99
        )
        assert line == r"anomaly\ score,a\ b=x\,y,z=1 score=0.5,flag=true,n=2i 99"
        point = parse_line(line)
        assert point.measurement == "anomaly score"
        assert point.tags == {"a b": "x,y", "z": "1"}
        assert point.fields == {"score": 0.5, "flag": True, "n": 2}

    def test_point_without_fields_is_empty(self) -> None:
        enc = LineProtocolEncoder(SeriesRegistry())
        assert enc.point("m", {"t": "1"}, {"v": None, "w": float("nan")}, 1) == ""

    def test_join_skips_empty(self) -> None:
        assert LineProtocolEncoder.join([b"a 1", b"", b"b 2", b""]) == b"a 1\nb 2"
        assert LineProtocolEncoder.join([]) == b""


class TestSharedLines:
    """A machine's samples with one timestamp share a line; every path stores exactly the same values."""

    @staticmethod
    def _values(body: bytes) -> list[tuple[object, ...]]:
        return sorted((tuple(sorted(p.tags.items())), k, v, p.timestamp)
                      for p in parse_body(body) for k, v in p.fields.items())

    @pytest.mark.parametrize("seed", range(20))
    def test_batch_format_per_line_format_and_one_line_per_sample_agree(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        reg = SeriesRegistry()
        sids = [reg.series_id(MachineKey("s", "a", "l", f"m%{m}"), f"v {k}%d") for m in range(3) for k in range(4)]
        n = int(rng.integers(1, 300))
        series = rng.choice(sids, n)
        ts = np.sort(rng.integers(0, 20, n)) * 1000  # repeated timestamps: lines of several samples
        batch = TelemetryBatch(series.astype(np.int64), ts.astype(np.int64), np.round(rng.normal(0, 100, n), 3))
        enc = LineProtocolEncoder(reg)
        body = enc.telemetry(batch)
        ones = b"\n".join(enc.telemetry(TelemetryBatch(batch.series[i:i + 1], batch.ts_ns[i:i + 1],
                                                       batch.value[i:i + 1])) for i in range(n))
        enc._telemetry_templated = lambda *_: None  # type: ignore[method-assign]
        per_line = enc.telemetry(batch)
        assert self._values(body) == self._values(per_line) == self._values(ones)
        assert body.count(b"\n") <= ones.count(b"\n")

    def test_one_key_two_shapes_falls_back_to_per_line(self) -> None:
        reg = SeriesRegistry()
        a, b, c = (reg.series_id(M1, name) for name in ("a", "b", "c"))
        batch = _batch([a, b, a, c], [1, 1, 2, 2], [1.0, 2.0, 3.0, 4.0])  # (a, 2 samples) twice: [a, b], [a, c]
        assert LineProtocolEncoder(reg).telemetry(batch).decode().splitlines() == [
            f"telemetry,{TAGS1} a=1.0,b=2.0 1", f"telemetry,{TAGS1} a=3.0,c=4.0 2"]


class TestFloat32Series:
    """Series declared float32 at the source (a Sparkplug Float) are written with 9 significant digits."""

    @staticmethod
    def _reg() -> tuple[SeriesRegistry, list[int]]:
        reg = SeriesRegistry()
        return reg, [reg.series_id(M1, name) for name in ("a", "b", "c")]

    def test_float32_values_round_trip_exactly_in_fewer_digits(self) -> None:
        reg, (a, b, c) = self._reg()
        reg.set_float32(a, True)
        reg.set_float32(b, True)
        rng = np.random.default_rng(3)
        v32 = rng.normal(50, 20, 300).astype(np.float32)
        values = v32.astype(np.float64)
        values[2::3] = rng.normal(50, 20, 100)  # c: a float64 series keeps its repr
        sids = np.tile([a, b, c], 100)
        ts = np.repeat(np.arange(100, dtype=np.int64), 3)
        text = LineProtocolEncoder(reg).telemetry(TelemetryBatch(sids, ts, values)).decode()
        back = {(r.timestamp, k): v for r in map(parse_line, text.split("\n")) for k, v in r.fields.items()}
        for i, (sid, t, v) in enumerate(zip(sids.tolist(), ts.tolist(), values.tolist(), strict=True)):
            got = back[(t, "abc"[sid])]
            if sid == c:
                assert got == v  # exact float64
            else:
                assert np.float32(got) == v32[i]  # the same float32
        fields = re.findall(r"[ ,][ab]=([^, ]+)", text)
        digits = [len(re.sub(r"[^0-9]", "", f.split("e")[0]).lstrip("0")) for f in fields]
        assert len(digits) == 200
        assert max(digits) <= 9  # float64's repr of a float32 takes up to 17

    def test_a_value_that_is_no_float32_keeps_its_repr(self) -> None:
        reg, (a, _, _) = self._reg()
        reg.set_float32(a, True)
        enc = LineProtocolEncoder(reg)
        tb = _batch([a, a], [1, 2], [float(np.float32(20.1)), 20.1])  # 20.1 is no float32
        assert enc.telemetry(tb).decode() == f"telemetry,{TAGS1} a=20.1000004 1\ntelemetry,{TAGS1} a=20.1 2"

    def test_shared_line_and_a_declaration_change(self) -> None:
        reg, (a, b, _) = self._reg()
        enc = LineProtocolEncoder(reg)
        x = float(np.float32(0.3))
        tb = _batch([a, b], [7, 7], [x, x])
        assert enc.telemetry(tb).decode() == f"telemetry,{TAGS1} a={x!r},b={x!r} 7"
        reg.set_float32(a, True)  # a rebirth says Float: the cached template is not reused
        assert enc.telemetry(tb).decode() == f"telemetry,{TAGS1} a=0.300000012,b={x!r} 7"
        reg.set_float32(a, False)
        assert enc.telemetry(tb).decode() == f"telemetry,{TAGS1} a={x!r},b={x!r} 7"
