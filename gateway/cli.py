"""Command line: arguments only; the work happens in :mod:`gateway.server`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from gateway import __version__
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

__all__ = ["main"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factory-gateway", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (SIGINT/SIGTERM drain and exit 0, "
                                     "SIGHUP reloads the config)")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="json: one JSON object per line (for journald/Loki/Elastic)")
    run.add_argument("--status-interval", type=_positive, default=5.0, metavar="S",
                     help="seconds between live status lines (on a terminal) and systemd STATUS updates")

    chk = sub.add_parser("check-config", help="validate a config file: exit 0 and 'ok', or 2 with the problems")
    chk.add_argument("--config", type=Path, required=True)
    chk.add_argument("--show", action="store_true", help="print the effective settings (secrets redacted)")

    rep = sub.add_parser("replay", help="feed a JSONL recording through decode/compute/encode")
    rep.add_argument("--config", type=Path, required=True)
    rep.add_argument("--input", type=Path, required=True, help='JSONL: {"topic": "...", "payload": {...}}')
    rep.add_argument("--sink", choices=["config", "stdout"], default="config",
                     help="stdout prints line protocol instead of writing it")
    det = sub.add_parser("detect", help="offline anomaly scores for NAB-format CSVs (timestamp,value)")
    det.add_argument("--input", type=Path, required=True, help="directory of CSVs (searched recursively)")
    det.add_argument("--output", type=Path, required=True, help="where <same relative path> CSVs are written")
    det.add_argument("--detector", default=None, help="one detector instead of the fused set")
    det.add_argument("--events", action="store_true",
                     help="the fused score only on rows where an anomaly point would be written, else 0")
    det.add_argument("--config", type=Path, default=None, help="a gateway config whose [detect] section to use")
    return p


def _load(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        return _detect(args)
    cfg = _load(args.config)
    if cfg is None:
        return 2
    setup_logging(cfg.gateway.log_level, getattr(args, "log_format", "text"))
    if args.command == "check-config":
        if args.show:
            print(json.dumps(cfg.redacted(), indent=2, default=str))
        print("ok")
        return 0
    if args.command in ("run", "replay"):
        from gateway.malloc import fix_mmap_threshold

        fix_mmap_threshold()  # a long-running process: freed batch temporaries go back to the system
    if args.command == "run":
        return asyncio.run(_run(cfg, args.config, args.status_interval))
    if args.command == "replay":
        return asyncio.run(_replay(cfg, args.input, args.sink))
    return 2


def _detect(args: argparse.Namespace) -> int:
    from gateway.detect.offline import DETECTOR_NAMES, run_detect

    if args.detector is not None and args.detector not in DETECTOR_NAMES:
        print(f"--detector: unknown {args.detector!r}; choose one of {', '.join(DETECTOR_NAMES)}", file=sys.stderr)
        return 2
    if not args.input.is_dir():
        print(f"--input: {args.input} is not a directory", file=sys.stderr)
        return 2
    detect = None
    if args.config is not None:
        cfg = _load(args.config)
        if cfg is None:
            return 2
        detect = cfg.detect
    n = run_detect(args.input, args.output, args.detector, events=args.events, config=detect)
    print(f"scored {n} files into {args.output}", file=sys.stderr)
    return 0 if n else 1


def setup_logging(level: str, fmt: str) -> None:
    """Human-readable lines on a terminal, or one JSON object per line (python-json-logger)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601, UTC
        ))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


async def _run(cfg: GatewayConfig, config_path: Path, status_interval_s: float) -> int:
    from gateway.deadletter import DeadLetterError
    from gateway.http import HttpListenError
    from gateway.server import Server
    from gateway.wal import WalError

    try:
        server = Server(cfg, config_path=config_path, status_interval_s=status_interval_s)
    except WalError as exc:
        print(f"buffer.dir: {exc}", file=sys.stderr)
        return 2
    except (DeadLetterError, OSError) as exc:
        print(f"deadletter.path: {exc}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    try:
        await server.run()
    except HttpListenError as exc:
        print(exc, file=sys.stderr)  # "http.listen: cannot listen on ...": the key, and why
        return 2
    return 0


async def _replay(cfg: GatewayConfig, path: Path, sink_name: str) -> int:
    from gateway.server import ReplayInputError, replay
    from gateway.sinks.stdout import StdoutSink

    if not path.is_file():
        print(f"--input: {path} does not exist", file=sys.stderr)
        return 2
    try:
        pipeline = await replay(cfg, path, sink=StdoutSink() if sink_name == "stdout" else None)
    except ReplayInputError as exc:
        print(f"--input: {exc}", file=sys.stderr)
        return 2
    s = pipeline.stats
    print(f"replayed {s.messages_in} messages, {s.points_in} points, {s.decode_errors} rejected", file=sys.stderr)
    return 0
