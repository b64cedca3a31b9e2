"""Pi agent sysfs sensors against a fake sysfs tree: thermal zones, DS18B20 probes, failure isolation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from devices.agent import SensorReader, SensorsSection
from devices.sensors import RateLimitedLog, W1CrcError, metric_name, read_ds18b20, thermal_zones

W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
W1_BAD_CRC = "72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


def make_zones(root: Path, zones: dict[int, tuple[str | None, str]]) -> Path:
    """``{number: (type or None, temp file text)}`` as ``root/thermal_zoneN/{type,temp}``."""
    for number, (zone_type, temp) in zones.items():
        d = root / f"thermal_zone{number}"
        d.mkdir(parents=True)
        if zone_type is not None:
            (d / "type").write_text(zone_type + "\n")
        (d / "temp").write_text(temp)
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_probe(root: Path, serial: str, *, w1_slave: str | None = None, temperature: str | None = None) -> Path:
    d = root / serial
    d.mkdir(parents=True)
    if w1_slave is not None:
        (d / "w1_slave").write_text(w1_slave)
    if temperature is not None:
        (d / "temperature").write_text(temperature)
    return d


def reader(tmp_path: Path, **kw: object) -> SensorReader:
    cfg: dict[str, object] = {
        "thermal_dir": tmp_path / "thermal",
        "loadavg": False,
        "w1_dir": tmp_path / "w1",
    }
    cfg.update(kw)
    return SensorReader(SensorsSection.model_validate(cfg))


@pytest.mark.parametrize(
    ("zones", "expected"),
    [
        pytest.param({0: ("cpu-thermal", "48312\n")}, {"cpu_temp_c": 48.312}, id="pi-one-zone"),
        pytest.param(
            {0: ("cpu-thermal", "48312\n"), 1: ("gpu-thermal", "45000\n")},
            {"cpu_temp_c": 48.312, "gpu_thermal_temp_c": 45.0},
            id="pi-cpu-and-gpu",
        ),
        pytest.param(
            {0: ("acpitz", "27800\n"), 1: ("x86_pkg_temp", "51000\n"), 2: ("acpitz", "30000\n")},
            {"cpu_temp_c": 27.8, "x86_pkg_temp_c": 51.0, "acpitz_temp_c": 30.0},
            id="no-cpu-thermal-first-is-cpu",
        ),
        pytest.param(
            {0: ("soc-thermal", "40000\n"), 2: ("cpu-thermal", "50000\n"), 10: ("soc-thermal", "-1500\n")},
            {"soc_thermal_temp_c": 40.0, "cpu_temp_c": 50.0, "soc_thermal_10_temp_c": -1.5},
            id="cpu-later-duplicate-type-numbered",
        ),
        pytest.param(
            {0: ("cpu-thermal", "48000\n"), 1: (None, "33000\n"), 3: ("Weird Type/#1", "20000\n")},
            {"cpu_temp_c": 48.0, "zone1_temp_c": 33.0, "weird_type_1_temp_c": 20.0},
            id="missing-type-and-odd-characters",
        ),
        pytest.param({0: ("cpu", "41000\n"), 1: ("cpu-thermal", "42000\n")},
                     {"cpu_0_temp_c": 41.0, "cpu_temp_c": 42.0}, id="type-cpu-does-not-clash"),
    ],
)
def test_thermal_zones_are_named_and_read(
    tmp_path: Path, zones: dict[int, tuple[str | None, str]], expected: dict[str, float]
) -> None:
    make_zones(tmp_path / "thermal", zones)
    assert reader(tmp_path, w1=False).read() == expected


def test_thermal_zones_sort_numerically(tmp_path: Path) -> None:
    make_zones(tmp_path, {n: (f"t{n}", "1000\n") for n in (10, 2, 1)})
    assert [z.number for z in thermal_zones(tmp_path)] == [1, 2, 10]


@pytest.mark.parametrize(
    ("zone_type", "name"),
    [("cpu-thermal", "cpu_temp_c"), ("gpu-thermal", "gpu_thermal_temp_c"), ("x86_pkg_temp", "x86_pkg_temp_c"),
     ("__", "zone_temp_c"), ("iwlwifi_1", "iwlwifi_1_temp_c")],
)
def test_metric_name(zone_type: str, name: str) -> None:
    assert metric_name(zone_type) == name


def test_unreadable_zone_is_skipped_others_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_zones(tmp_path / "thermal", {0: ("cpu-thermal", "48312\n"), 1: ("broken", "not a number\n")})
    r = reader(tmp_path, w1=False)
    with caplog.at_level(logging.WARNING, logger="devices.agent"):
        for _ in range(5):
            assert r.read() == {"cpu_temp_c": 48.312}
    (rec,) = caplog.records  # rate-limited, not once per sample
    assert "thermal zone 1 (broken) unreadable" in rec.getMessage()


# -- DS18B20 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"w1_slave": W1_OK}, 23.125, id="w1_slave"),
        pytest.param({"w1_slave": W1_OK.replace("t=23125", "t=-10062")}, -10.062, id="w1_slave-negative"),
        pytest.param({"w1_slave": W1_OK.replace("t=23125", "t=85000")}, None, id="w1_slave-power-on-85"),
        pytest.param({"w1_slave": W1_BAD_CRC}, W1CrcError, id="w1_slave-bad-crc"),
        pytest.param({"w1_slave": "garbage\n"}, ValueError, id="w1_slave-one-line"),
        pytest.param({"w1_slave": "x YES\nno temperature here\n"}, ValueError, id="w1_slave-no-t"),
        pytest.param({"temperature": "21500\n"}, 21.5, id="temperature-file"),
        pytest.param({"temperature": "85000\n"}, None, id="temperature-power-on-85"),
        pytest.param({"temperature": ""}, W1CrcError, id="temperature-empty-is-crc-failure"),
        pytest.param({"temperature": "19000\n", "w1_slave": W1_BAD_CRC}, 19.0, id="temperature-preferred"),
        pytest.param({}, OSError, id="no-files"),
    ],
)
def test_read_ds18b20(tmp_path: Path, files: dict[str, str], expected: float | type[Exception] | None) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if isinstance(expected, type):
        with pytest.raises(expected):
            read_ds18b20(tmp_path)
    else:
        assert read_ds18b20(tmp_path) == expected


def test_w1_probes_good_bad_and_new_kernel(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w1 = tmp_path / "w1"
    make_probe(w1, "28-00000a1b2c3d", w1_slave=W1_OK)
    make_probe(w1, "28-00000bad0000", w1_slave=W1_BAD_CRC)
    make_probe(w1, "28-0000000f00d1", temperature="-2500\n", w1_slave=W1_OK)
    make_probe(w1, "28-000000085000", temperature="85000\n")
    make_probe(w1, "10-0000000old01", w1_slave=W1_OK)  # DS18S20 family: not ours
    (w1 / "w1_bus_master1").mkdir()
    r = reader(tmp_path, thermal=False, w1_names={"28-00000a1b2c3d": "coolant_temp_c"})
    with caplog.at_level(logging.WARNING, logger="devices.agent"):
        for _ in range(20):
            assert r.read() == {"coolant_temp_c": 23.125, "ds18b20_0000000f00d1_c": -2.5}
    crc = [rec for rec in caplog.records if "CRC" in rec.getMessage()]
    assert len(crc) == 1, "CRC failures are logged rate-limited, not once per sample"
    assert "28-00000bad0000" in crc[0].getMessage()


def test_crc_log_reports_repeats_after_the_interval() -> None:
    now = [0.0]
    lines: list[str] = []
    limited = RateLimitedLog(logging.getLogger("t"), every_s=300, clock=lambda: now[0])
    limited.emit = lambda level, msg, *args: lines.append(msg % args)  # type: ignore[method-assign]
    for t in (0.0, 10.0, 20.0, 299.0, 300.0, 301.0, 700.0):
        now[0] = t
        limited.warning("crc:a", "CRC failed on %s", "a")
        limited.warning("crc:b", "CRC failed on %s", "b")
    assert lines == [
        "CRC failed on a",
        "CRC failed on b",
        "CRC failed on a (3 more since the last report)",
        "CRC failed on b (3 more since the last report)",
        "CRC failed on a (1 more since the last report)",
        "CRC failed on b (1 more since the last report)",
    ]


def test_a_sensor_failing_mid_run_does_not_stop_the_others(tmp_path: Path) -> None:
    make_zones(tmp_path / "thermal", {0: ("cpu-thermal", "48312\n")})
    probe = make_probe(tmp_path / "w1", "28-00000a1b2c3d", w1_slave=W1_OK)
    (tmp_path / "loadavg").write_text("0.5 0.4 0.3 1/1 1\n")
    r = reader(tmp_path, loadavg=True, loadavg_path=tmp_path / "loadavg")
    assert set(r.read()) == {"cpu_temp_c", "load_1m", "load_5m", "load_15m", "ds18b20_00000a1b2c3d_c"}
    (probe / "w1_slave").unlink()  # probe unplugged: the kernel removes its files
    (tmp_path / "loadavg").write_text("")
    assert r.read() == {"cpu_temp_c": 48.312}
    (probe / "w1_slave").write_text(W1_OK)  # and back
    assert r.read()["ds18b20_00000a1b2c3d_c"] == 23.125
