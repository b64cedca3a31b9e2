"""Dead-letter file: encoding, truncation, rotation, and every line valid JSON."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.deadletter import DeadLetterConfig, DeadLetterError, DeadLetterFile, format_rfc3339_ns
from gateway.schema import parse_rfc3339_ns

TOPIC = "factory/s1/a1/l1/m1/telemetry"
T0 = 1763899200_123456789


def read_records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_text_and_base64_payloads(tmp_path: Path) -> None:
    path = tmp_path / "dl" / "deadletter.jsonl"
    with DeadLetterFile(path) as dead:
        dead.write(TOPIC, '{"values": {"température": 1}}'.encode(), "values: bad", T0)
        dead.write(TOPIC, b"\x00\xff\xfe binary", "not JSON", T0 + 1)
        dead.write(TOPIC, b"", "empty", T0 + 2)
        dead.sync()
        assert dead.records_written == 3
    first, second, third = read_records(path)
    assert first == {
        "arrival": "2025-11-23T12:00:00.123456789Z",
        "kind": "message",
        "topic": TOPIC,
        "payload": '{"values": {"température": 1}}',
        "payload_encoding": "utf-8",
        "reason": "values: bad",
    }
    assert second["payload_encoding"] == "base64"
    assert base64.b64decode(second["payload"]) == b"\x00\xff\xfe binary"
    assert (third["payload"], third["payload_encoding"]) == ("", "utf-8")
    assert parse_rfc3339_ns(third["arrival"]) == T0 + 2


def test_arrival_is_rfc3339_utc() -> None:
    assert format_rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"
    assert parse_rfc3339_ns(format_rfc3339_ns(T0)) == T0


def test_truncation_flag(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    with DeadLetterFile(path, max_payload_bytes=8) as dead:
        dead.write(TOPIC, b"12345678", "exactly the limit", T0)
        dead.write(TOPIC, b"123456789", "one over", T0)
        dead.write(TOPIC, "1234567é".encode(), "cut inside a character", T0)
        dead.write(TOPIC, b"\xff" * 20, "binary over", T0)
    exact, over, split, binary = read_records(path)
    assert "truncated" not in exact
    assert exact["payload"] == "12345678"
    assert (over["payload"], over["truncated"], over["payload_bytes"]) == ("12345678", True, 9)
    # The partial UTF-8 sequence is dropped instead of turning the record into base64.
    assert (split["payload"], split["payload_encoding"], split["truncated"]) == ("1234567", "utf-8", True)
    assert base64.b64decode(binary["payload"]) == b"\xff" * 8
    assert binary["truncated"] is True


def test_rejected_lines(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    lines = [b"cnc,machine=m1 temp_c=1 1", b'cnc,machine=m1 temp_c="x" 2']
    with DeadLetterFile(path) as dead:
        dead.write_lines(lines, "field type conflict: temp_c is float", arrival_ns=T0)
        dead.write_lines([b"cnc temp=\xff 3"], "invalid")
    records = read_records(path)
    assert [r["payload"] for r in records[:2]] == [line.decode() for line in lines]
    assert all(r["topic"] is None and r["kind"] == "rejected_line" for r in records)
    assert records[0]["reason"] == "field type conflict: temp_c is float"
    assert records[0]["arrival"] == "2025-11-23T12:00:00.123456789Z"
    assert records[2]["payload_encoding"] == "base64"


def test_long_reason_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    with DeadLetterFile(path) as dead:
        dead.write(TOPIC, b"x", "r" * 100_000, T0)
    (record,) = read_records(path)
    assert 4000 < len(record["reason"]) < 5000


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_rotation_keeps_at_most_keep_files_and_newest_records(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "deadletter.jsonl"
    with DeadLetterFile(path, max_bytes=1000, keep=keep) as dead:
        for i in range(200):
            dead.write(TOPIC, f'payload {i:04d} \n\t"quoted" \x00'.encode(), f"reason {i}", T0 + i)
        assert dead.rotations > keep
    files = sorted(tmp_path.iterdir())
    expected = [path] + [Path(f"{path}.{n}") for n in range(1, keep)]
    assert sorted(files) == sorted(expected)
    assert all(f.stat().st_size <= 1000 for f in files)
    # Oldest first: the highest suffix, then down to the live file.
    ordered = [Path(f"{path}.{n}") for n in range(keep - 1, 0, -1)] + [path]
    numbers = [int(r["reason"].split()[1]) for f in ordered for r in read_records(f)]
    assert numbers == list(range(200 - len(numbers), 200))  # contiguous and ending with the newest
    assert len(numbers) > 0


def test_reopen_appends_and_drops_files_beyond_keep(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    with DeadLetterFile(path, max_bytes=300, keep=4) as dead:
        for i in range(30):
            dead.write(TOPIC, b"p", f"r{i}", T0)
    assert Path(f"{path}.3").exists()
    before = len(read_records(path))
    with DeadLetterFile(path, max_bytes=10_000, keep=2) as dead:
        assert not Path(f"{path}.2").exists()
        assert not Path(f"{path}.3").exists()
        dead.write(TOPIC, b"p", "again", T0)
        dead.flush()
        records = read_records(path)
        assert len(records) == before + 1
        assert records[-1]["reason"] == "again"


def test_unencodable_text_does_not_break_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    with DeadLetterFile(path) as dead:
        dead.write("t/\udcff", b"x", "bad \udcff byte", T0)
    (record,) = read_records(path)
    assert record["topic"] == "t/?"
    assert record["reason"] == "bad ? byte"


def test_closed_file_refuses_writes(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "d.jsonl")
    dead.close()
    dead.close()
    with pytest.raises(DeadLetterError, match="closed"):
        dead.write(TOPIC, b"x", "r", T0)


def test_config() -> None:
    cfg = DeadLetterConfig()
    assert cfg.path == Path("/var/lib/factory-gateway/deadletter.jsonl")
    assert (cfg.max_bytes, cfg.keep, cfg.max_payload_bytes) == (10 << 20, 5, 64 << 10)
    assert DeadLetterConfig(max_bytes="2MiB", max_payload_bytes="1KiB").max_payload_bytes == 1024
    with pytest.raises(ValidationError, match="keep"):
        DeadLetterConfig(keep=0)
    with pytest.raises(ValidationError, match="extra"):
        DeadLetterConfig.model_validate({"rotate": 3})


def test_from_config(tmp_path: Path) -> None:
    cfg = DeadLetterConfig(path=tmp_path / "x" / "dl.jsonl", max_bytes=200, keep=2, max_payload_bytes=4)
    with DeadLetterFile.from_config(cfg) as dead:
        dead.write(TOPIC, b"123456", "r", T0)
    (record,) = read_records(tmp_path / "x" / "dl.jsonl")
    assert record["truncated"] is True
