"""Linux sensor files on a Raspberry Pi: thermal zones, the load average and DS18B20 1-Wire probes.

Every reader takes its path, so tests point it at a fake sysfs tree in a temporary directory.

>>> metric_name("cpu-thermal"), metric_name("x86_pkg_temp"), metric_name("GPU Thermal")
('cpu_temp_c', 'x86_pkg_temp_c', 'gpu_thermal_temp_c')
>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> probe = Path(tmp.name) / "28-00000a1b2c3d"
>>> probe.mkdir()
>>> _ = (probe / "w1_slave").write_text("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\\n"
...                                     "72 01 4b 46 7f ff 0e 10 57 t=23125\\n")
>>> read_ds18b20(probe)
23.125
>>> tmp.cleanup()
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPU_ZONE_TYPE",
    "RateLimitedLog",
    "ThermalZone",
    "W1CrcError",
    "ds18b20_probes",
    "metric_name",
    "read_ds18b20",
    "read_loadavg",
    "read_millidegrees",
    "thermal_zones",
]

CPU_ZONE_TYPE = "cpu-thermal"

# DS18B20 reports 85 °C after a power-on reset before the first conversion: treat it as no reading.
_DS18B20_RESET_MILLI = 85000
_NOT_NAME = re.compile(r"[^a-z0-9]+")
_ZONE_NUMBER = re.compile(r"(\d+)$")


class W1CrcError(ValueError):
    """A DS18B20 reading failed the bus CRC check (noise, a long cable, a loose contact)."""


def metric_name(zone_type: str) -> str:
    """``<type>_temp_c`` for a thermal zone type, made a safe metric name; the CPU zone is ``cpu_temp_c``."""
    if zone_type == CPU_ZONE_TYPE:
        return "cpu_temp_c"
    stem = _NOT_NAME.sub("_", zone_type.lower()).strip("_").removesuffix("_temp") or "zone"
    return f"{stem}_temp_c"


@dataclass(frozen=True, slots=True)
class ThermalZone:
    """One ``/sys/class/thermal/thermal_zoneN`` directory and the metric it is published as."""

    number: int
    type: str
    temp_path: Path
    metric: str


def thermal_zones(root: Path) -> list[ThermalZone]:
    """Every ``thermal_zone*`` under ``root`` in numeric order, named by :func:`metric_name`.

    The zone of type ``cpu-thermal`` (else the first zone) is ``cpu_temp_c``; a zone whose name is taken
    already gets its number added (``acpitz_2_temp_c``). A zone without a readable ``type`` is ``zone<N>``.
    """
    found: list[tuple[int, Path, str]] = []
    for d in root.glob("thermal_zone*"):
        m = _ZONE_NUMBER.search(d.name)
        if m is None or not (d / "temp").exists():
            continue
        try:
            zone_type = (d / "type").read_text().strip()
        except OSError:
            zone_type = ""
        found.append((int(m.group(1)), d, zone_type or f"zone{m.group(1)}"))
    found.sort()
    cpu_index = next((i for i, (_, _, t) in enumerate(found) if t == CPU_ZONE_TYPE), 0)
    zones: list[ThermalZone] = []
    used: set[str] = set()
    for i, (number, d, zone_type) in enumerate(found):
        name = "cpu_temp_c" if i == cpu_index else metric_name(zone_type)
        if name in used or (i != cpu_index and name == "cpu_temp_c"):
            name = f"{name.removesuffix('_temp_c')}_{number}_temp_c"
        used.add(name)
        zones.append(ThermalZone(number, zone_type, d / "temp", name))
    return zones


def read_millidegrees(path: Path) -> float:
    """Degrees Celsius from a sysfs file holding millidegrees (``"48312\\n"``)."""
    return int(path.read_text().strip()) / 1000.0


def read_loadavg(path: Path) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages from ``/proc/loadavg``."""
    parts = path.read_text().split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def ds18b20_probes(root: Path) -> list[Path]:
    """The DS18B20 device directories (family code ``28-``) under ``/sys/bus/w1/devices``, sorted."""
    return sorted(p for p in root.glob("28-*") if p.is_dir())


def read_ds18b20(device: Path) -> float | None:
    """Degrees Celsius from a DS18B20 device directory; ``None`` for the 85 °C power-on value.

    Reads the ``temperature`` file when the kernel has it (5.x+: millidegrees; the driver checks the CRC
    and returns nothing when it fails), else ``w1_slave``, whose first line ends in ``YES`` when the CRC
    matched and whose second ends ``t=23125``. Raises :class:`W1CrcError` on a CRC failure, ``OSError``
    when the files cannot be read and ``ValueError`` when they hold something else.
    """
    temperature = device / "temperature"
    if temperature.exists():
        text = temperature.read_text().strip()
        if not text:
            raise W1CrcError(f"{temperature} is empty (the driver's CRC check failed)")
        milli = int(text)
    else:
        lines = (device / "w1_slave").read_text().strip().splitlines()
        if len(lines) < 2:
            raise ValueError(f"{device / 'w1_slave'}: expected two lines, got {len(lines)}")
        if not lines[0].strip().endswith("YES"):
            raise W1CrcError(f"{device / 'w1_slave'}: CRC check failed ({lines[0].strip()!r})")
        _, sep, value = lines[1].rpartition("t=")
        if not sep:
            raise ValueError(f"{device / 'w1_slave'}: no 't=' on the second line")
        milli = int(value.strip())
    if milli == _DS18B20_RESET_MILLI:
        return None
    return milli / 1000.0


class RateLimitedLog:
    """Log a recurring problem at most once per ``every_s`` per key, with the number of repeats in between.

    >>> lines = []
    >>> clock = iter([0.0, 1.0, 2.0, 61.0]).__next__
    >>> limited = RateLimitedLog(logging.getLogger("demo"), every_s=60, clock=clock)
    >>> limited.emit = lambda level, msg, *args: lines.append(msg % args)
    >>> for _ in range(4):
    ...     limited.warning("probe-a", "probe %s failed", "a")
    >>> lines
    ['probe a failed', 'probe a failed (2 more since the last report)']
    """

    def __init__(self, logger: logging.Logger, every_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time of last line, repeats since)

    def emit(self, level: int, msg: str, *args: object) -> None:
        self.logger.log(level, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            msg += " (%d more since the last report)"
            args = (*args, last[1])
        self.emit(level, msg, *args)
        self._last[key] = (now, 0)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.ERROR, key, msg, *args)
