"""A part counter on GPIO: one pulse per part from a switch or sensor, optionally one per reject.

gpiozero watches the pins (edge callbacks in its own thread, with debouncing); the counter only adds up.
Tests swap in gpiozero's mock pins, so no hardware is needed:

>>> from gpiozero import Device
>>> from gpiozero.pins.mock import MockFactory
>>> Device.pin_factory = MockFactory()
>>> counter = PartCounter(17, reject_pin=27, bounce_s=None)
>>> for pin in (17, 17, 27):
...     Device.pin_factory.pin(pin).drive_low()
...     Device.pin_factory.pin(pin).drive_high()
>>> counter.read()
(2, 1)
>>> counter.close()
>>> Device.pin_factory.close()
>>> Device.pin_factory = None
"""

from __future__ import annotations

import threading

from gpiozero import DigitalInputDevice  # type: ignore[import-untyped]

__all__ = ["PartCounter"]


class PartCounter:
    """Cumulative ``(total, good)`` from a parts pin and an optional rejects pin (BCM numbers).

    With ``pull_up=True`` (the default) each pin idles high through the Pi's internal pull-up and a part
    is a switch closing to GND (active low); with ``pull_up=False`` it idles low and a part drives it high.
    ``good = total - rejects``, never below zero.
    """

    def __init__(
        self, pin: int, reject_pin: int | None = None, *, pull_up: bool = True, bounce_s: float | None = 0.01
    ) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._rejects = 0
        self._devices: list[DigitalInputDevice] = []
        try:
            parts = DigitalInputDevice(pin, pull_up=pull_up, bounce_time=bounce_s or None)
            self._devices.append(parts)
            parts.when_activated = self._part
            if reject_pin is not None:
                rejects = DigitalInputDevice(reject_pin, pull_up=pull_up, bounce_time=bounce_s or None)
                self._devices.append(rejects)
                rejects.when_activated = self._reject
        except BaseException:
            self.close()
            raise

    def _part(self) -> None:
        with self._lock:
            self._total += 1

    def _reject(self) -> None:
        with self._lock:
            self._rejects += 1

    def read(self) -> tuple[int, int]:
        """``(total, good)`` since the counter was created."""
        with self._lock:
            return self._total, max(self._total - self._rejects, 0)

    def close(self) -> None:
        """Release the pins."""
        for dev in self._devices:
            dev.close()
        self._devices.clear()
