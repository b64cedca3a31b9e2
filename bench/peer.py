"""A peer on workload 1: HARDWARIO's ``mqtt2influxdb`` bridge (PyPI) into the same mosquitto + InfluxDB 1.x.

Installed into a throwaway venv under /tmp (never the project venv). Version 1.5.2 is the last one that
writes to InfluxDB 1.x (it uses the ``influxdb`` 5.x client); 2.x writes through ``influxdb3-python``
to InfluxDB 3 only. What the bridge does, and why the bench configures it as it does:

* subscribes at QoS 0 (no durability: a message is gone once delivered), one synchronous HTTP write
  per message;
* stamps every point with the arrival time truncated to the second (payload timestamps cannot be
  used), so two samples of one machine within a second overwrite each other; the bench adds ``seq`` as
  a tag so that each message is a distinct point and the zero-loss count is meaningful.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VENV = Path("/tmp/fgw-bench-peer-venv")
PACKAGE = "mqtt2influxdb==1.5.2"


def ensure_venv() -> tuple[Path | None, str]:
    """Create the venv and install the peer if missing; return (executable, note or error text)."""
    exe = VENV / "bin" / "mqtt2influxdb"
    if exe.exists():
        return exe, "reused"
    base = getattr(sys, "_base_executable", None) or "python3"
    steps = [[base, "-m", "venv", str(VENV)],
             [str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", PACKAGE]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if res.returncode != 0:
            err = "\n".join(ln for ln in (res.stderr + res.stdout).splitlines() if "is ignored" not in ln)
            return None, f"{' '.join(cmd)} failed ({res.returncode}): {err[-800:]}"
    return (exe, "installed") if exe.exists() else (None, f"{exe} missing after install")


def config_yaml(broker_port: int, influx_port: int, db: str) -> str:
    return f"""mqtt:
  host: 127.0.0.1
  port: {broker_port}
influxdb:
  host: 127.0.0.1
  port: {influx_port}
  database: {db}
points:
  - measurement: telemetry
    topic: factory/+/+/+/+/telemetry
    fields:
      temp_c: $.payload.values.temp_c
      vib: $.payload.values.vib
    tags:
      site: $.topic[1]
      area: $.topic[2]
      line: $.topic[3]
      machine: $.topic[4]
      seq: $.payload.seq
"""


def run_peer(srv: Any, messages: list[tuple[str, bytes]], *, timeout: float = 90) -> dict[str, Any]:
    """Publish ``messages`` to a pre-subscribed peer; time until InfluxDB holds one point per message."""
    from e2e import _count, wait_for
    from publisher import publish_parallel

    from tests.servers import stop_process

    exe, note = ensure_venv()
    if exe is None:
        return {"error": note}
    d = srv.tmp / "peer"
    d.mkdir(parents=True, exist_ok=True)
    db = "bench_peer"
    cfg = d / "mqtt2influxdb.yml"
    cfg.write_text(config_yaml(srv.broker.port, srv.influx.port, db))
    log = d / "peer.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(exe), "-c", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "subscribe " not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                return {"error": f"mqtt2influxdb did not subscribe (exit {proc.poll()}): "
                                 f"{log.read_text(errors='replace')[-800:]}"}
            time.sleep(0.05)
        time.sleep(0.3)  # it logs before the SUBSCRIBE is acknowledged
        pub = publish_parallel(srv.broker.port, messages, procs=2)
        n = len(messages)
        got, seen = wait_for(lambda: _count(srv.influx, db, "telemetry", "temp_c"), n, timeout, every=0.5)
        elapsed = seen - pub.first_publish
    finally:
        stop_process(proc, signal.SIGINT)
    errors = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln or "Traceback" in ln]
    return {"package": PACKAGE, "venv": str(VENV), "venv_note": note, "messages": n, "points": got,
            "loss": n - got, "seconds": elapsed, "msgs_per_s": got / elapsed, "publisher_msgs_per_s": pub.rate,
            "timed_out": got < n, "log_errors": errors[:5]}
