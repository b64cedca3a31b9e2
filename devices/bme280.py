"""Bosch BME280 temperature/pressure/humidity sensor (and the humidity-less BMP280) over I²C.

The driver talks to any object with the three ``smbus2.SMBus`` methods it uses (:class:`SMBusLike`), so
tests serve a register map. Compensation uses the datasheets' double-precision formulas (BME280 datasheet
rev. 1.6 §8.1; BMP280 rev. 1.19 §8.1), checked against the BMP280 datasheet's worked example:

>>> cal = Calibration(dig_T1=27504, dig_T2=26435, dig_T3=-1000, dig_P1=36477, dig_P2=-10685, dig_P3=3024,
...                   dig_P4=2855, dig_P5=140, dig_P6=-7, dig_P7=15500, dig_P8=-14600, dig_P9=6000)
>>> t_c, t_fine = compensate_temperature(cal, 519888)
>>> round(t_c, 2), round(compensate_pressure(cal, 415148, t_fine), 2)
(25.08, 100653.27)
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

__all__ = [
    "ADDRESSES",
    "BME280_CHIP_ID",
    "BMP280_CHIP_IDS",
    "Bme280",
    "Bme280Error",
    "Bme280Reading",
    "Calibration",
    "SMBusLike",
    "compensate_humidity",
    "compensate_pressure",
    "compensate_temperature",
]

ADDRESSES = (0x76, 0x77)  # SDO to GND, SDO to VDDIO
BME280_CHIP_ID = 0x60
BMP280_CHIP_IDS = (0x56, 0x57, 0x58)  # two engineering samples, then mass production

REG_CALIB_TP = 0x88  # 26 bytes: dig_T1..dig_P9, a reserved byte, dig_H1
REG_CHIP_ID = 0xD0
REG_RESET = 0xE0
REG_CALIB_H = 0xE1  # 7 bytes: dig_H2..dig_H6
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # press (3), temp (3), hum (2)

_RESET_WORD = 0xB6
_STATUS_MEASURING = 0x08
_STATUS_IM_UPDATE = 0x01
_MODE_FORCED = 0b01
_MODE_NORMAL = 0b11
_SKIPPED_20BIT = 0x80000  # what the data registers hold for a measurement that is switched off
_SKIPPED_16BIT = 0x8000

OVERSAMPLING = {1: 1, 2: 2, 4: 3, 8: 4, 16: 5}  # factor -> osrs_x bits
FILTER = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}  # IIR coefficient -> filter bits
STANDBY_MS = {0.5: 0, 62.5: 1, 125.0: 2, 250.0: 3, 500.0: 4, 1000.0: 5}  # t_sb bits, same on BMP280


class Bme280Error(Exception):
    """The device at the address is not a BME280/BMP280, or it gave no measurement."""


class SMBusLike(Protocol):
    """The part of ``smbus2.SMBus`` the driver uses."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Calibration:
    """Factory trimming parameters from the device's NVM (humidity ones are 0 on a BMP280)."""

    dig_T1: int
    dig_T2: int
    dig_T3: int
    dig_P1: int
    dig_P2: int
    dig_P3: int
    dig_P4: int
    dig_P5: int
    dig_P6: int
    dig_P7: int
    dig_P8: int
    dig_P9: int
    dig_H1: int = 0
    dig_H2: int = 0
    dig_H3: int = 0
    dig_H4: int = 0
    dig_H5: int = 0
    dig_H6: int = 0

    @classmethod
    def from_registers(cls, tp: bytes, h: bytes | None = None) -> Calibration:
        """Decode ``0x88..0xA1`` (26 bytes) and, on a BME280, ``0xE1..0xE7`` (7 bytes)."""
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from("<HhhHhhhhhhhh", tp)
        if h is None:
            return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9)
        h2, h3, e4, e5, e6, h6 = struct.unpack_from("<hBBBBb", h)
        # dig_H4 and dig_H5 are signed 12-bit values sharing the nibbles of 0xE5.
        h4 = _signed12((e4 << 4) | (e5 & 0x0F))
        h5 = _signed12((e6 << 4) | (e5 >> 4))
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, tp[25], h2, h3, h4, h5, h6)


def _signed12(v: int) -> int:
    return v - 0x1000 if v & 0x800 else v


def compensate_temperature(cal: Calibration, adc_t: int) -> tuple[float, float]:
    """Degrees Celsius and ``t_fine`` (which pressure and humidity compensation need) from raw ``adc_T``."""
    var1 = (adc_t / 16384.0 - cal.dig_T1 / 1024.0) * cal.dig_T2
    var2 = (adc_t / 131072.0 - cal.dig_T1 / 8192.0) ** 2 * cal.dig_T3
    t_fine = var1 + var2
    return t_fine / 5120.0, t_fine


def compensate_pressure(cal: Calibration, adc_p: int, t_fine: float) -> float:
    """Pascal from raw ``adc_P``; 0.0 when the calibration would divide by zero."""
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * cal.dig_P6 / 32768.0
    var2 = var2 + var1 * cal.dig_P5 * 2.0
    var2 = var2 / 4.0 + cal.dig_P4 * 65536.0
    var1 = (cal.dig_P3 * var1 * var1 / 524288.0 + cal.dig_P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * cal.dig_P1
    if var1 == 0.0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = cal.dig_P9 * p * p / 2147483648.0
    var2 = p * cal.dig_P8 / 32768.0
    return p + (var1 + var2 + cal.dig_P7) / 16.0


def compensate_humidity(cal: Calibration, adc_h: int, t_fine: float) -> float:
    """Relative humidity in % (clamped to 0..100) from raw ``adc_H``."""
    h = t_fine - 76800.0
    h = (adc_h - (cal.dig_H4 * 64.0 + cal.dig_H5 / 16384.0 * h)) * (
        cal.dig_H2 / 65536.0 * (1.0 + cal.dig_H6 / 67108864.0 * h * (1.0 + cal.dig_H3 / 67108864.0 * h))
    )
    h = h * (1.0 - cal.dig_H1 * h / 524288.0)
    return min(max(h, 0.0), 100.0)


class Bme280Reading(NamedTuple):
    """One compensated measurement; ``humidity_pct`` is ``None`` on a BMP280."""

    temp_c: float
    pressure_pa: float
    humidity_pct: float | None


class Bme280:
    """A BME280 (or BMP280) at ``address`` on an open I²C bus: reset, calibrate and configure on creation.

    ``mode="forced"`` starts one conversion per :meth:`read` and sleeps until it is done (the datasheet's
    choice for sampling every few seconds); ``"normal"`` lets the device convert every ``standby_ms`` and
    reads the latest result. Raises :class:`Bme280Error` for a chip id that is neither, ``OSError`` when
    nothing answers at the address.
    """

    def __init__(
        self,
        bus: SMBusLike,
        address: int = 0x76,
        *,
        mode: Literal["forced", "normal"] = "forced",
        oversampling: int = 1,
        filter_coefficient: int = 0,
        standby_ms: float = 1000.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bus = bus
        self.address = address
        self.mode = mode
        self._sleep = sleep
        osrs = OVERSAMPLING[oversampling]
        chip_id = bus.read_byte_data(address, REG_CHIP_ID)
        if chip_id != BME280_CHIP_ID and chip_id not in BMP280_CHIP_IDS:
            raise Bme280Error(
                f"chip id {chip_id:#04x} at address {address:#04x} is neither a BME280 (0x60) nor a BMP280 (0x58)"
            )
        self.chip_id = chip_id
        self.has_humidity = chip_id == BME280_CHIP_ID
        bus.write_byte_data(address, REG_RESET, _RESET_WORD)
        self._wait(_STATUS_IM_UPDATE, 0.002)  # the reset copies the calibration NVM into registers
        tp = bytes(bus.read_i2c_block_data(address, REG_CALIB_TP, 26))
        h = bytes(bus.read_i2c_block_data(address, REG_CALIB_H, 7)) if self.has_humidity else None
        self.calibration = Calibration.from_registers(tp, h)
        # After a reset the device sleeps, the only mode in which writes to config are sure to take effect.
        bus.write_byte_data(address, REG_CONFIG, STANDBY_MS[float(standby_ms)] << 5 | FILTER[filter_coefficient] << 2)
        if self.has_humidity:
            bus.write_byte_data(address, REG_CTRL_HUM, osrs)  # takes effect with the next ctrl_meas write
        self._ctrl_meas = osrs << 5 | osrs << 2
        # Datasheet §9.1: maximum measurement time in ms with every measurement at the same oversampling.
        n = oversampling
        self.measure_s = (1.25 + 2.3 * n + (2.3 * n + 0.575) * (2 if self.has_humidity else 1)) / 1000.0
        if mode == "normal":
            bus.write_byte_data(address, REG_CTRL_MEAS, self._ctrl_meas | _MODE_NORMAL)
            self._sleep(self.measure_s)

    @property
    def model(self) -> str:
        return "BME280" if self.has_humidity else "BMP280"

    def _wait(self, bit: int, first_s: float, tries: int = 20) -> None:
        self._sleep(first_s)
        for _ in range(tries):
            if not self.bus.read_byte_data(self.address, REG_STATUS) & bit:
                return
            self._sleep(0.001)
        raise Bme280Error(f"{self.model} at {self.address:#04x} stays busy (status bit {bit:#04x})")

    def read(self) -> Bme280Reading:
        """One compensated measurement (a burst read, so all values come from the same conversion)."""
        if self.mode == "forced":
            self.bus.write_byte_data(self.address, REG_CTRL_MEAS, self._ctrl_meas | _MODE_FORCED)
            self._wait(_STATUS_MEASURING, self.measure_s)
        raw = self.bus.read_i2c_block_data(self.address, REG_DATA, 8 if self.has_humidity else 6)
        adc_p = raw[0] << 12 | raw[1] << 4 | raw[2] >> 4
        adc_t = raw[3] << 12 | raw[4] << 4 | raw[5] >> 4
        if adc_t == _SKIPPED_20BIT or adc_p == _SKIPPED_20BIT:
            raise Bme280Error(f"{self.model} at {self.address:#04x} returned no measurement (reset or brown-out?)")
        cal = self.calibration
        temp_c, t_fine = compensate_temperature(cal, adc_t)
        humidity: float | None = None
        if self.has_humidity:
            adc_h = raw[6] << 8 | raw[7]
            if adc_h != _SKIPPED_16BIT:
                humidity = compensate_humidity(cal, adc_h, t_fine)
        return Bme280Reading(temp_c, compensate_pressure(cal, adc_p, t_fine), humidity)
