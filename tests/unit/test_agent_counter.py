"""GPIO part counter on gpiozero's mock pins, and the agent's count messages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Device, DigitalInputDevice
from gpiozero.pins.mock import MockFactory

from devices.agent import AgentConfig, DeviceAgent
from devices.partcounter import PartCounter
from gateway.schema import CountMessage

T0 = 1763900000.0


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    factory.close()
    Device.pin_factory = None


def pulse(factory: MockFactory, pin: int, n: int = 1, *, active_low: bool = True) -> None:
    p = factory.pin(pin)
    for _ in range(n):
        if active_low:
            p.drive_low()
            p.drive_high()
        else:
            p.drive_high()
            p.drive_low()


@pytest.mark.parametrize(
    ("parts", "rejects", "reject_pin", "expected"),
    [
        pytest.param(0, 0, None, (0, 0), id="nothing"),
        pytest.param(7, 0, None, (7, 7), id="no-reject-pin-good-is-total"),
        pytest.param(7, 2, 27, (7, 5), id="rejects"),
        pytest.param(1, 3, 27, (1, 0), id="more-rejects-than-parts-good-stays-0"),
    ],
)
def test_counts_parts_and_rejects(
    pins: MockFactory, parts: int, rejects: int, reject_pin: int | None, expected: tuple[int, int]
) -> None:
    counter = PartCounter(17, reject_pin, bounce_s=0)
    pulse(pins, 17, parts)
    if reject_pin is not None:
        pulse(pins, reject_pin, rejects)
    assert counter.read() == expected
    counter.close()


def test_pull_up_bounce_and_active_level(pins: MockFactory) -> None:
    counter = PartCounter(17, 27, pull_up=True, bounce_s=0.05)
    p = pins.pin(17)
    assert (p.pull, p.bounce, p.state) == ("up", 0.05, True)  # idles high through the internal pull-up
    p.drive_high()  # releasing the switch is no part
    assert counter.read() == (0, 0)
    counter.close()
    counter = PartCounter(17, pull_up=False, bounce_s=0)
    assert pins.pin(17).pull == "down"
    pulse(pins, 17, 3, active_low=False)
    assert counter.read() == (3, 3)
    counter.close()


def test_close_releases_the_pins(pins: MockFactory) -> None:
    PartCounter(17, 27).close()
    DigitalInputDevice(17).close()  # would raise GPIOPinInUse if still held
    DigitalInputDevice(27).close()


def _agent(tmp_path: Path, **counter: object) -> DeviceAgent:
    return DeviceAgent(
        AgentConfig.model_validate(
            {
                "device": {"site": "s", "area": "a", "line": "l", "machine": "pi", "interval_s": 1.0},
                "sensors": {"thermal": False, "loadavg": False, "w1": False},
                "counter": {"pin": 17, "bounce_s": 0, **counter},
                "buffer": {"path": str(tmp_path / "q.db")},
            }
        )
    )


def test_count_messages_on_change_and_every_interval(pins: MockFactory, tmp_path: Path) -> None:
    agent = _agent(tmp_path, reject_pin=27, interval_s=10.0)
    first = agent.count(T0)
    assert first == CountMessage(ts=T0, total=0, good=0)
    assert agent.count(T0 + 1) is None  # unchanged and not due
    pulse(pins, 17, 3)
    pulse(pins, 27)
    assert agent.count(T0 + 2) == CountMessage(ts=T0 + 2, total=3, good=2)
    assert agent.count(T0 + 3) is None
    assert agent.count(T0 + 11.8) is None
    assert agent.count(T0 + 12) == CountMessage(ts=T0 + 12, total=3, good=2)  # heartbeat, 10 s after the last
    agent.close()


def test_count_interval_defaults_to_the_sample_interval(pins: MockFactory, tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    ticks = [T0 + k * 1.0 + (0.02 if k % 2 else -0.02) for k in range(5)]  # a little clock jitter
    assert all(agent.count(t) is not None for t in ticks)
    agent.close()


def test_counter_that_cannot_start_is_logged_and_others_carry_on(
    pins: MockFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    squatter = DigitalInputDevice(17)
    with caplog.at_level(logging.ERROR, logger="devices.agent"):
        agent = _agent(tmp_path)
    assert agent.counter is None
    assert agent.count(T0) is None
    assert "counter: cannot watch GPIO17" in caplog.text
    assert "no count messages until it works" in caplog.text
    squatter.close()
    agent._counter_retry_at = 0.0  # skip the 60 s retry wait
    assert agent.count(T0 + 1) == CountMessage(ts=T0 + 1, total=0, good=0)
    agent.close()
