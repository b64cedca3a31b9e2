"""CLI errors name the key and exit 2 before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main


def test_unwritable_buffer_dir_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[buffer]\ndir = "{blocker / "wal"}"\n[deadletter]\npath = "{tmp_path / "dl.jsonl"}"\n')
    assert main(["run", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("buffer.dir: cannot open write-ahead log")


def test_unwritable_deadletter_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[buffer]\ndir = "{tmp_path / "wal"}"\n[deadletter]\npath = "{blocker / "dl.jsonl"}"\n')
    assert main(["run", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("deadletter.path: cannot open dead-letter file")


def test_replay_bad_input_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text("")
    data = tmp_path / "in.jsonl"
    data.write_text('{"topic": "factory/s/a/l/m/state", "payload": {"state": "IDLE"}}\n["not", "a record"]\n')
    assert main(["replay", "--config", str(cfg), "--input", str(data), "--sink", "stdout"]) == 2
    assert "--input: line 2: expected" in capsys.readouterr().err


def test_detect_unknown_detector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--detector", "magic"]) == 2
    assert "--detector: unknown 'magic'" in capsys.readouterr().err


def test_detect_uses_the_configs_detect_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    data = tmp_path / "in"
    data.mkdir()
    x = np.random.default_rng(1).normal(10.0, 1.0, 400)
    x[300] = 30.0
    rows = "".join(f"2025-12-01 {i // 60:02d}:{i % 60:02d}:00,{v}\n" for i, v in enumerate(x.tolist()))
    (data / "s.csv").write_text("timestamp,value\n" + rows)
    cfg = tmp_path / "g.toml"
    cfg.write_text("[detect]\nthreshold = 0.99\ndetectors = [\"ewma\"]\n[detect.ewma]\nz_alarm = 40.0\n")
    scores = []
    for extra in ([], ["--config", str(cfg)]):
        assert main(["detect", "--input", str(data), "--output", str(tmp_path / "o"), *extra]) == 0
        out = (tmp_path / "o" / "s.csv").read_text().splitlines()[1:]
        scores.append(float(out[300].split(",")[2]))
    assert scores[0] >= 0.5 > scores[1]  # the spike: 20 σ, under z_alarm = 40 half of an alarm
    bad = tmp_path / "bad.toml"
    bad.write_text("[detect.likelihood]\nlaw = \"laplace\"\n")
    assert main(["detect", "--input", str(data), "--output", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "law" in capsys.readouterr().err
