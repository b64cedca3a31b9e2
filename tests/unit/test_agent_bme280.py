"""BME280/BMP280 driver against a fake SMBus serving a register map, checked against published numbers.

Temperature and pressure use the BMP280 datasheet's worked example (§3.11.3 / §8.1: T = 25.08 °C,
p = 100653.27 Pa). Humidity is checked against the BME280 datasheet's 32-bit integer formula
(§4.2.3), written out independently here, while the driver uses the double-precision one.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from devices.agent import SensorReader, SensorsSection
from devices.bme280 import Bme280, Bme280Error, Calibration

WORKED = {
    "dig_T1": 27504, "dig_T2": 26435, "dig_T3": -1000,
    "dig_P1": 36477, "dig_P2": -10685, "dig_P3": 3024, "dig_P4": 2855, "dig_P5": 140, "dig_P6": -7,
    "dig_P7": 15500, "dig_P8": -14600, "dig_P9": 6000,
}  # fmt: skip
ADC_T, ADC_P = 519888, 415148
HUMIDITY_CAL = {"dig_H1": 75, "dig_H2": 362, "dig_H3": 0, "dig_H4": 313, "dig_H5": 50, "dig_H6": 30}


def register_map(
    chip_id: int, cal: dict[str, int], adc_t: int, adc_p: int, adc_h: int | None = None
) -> dict[int, int]:
    """The registers a BME280/BMP280 would hold for this calibration and these raw readings."""
    c = {"dig_H1": 0, "dig_H2": 0, "dig_H3": 0, "dig_H4": 0, "dig_H5": 0, "dig_H6": 0, **cal}
    tp = struct.pack("<HhhHhhhhhhhh", *(c[k] for k in WORKED)) + bytes([0x00, c["dig_H1"]])
    h4, h5 = c["dig_H4"] & 0xFFF, c["dig_H5"] & 0xFFF  # signed 12-bit, sharing register 0xE5
    h = struct.pack("<hB", c["dig_H2"], c["dig_H3"]) + bytes([h4 >> 4, (h5 & 0xF) << 4 | (h4 & 0xF), h5 >> 4])
    h += struct.pack("<b", c["dig_H6"])
    regs = {0xD0: chip_id, 0xF3: 0x00}
    regs.update({0x88 + i: b for i, b in enumerate(tp)})
    if chip_id == 0x60:
        regs.update({0xE1 + i: b for i, b in enumerate(h)})
    for base, adc in ((0xF7, adc_p), (0xFA, adc_t)):
        regs[base], regs[base + 1], regs[base + 2] = adc >> 12, (adc >> 4) & 0xFF, (adc & 0xF) << 4
    if adc_h is not None:
        regs[0xFD], regs[0xFE] = adc_h >> 8, adc_h & 0xFF
    return regs


class FakeBus:
    """An ``smbus2.SMBus`` stand-in: one device at ``address`` with a register map; records writes."""

    def __init__(self, regs: dict[int, int], address: int = 0x76) -> None:
        self.regs = regs
        self.address = address
        self.writes: list[tuple[int, int]] = []
        self.closed = False

    def _check(self, addr: int) -> None:
        if addr != self.address:
            raise OSError(121, "Remote I/O error")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._check(i2c_addr)
        return self.regs.get(register, 0)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        self._check(i2c_addr)
        return [self.regs.get(register + i, 0) for i in range(length)]

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._check(i2c_addr)
        self.writes.append((register, value))
        if register != 0xE0:
            self.regs[register] = value

    def close(self) -> None:
        self.closed = True


def t_fine_int32(adc_t: int, t1: int, t2: int, t3: int) -> int:
    """BME280 datasheet §4.2.3, ``BME280_compensate_T_int32`` (its t_fine)."""
    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    return var1 + var2


def humidity_int32(adc_h: int, t_fine: int, c: dict[str, int]) -> float:
    """BME280 datasheet §4.2.3, ``bme280_compensate_H_int32``: %RH from Q22.10."""
    v = t_fine - 76800
    v = ((((adc_h << 14) - (c["dig_H4"] << 20) - (c["dig_H5"] * v)) + 16384) >> 15) * (
        ((((((v * c["dig_H6"]) >> 10) * (((v * c["dig_H3"]) >> 11) + 32768)) >> 10) + 2097152) * c["dig_H2"] + 8192)
        >> 14
    )
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * c["dig_H1"]) >> 4)
    v = min(max(v, 0), 419430400)
    return (v >> 12) / 1024.0


def no_sleep(seconds: float) -> None:
    pass


def test_worked_example_from_the_bmp280_datasheet() -> None:
    bus = FakeBus(register_map(0x58, WORKED, ADC_T, ADC_P))
    dev = Bme280(bus, 0x76, sleep=no_sleep)
    assert dev.model == "BMP280"
    assert dev.calibration == Calibration(**WORKED)
    reading = dev.read()
    assert reading.temp_c == pytest.approx(25.08, abs=0.005)
    assert reading.pressure_pa == pytest.approx(100653.27, abs=0.005)
    assert reading.humidity_pct is None


@pytest.mark.parametrize(
    ("cal", "adc_h"),
    [
        pytest.param(HUMIDITY_CAL, 30000, id="typical"),
        pytest.param(HUMIDITY_CAL, 22000, id="dry"),
        pytest.param({**HUMIDITY_CAL, "dig_H3": 10, "dig_H5": -20, "dig_H6": -5}, 32000, id="negative-12-bit-h5"),
        pytest.param({**HUMIDITY_CAL, "dig_H4": -8}, 5000, id="negative-12-bit-h4"),
    ],
)
def test_bme280_humidity_matches_the_integer_formula(cal: dict[str, int], adc_h: int) -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **cal}, ADC_T, ADC_P, adc_h), address=0x77)
    dev = Bme280(bus, 0x77, sleep=no_sleep)
    assert dev.model == "BME280"
    assert (dev.calibration.dig_H4, dev.calibration.dig_H5) == (cal["dig_H4"], cal["dig_H5"])
    reading = dev.read()
    expected = humidity_int32(adc_h, t_fine_int32(ADC_T, 27504, 26435, -1000), {**HUMIDITY_CAL, **cal})
    assert 0.0 < expected < 100.0
    assert reading.humidity_pct == pytest.approx(expected, abs=0.01)  # Q22.10 steps are 0.001 %RH
    assert reading.temp_c == pytest.approx(25.08, abs=0.005)  # humidity does not disturb T and p
    assert reading.pressure_pa == pytest.approx(100653.27, abs=0.005)


def test_humidity_is_clamped_to_0_100() -> None:
    for adc_h, bound in ((0, 0.0), (65000, 100.0)):
        bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, adc_h))
        assert Bme280(bus, sleep=no_sleep).read().humidity_pct == bound


def test_forced_mode_register_writes() -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000))
    dev = Bme280(bus, 0x76, mode="forced", oversampling=4, filter_coefficient=2, sleep=no_sleep)
    # soft reset, config (t_sb 1000 ms = 5, filter 2 = 1) in sleep mode, ctrl_hum (x4 = 3) before ctrl_meas
    assert bus.writes == [(0xE0, 0xB6), (0xF5, 5 << 5 | 1 << 2), (0xF2, 3)]
    dev.read()
    dev.read()
    assert bus.writes[3:] == [(0xF4, 3 << 5 | 3 << 2 | 0b01)] * 2  # one forced conversion per read


def test_normal_mode_register_writes() -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000))
    dev = Bme280(bus, 0x76, mode="normal", oversampling=2, filter_coefficient=4, standby_ms=250, sleep=no_sleep)
    assert bus.writes == [(0xE0, 0xB6), (0xF5, 3 << 5 | 2 << 2), (0xF2, 2), (0xF4, 2 << 5 | 2 << 2 | 0b11)]
    dev.read()
    assert len(bus.writes) == 4  # normal mode: reads only


def test_bmp280_has_no_ctrl_hum_write() -> None:
    bus = FakeBus(register_map(0x58, WORKED, ADC_T, ADC_P))
    Bme280(bus, sleep=no_sleep).read()
    assert 0xF2 not in {reg for reg, _ in bus.writes}


@pytest.mark.parametrize("chip_id", [0x00, 0x55, 0x61, 0xFF])
def test_other_chips_are_refused(chip_id: int) -> None:
    bus = FakeBus(register_map(chip_id, WORKED, ADC_T, ADC_P))
    with pytest.raises(Bme280Error, match=f"chip id {chip_id:#04x} .* neither a BME280"):
        Bme280(bus, sleep=no_sleep)


def test_skipped_measurement_is_an_error() -> None:
    bus = FakeBus(register_map(0x60, WORKED, 0x80000, ADC_P, 30000))
    with pytest.raises(Bme280Error, match="no measurement"):
        Bme280(bus, sleep=no_sleep).read()


def test_device_stuck_measuring_is_an_error() -> None:
    bus = FakeBus(register_map(0x60, WORKED, ADC_T, ADC_P, 30000))
    dev = Bme280(bus, sleep=no_sleep)
    bus.regs[0xF3] = 0x08
    with pytest.raises(Bme280Error, match="busy"):
        dev.read()


# -- through the agent's SensorReader -------------------------------------------------------------


def _reader(tmp_path: Path, fake: FakeBus, **bme: object) -> tuple[SensorReader, list[int]]:
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    opened: list[int] = []

    def open_i2c(n: int) -> FakeBus:
        opened.append(n)
        return fake

    cfg = SensorsSection.model_validate(
        {"thermal_dir": tmp_path / "thermal", "loadavg": False, "w1": False, "bme280": bme}
    )
    r = SensorReader(cfg, open_i2c=open_i2c)
    return r, opened


def test_reader_publishes_bme280_metrics(tmp_path: Path) -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000), address=0x77)
    r, opened = _reader(tmp_path, bus, address=0x77, bus=3, prefix="ambient_")
    values = r.read()
    assert opened == [3]
    assert set(values) == {"cpu_temp_c", "ambient_temp_c", "ambient_pressure_hpa", "ambient_humidity_pct"}
    assert values["ambient_temp_c"] == pytest.approx(25.08, abs=0.005)
    assert values["ambient_pressure_hpa"] == pytest.approx(1006.5327, abs=0.0001)
    r.read()
    assert opened == [3]  # set up once
    r.close()
    assert bus.closed


def test_reader_bmp280_gives_no_humidity(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = FakeBus(register_map(0x58, WORKED, ADC_T, ADC_P))
    r, _ = _reader(tmp_path, bus)
    with caplog.at_level(logging.INFO, logger="devices.agent"):
        assert set(r.read()) == {"cpu_temp_c", "bme280_temp_c", "bme280_pressure_hpa"}
    assert any("BMP280 has no humidity" in rec.getMessage() for rec in caplog.records)


def test_failing_bme280_never_stops_the_other_sensors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000), address=0x76)
    r, opened = _reader(tmp_path, bus, address=0x77)  # wired to 0x76, configured 0x77: nothing answers
    with caplog.at_level(logging.WARNING, logger="devices.agent"):
        for _ in range(10):
            assert r.read() == {"cpu_temp_c": 48.312}
    assert len(opened) == 10  # tried again at every sample
    assert bus.closed
    (rec,) = caplog.records  # but logged rate-limited
    assert "sensors.bme280 (0x77 on /dev/i2c-1) failed" in rec.getMessage()
    assert "Remote I/O error" in rec.getMessage()
    bus.address = 0x77  # sensor re-wired: picked up at the next sample
    assert "bme280_humidity_pct" in r.read()


def test_bme280_that_fails_after_setup_is_set_up_again(tmp_path: Path) -> None:
    bus = FakeBus(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000))
    r, opened = _reader(tmp_path, bus)
    assert "bme280_temp_c" in r.read()
    bus.regs[0xFA] = 0x80  # brown-out: the device reset itself and its data registers hold "skipped"
    bus.regs[0xFB] = bus.regs[0xFC] = 0
    assert r.read() == {"cpu_temp_c": 48.312}
    bus.regs.update(register_map(0x60, {**WORKED, **HUMIDITY_CAL}, ADC_T, ADC_P, 30000))
    assert "bme280_temp_c" in r.read()
    assert opened == [1, 1]
