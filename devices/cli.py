"""``factory-devices``: the fleet simulator and the Raspberry Pi agent.

    factory-devices simulate --broker 127.0.0.1:1883 --machines 20 --rate 1 --duration 60 --time-scale 60
    factory-devices agent --config /etc/factory-agent/pi-agent.toml
    factory-devices plant --machines 24 --days 3 --seed 1 --out plant.jsonl --faults faults.jsonl

``plant`` writes a generated plant (``devices/plant.py``) as a file for ``factory-gateway replay --input``
and its fault labels as JSON lines; ``--no-state`` leaves out the state channel, ``--sensors faulty`` sends
only each machine's faulty metric (single-sensor machines).

``simulate`` reports progress on stderr every ``--progress`` seconds. Bad arguments (and a bad agent
config) exit with status 2 and a message naming the option or key; a broker that cannot be reached
exits the simulator with 1 (the agent keeps buffering to disk instead).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TextIO

from devices.fleet import (
    BrokerAddress,
    Fleet,
    MqttPublisher,
    PublishError,
    fleet_layout,
    password_from_env,
    run_fleet,
)
from devices.machine import DEFAULT_FAULT_DURATION_S, SENSORS, FaultKind, FaultPlan, FaultRecord, ScheduledFault

__all__ = ["SimulationProgress", "build_parser", "main", "parse_fault_at"]

log = logging.getLogger("devices")


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _broker(text: str) -> BrokerAddress:
    try:
        return BrokerAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _topic_level(text: str) -> str:
    if not text or any(ch in text for ch in "/+#"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one MQTT topic level (non-empty, no '/', '+', '#')")
    return text


def _fault_kinds(text: str) -> tuple[FaultKind, ...]:
    kinds = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        try:
            kinds.append(FaultKind(name))
        except ValueError:
            allowed = ", ".join(k.value for k in FaultKind)
            raise argparse.ArgumentTypeError(f"unknown fault kind {name!r}; allowed: {allowed}") from None
    if not kinds:
        raise argparse.ArgumentTypeError("empty fault list")
    return tuple(dict.fromkeys(kinds))


def parse_fault_at(text: str) -> tuple[str, ScheduledFault]:
    """Parse ``MACHINE:KIND:SECONDS[:DURATION[:METRIC]]``.

    >>> parse_fault_at("m003:stuck:12:20:power_kw")
    ('m003', ScheduledFault(kind=<FaultKind.STUCK: 'stuck'>, at_s=12.0, duration_s=20.0, metric='power_kw'))
    """
    parts = text.split(":")
    if not 3 <= len(parts) <= 5:
        raise argparse.ArgumentTypeError(f"expected MACHINE:KIND:SECONDS[:DURATION[:METRIC]], got {text!r}")
    machine, kind_text, at_text, *rest = parts
    (kind,) = _fault_kinds(kind_text)
    try:
        at_s = float(at_text)
        duration = float(rest[0]) if rest and rest[0] else None
        return machine, ScheduledFault(kind, at_s, duration, rest[1] if len(rest) > 1 else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --fault-at {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands ``simulate`` and ``agent``)."""
    parser = argparse.ArgumentParser(
        prog="factory-devices",
        description="Simulated machine fleet and Raspberry Pi agent for factory-gateway.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{simulate,agent,plant}")

    sim = sub.add_parser("simulate", parents=[common], help="publish a simulated fleet of machines")
    sim.add_argument("--broker", type=_broker, default=BrokerAddress("127.0.0.1"), help="HOST:PORT")
    sim.add_argument("--machines", type=_positive(int), default=20, help="number of machines (default 20)")
    sim.add_argument("--rate", type=_positive(float), default=1.0, help="telemetry samples/s per machine")
    sim.add_argument("--duration", type=_positive(float), help="seconds to run (default: until SIGINT/SIGTERM)")
    sim.add_argument("--seed", type=int, default=0, help="RNG seed; same seed + times = same data")
    sim.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    sim.add_argument("--root", type=_topic_level, default="factory", help="topic root (default factory)")
    sim.add_argument("--client-id", help="MQTT client id (default factory-sim-<seed>)")
    sim.add_argument("--username")
    sim.add_argument("--password", help="or set FGW_DEVICES_PASSWORD")
    sim.add_argument("--tls-ca", type=Path, help="CA file; enables TLS")
    sim.add_argument("--time-scale", type=_positive(float), default=1.0, help="divide state dwell times by X")
    sim.add_argument("--count-every", type=_positive(float), default=5.0, help="seconds between count messages")
    sim.add_argument("--faults", type=_fault_kinds, help="random fault kinds: drift,spike,stuck,bearing_wear")
    sim.add_argument("--fault-rate", type=_non_negative, help="faults per machine per hour (default 1 with --faults)")
    sim.add_argument(
        "--fault-at",
        type=parse_fault_at,
        action="append",
        default=[],
        metavar="MACHINE:KIND:SECONDS[:DURATION[:METRIC]]",
        help="inject a fault SECONDS after start (repeatable)",
    )
    sim.add_argument("--fault-duration", type=_positive(float), help="seconds for random drift/stuck/bearing_wear")
    sim.add_argument("--sparkplug", action="store_true",
                     help="publish as a Sparkplug B edge node (machines are its devices) instead of the JSON contract")
    sim.add_argument("--sparkplug-node", help="edge node id with --sparkplug (default sim<seed>)")
    sim.add_argument("--fault-log", type=Path, help="write injected-fault ground truth as JSON lines")
    sim.add_argument("--waveform-hz", type=_positive(float), help="also send 1 s accel_g blocks at this rate")
    sim.add_argument("--waveform-every", type=_positive(float), default=10.0, help="seconds between blocks")
    sim.add_argument("--drain-timeout", type=_non_negative, default=10.0, help="seconds to wait for acks at exit")
    sim.add_argument("--progress", type=_non_negative, default=5.0, help="seconds between progress lines (0: none)")

    agent = sub.add_parser("agent", parents=[common], help="run the Raspberry Pi sensor agent")
    agent.add_argument("--config", type=Path, required=True, help="agent TOML file (see configs/pi-agent.toml)")

    plant = sub.add_parser("plant", parents=[common], help="write a generated plant as a replay file")
    plant.add_argument("--machines", type=_positive(int), default=24, help="number of machines (default 24)")
    plant.add_argument("--days", type=_positive(float), default=3.0, help="days from Monday 00:00 UTC (default 3)")
    plant.add_argument("--interval", type=_positive(float), default=10.0, help="seconds between samples (default 10)")
    plant.add_argument("--seed", type=_non_negative_int, default=1, help="RNG seed (default 1)")
    plant.add_argument("--no-state", action="store_true", help="leave out the state channel")
    plant.add_argument("--sensors", choices=SENSORS, default="all",
                       help="faulty: each machine sends only the metric its fault is on (single-sensor machines)")
    plant.add_argument("--out", type=Path, required=True, help="replay file (JSON lines of topic + payload)")
    plant.add_argument("--faults", type=Path, help="write the fault labels as JSON lines")
    return parser


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM (handlers only set the flag; the loop notices it)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


class SimulationProgress:
    """A progress line on ``stream`` every ``every_s`` seconds, written by a background thread.

    On a terminal the line is rewritten in place (carriage return); otherwise (a pipe, a log file,
    journald) every report is a line of its own. ``sent`` and ``faults`` are counted by the caller.

    >>> import io
    >>> progress = SimulationProgress(io.StringIO(), every_s=5, machines=20, clock=iter([0.0, 10.0]).__next__)
    >>> progress.sent, progress.faults = 4000, 1
    >>> progress.line()
    'elapsed 10 s, 4000 messages sent, 400.0 msg/s, 20 machines, 1 fault injected'
    """

    def __init__(
        self, stream: TextIO, every_s: float, machines: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.every_s = every_s
        self.machines = machines
        self.sent = 0
        self.faults = 0
        self._clock = clock
        self._start = self._last_at = clock()
        self._last_sent = 0
        self._tty = stream.isatty()
        self._width = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def line(self) -> str:
        """The current progress line; the rate is over the time since the previous line."""
        now = self._clock()
        sent = self.sent
        rate = (sent - self._last_sent) / max(now - self._last_at, 1e-9)
        self._last_at, self._last_sent = now, sent
        plural = "" if self.faults == 1 else "s"
        return (
            f"elapsed {now - self._start:.0f} s, {sent} messages sent, {rate:.1f} msg/s, "
            f"{self.machines} machines, {self.faults} fault{plural} injected"
        )

    def report(self) -> None:
        text = self.line()
        if self._tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.report()

    def __enter__(self) -> SimulationProgress:
        if self.every_s > 0:
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._tty and self._width:
            self.stream.write("\n")  # leave the last progress line in place
            self.stream.flush()


class _CountingFleet(Fleet):
    """The fleet, telling the progress line about each fault as it is recorded (when it ends)."""

    progress: SimulationProgress | None = None

    def finished_faults(self, *, closing: bool = False) -> list[FaultRecord]:
        records = super().finished_faults(closing=closing)
        if self.progress is not None:
            self.progress.faults += len(records)
        return records


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    specs = fleet_layout(args.machines)
    names = {s.name for s in specs}
    scheduled: dict[str, list[ScheduledFault]] = {}
    for machine, fault in args.fault_at:
        if machine not in names:
            parser.error(f"--fault-at: no machine {machine!r} (machines are {specs[0].name}..{specs[-1].name})")
        scheduled.setdefault(machine, []).append(fault)
    kinds = args.faults or ()
    if args.fault_rate and not kinds:
        kinds = tuple(FaultKind)
    rate = args.fault_rate if args.fault_rate is not None else (1.0 if args.faults else 0.0)
    durations = dict(DEFAULT_FAULT_DURATION_S)
    if args.fault_duration:
        durations.update({k: args.fault_duration for k in FaultKind if k is not FaultKind.SPIKE})
    plans = {s.name: FaultPlan(kinds, rate, tuple(scheduled.get(s.name, ())), durations) for s in specs}
    fleet = _CountingFleet(
        specs,
        args.seed,
        root=args.root,
        time_scale=args.time_scale,
        faults=plans,
        count_every_s=args.count_every,
    )
    from devices.sparkplug import SparkplugEdge

    edge: SparkplugEdge | None = None
    if args.sparkplug:
        if args.waveform_hz:
            parser.error("--waveform-hz: fixed-rate blocks have no Sparkplug form here; leave it out with --sparkplug")
        node = args.sparkplug_node or f"sim{args.seed}"
        edge = SparkplugEdge(specs[0].site, node, lambda t, p: publisher.publish(t, p, "sparkplug"))
    publisher = MqttPublisher(
        args.broker,
        args.client_id or f"factory-sim-{args.seed}",
        qos=args.qos,
        username=args.username,
        password=password_from_env(args.password),
        tls_ca=args.tls_ca,
        drain_timeout=args.drain_timeout,
        will=edge.death() if edge is not None else None,  # Sparkplug: NDEATH with this session's bdSeq
        commands=(edge.topic("NCMD"), edge.command) if edge is not None else None,
    )
    fault_log: IO[bytes] | None = None
    try:
        if args.fault_log is not None:
            fault_log = args.fault_log.open("wb")
        progress = SimulationProgress(sys.stderr, args.progress, len(specs))
        fleet.progress = progress

        def publish(topic: str, payload: bytes, channel: str) -> None:
            if edge is not None:
                edge.handle(topic, payload)
            else:
                publisher.publish(topic, payload, channel)
            progress.sent += 1

        with _stop_on_signals() as stop, publisher, progress:
            log.info("simulating %d machines at %g Hz on %s", len(specs), args.rate, args.broker)
            summary = run_fleet(
                fleet,
                publish,
                rate_hz=args.rate,
                duration_s=args.duration,
                stop=stop,
                waveform_hz=args.waveform_hz,
                waveform_every_s=args.waveform_every,
                fault_log=fault_log,
            )
            if edge is not None:  # a clean exit says so itself (the Will is for a crash)
                publisher.publish(*edge.death(), "sparkplug")
            summary.unacked = publisher.close()
            summary.dropped = publisher.dropped
    except PublishError as exc:
        print(f"factory-devices: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"factory-devices: cannot write fault log {args.fault_log}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        if fault_log is not None:
            fault_log.close()
    print(f"factory-devices: {summary.line()}", flush=True)
    return 0 if summary.unacked == 0 else 1


def _agent(args: argparse.Namespace) -> int:
    from devices.agent import AgentConfigError, load_config, run_agent

    try:
        cfg = load_config(args.config)
        with _stop_on_signals() as stop:
            sent = run_agent(cfg, stop)
    except AgentConfigError as exc:
        print(f"factory-devices: {exc}", file=sys.stderr)
        return 2
    print(f"factory-devices: agent took {sent} samples", flush=True)
    return 0


def _plant(args: argparse.Namespace) -> int:
    from devices.plant import PlantConfig, generate_plant, write_replay

    cfg = PlantConfig(machines=args.machines, days=args.days, interval_s=args.interval, seed=args.seed)
    plant = generate_plant(cfg)
    try:
        records = write_replay(plant, args.out, state_channel=not args.no_state, sensors=args.sensors)
        if args.faults is not None:
            args.faults.write_text(plant.faults_jsonl())
    except OSError as exc:
        print(f"factory-devices: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"factory-devices: {len(plant.specs)} machines x {plant.values.shape[2]} samples, {records} messages "
        f"to {args.out}, {len(plant.faults)} faults" + (f" to {args.faults}" if args.faults else ""),
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``factory-devices`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "simulate":
        return _simulate(args, parser)
    if args.command == "plant":
        return _plant(args)
    return _agent(args)


if __name__ == "__main__":
    sys.exit(main())
