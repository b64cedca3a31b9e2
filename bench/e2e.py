"""End-to-end benches against real servers: throughput ceiling vs gateway, columnar, latency.

Every measurement starts its own mosquitto and InfluxDB 1.x (``tests/servers.py``) in a temp dir and
stops them by pid; the gateway runs as ``python -m gateway run --config`` (``tests/gwproc.py``).
The broker runs with persistence off (identical for the ceiling and the gateway runs).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from publisher import (  # noqa: E402
    CountingSubscriber,
    PublishResult,
    RawPublisher,
    fixed_rate_messages,
    machine_topics,
    publish_mosquitto_pub,
    publish_parallel,
    telemetry_messages,
)

from tests.gwproc import GatewayProcess  # noqa: E402
from tests.servers import InfluxDB1, Mosquitto  # noqa: E402

POLL_S = 0.2
COLUMNAR_BATCH = 20000  # row 2 writes 1,000 points per message: larger writes, as in its earlier runs

# Publishes (topic, payload) messages to the broker on a port; returns once the broker acknowledged all.
Publish = Callable[[int, Sequence[tuple[str, bytes]]], PublishResult]


@dataclass
class Servers:
    broker: Mosquitto
    influx: InfluxDB1
    tmp: Path


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    tmp = Path(tempfile.mkdtemp(prefix="fgw-bench-"))
    broker = Mosquitto(tmp / "mosquitto", persistence=False)
    influx = InfluxDB1(tmp / "influxdb")
    try:
        broker.start()
        influx.start()
        yield Servers(broker, influx, tmp)
    finally:
        broker.stop()
        influx.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def gateway_config(srv: Servers, name: str, *, db: str, batch_size: int | None = None, flush_ms: int | None = None,
                   detect: bool = True, store_waveforms: bool = True, stats_interval_s: float = 10.0,
                   receive_maximum: int | None = None, read_coalesce_ms: float | None = None) -> Path:
    """A gateway config on the bench's servers; a setting left at None keeps the gateway's default."""
    d = srv.tmp / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / "gateway.toml"
    path.write_text(f"""
[gateway]
instance = "bench"
log_level = "INFO"
stats_interval_s = {stats_interval_s}
store_waveforms = {'true' if store_waveforms else 'false'}

[mqtt]
host = "127.0.0.1"
port = {srv.broker.port}
client_id = "bench-{name}"
fast_receive = {os.environ.get("BENCH_FAST_RECEIVE", "true")}
{_opt("receive_maximum", receive_maximum)}
{_opt("read_coalesce_ms", read_coalesce_ms)}
[influx]
url = "{srv.influx.url}"
database = "{db}"
{_opt("batch_size", batch_size)}
{_opt("flush_interval_ms", flush_ms)}

[buffer]
dir = "{d / 'wal'}"

[deadletter]
path = "{d / 'deadletter.jsonl'}"

[detect]
enabled = {'true' if detect else 'false'}
""")
    return path


def _opt(key: str, value: float | None) -> str:
    return "" if value is None else f"{key} = {value}"


def _count(influx: InfluxDB1, db: str, measurement: str, field: str) -> int:
    try:
        return influx.count(measurement, db, field)
    except Exception:  # the database may not exist yet
        return 0


def _last_stat(influx: InfluxDB1, db: str, field: str) -> int:
    try:
        rows = influx.query(f'SELECT last("{field}") FROM "gateway_stats"', db)
    except Exception:
        return 0
    return int(rows[0]["last"]) if rows and rows[0].get("last") is not None else 0


def wait_for(probe: Callable[[], int], target: int, timeout: float, every: float = POLL_S) -> tuple[int, float]:
    """Poll ``probe`` until it reaches ``target``; return (last value, wall time it was first seen there)."""
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        value = probe()
        if value >= target:
            return value, time.time()
        time.sleep(every)
    return value, time.time()


class Profiler:
    """``py-spy record`` on a pid for ``seconds`` (raw collapsed stacks), if py-spy is installed."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        if Path(exe).exists():
            self.proc = subprocess.Popen(
                [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--format", "raw",
                 "-o", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )

    def finish(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return summarise_profile(self.out)


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 2)[-1]
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    fmt = lambda d: [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"samples": total, "self_pct": fmt(own), "inclusive_pct": fmt(incl)}


# -- row 1 / row 2: throughput ---------------------------------------------------------------------------
def _publish(publish: Publish | None, procs: int) -> Publish:
    """``publish``, or by default the ``procs`` Python publisher processes."""
    return publish or functools.partial(publish_parallel, procs=procs)


def ceiling(srv: Servers, messages: list[tuple[str, bytes]], procs: int = 2,
            publish: Publish | None = None) -> dict[str, Any]:
    """The counting subscriber: messages/s from the first publish to the last message received.

    ``publish`` replaces the ``procs`` Python publisher processes (e.g. ``mosquitto_pub_publishers``).
    """
    n = len(messages)
    sub = CountingSubscriber(srv.broker.port, n).start()
    try:
        pub = _publish(publish, procs)(srv.broker.port, messages)
        got, nbytes, _first, last, cpu = sub.result(timeout=300)
    finally:
        sub.stop()
    elapsed = (last or time.time()) - pub.first_publish
    return {"messages": n, "received": got, "loss": n - got, "bytes": nbytes, "seconds": elapsed,
            "msgs_per_s": got / elapsed, "bytes_per_s": nbytes / elapsed, "publisher_msgs_per_s": pub.rate,
            "cpu_us_per_msg": cpu / max(got, 1) * 1e6}


def ceiling_mosquitto_sub(srv: Servers, messages: list[tuple[str, bytes]], procs: int = 2,
                          publish: Publish | None = None) -> dict[str, Any]:
    """``mosquitto_sub`` (C, QoS 1, persistent session): first publish to its exit after the last message."""
    n = len(messages)
    client = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.broker.port), "-i", "bench-c-live"]
    base = [*client, "-c", "-q", "1", "-t", "factory/#"]
    subprocess.run([*base, "-E"], stdout=subprocess.DEVNULL, check=True, timeout=30)  # the session: nothing is lost
    sub = subprocess.Popen([*base, "-C", str(n)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # connected (and not counted) before the first publish
        pub = _publish(publish, procs)(srv.broker.port, messages)
        sub.wait(timeout=300)
        last = time.time()
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        # a clean connect with the same id ends the session: the broker must not queue the later rows' messages
        subprocess.run([*client, "-t", "factory/#", "-E"], stdout=subprocess.DEVNULL, check=True, timeout=30)
    elapsed = last - pub.first_publish
    got = n if sub.returncode == 0 else 0
    return {"messages": n, "received": got, "loss": n - got, "seconds": elapsed, "msgs_per_s": got / elapsed,
            "publisher_msgs_per_s": pub.rate}


def gateway_throughput(srv: Servers, name: str, messages: list[tuple[str, bytes]], *, expect: int,
                       measurement: str, field: str, timeout: float = 180, procs: int = 2,
                       publish: Publish | None = None, profile: Path | None = None, **cfg: Any) -> dict[str, Any]:
    """Publish to a pre-subscribed gateway; time until InfluxDB holds ``expect`` points of ``field``.

    ``measurement="gateway_stats"`` waits instead for the gateway's own ``messages_in`` counter (used when
    a configuration writes nothing per message, e.g. fixed-rate blocks with ``store_waveforms = false``).
    """
    db = f"bench_{name}"
    conf = gateway_config(srv, name, db=db, **cfg)
    gw = GatewayProcess(conf)
    prof: Profiler | None = None
    try:
        gw.start("subscribed", timeout=30)
        if profile is not None and gw.proc is not None:
            prof = Profiler(gw.proc.pid, profile, seconds=timeout)
            time.sleep(0.5)  # let py-spy attach before the first publish
        if measurement == "gateway_stats":
            probe = lambda: _last_stat(srv.influx, db, field)  # noqa: E731
        else:
            probe = lambda: _count(srv.influx, db, measurement, field)  # noqa: E731
        cpu0 = _cpu_s(gw.proc.pid if gw.proc else 0)
        pub = _publish(publish, procs)(srv.broker.port, messages)
        got, seen = wait_for(probe, expect, timeout)
        cpu = _cpu_s(gw.proc.pid if gw.proc else 0) - cpu0
        elapsed = seen - pub.first_publish
        rss = _rss_kb(gw.proc.pid if gw.proc else 0)
    finally:
        prof_summary = prof.finish() if prof is not None else None
        code = gw.stop() if gw.proc is not None else None
    extra = {"profile": prof_summary} if prof_summary else {}
    return {**extra, "messages": len(messages), "expected_points": expect, "points": got, "loss": expect - got,
            "seconds": elapsed, "msgs_per_s": len(messages) / elapsed, "points_per_s": got / elapsed,
            "publisher_msgs_per_s": pub.rate, "gateway_exit": code, "gateway_rss_mb": rss / 1024,
            "cpu_us_per_msg": cpu / max(len(messages), 1) * 1e6}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# Row 1's tuned gateway: receive_maximum at the MQTT maximum lets the broker keep sending while a batch
# is in the WAL and InfluxDB (with 20,000 in flight it pauses until the batch's acks), and 10,000 points
# per batch halve the per-batch costs (fsync, HTTP write, detector kernel call) of the default 5,000.
TUNED = {"batch_size": 10000, "receive_maximum": 65535}

# Row 1's live publishers: the 2 Python raw-socket processes (``publish_parallel``), or the C client
# ``mosquitto_pub`` as issue 14 measured (``mosquitto_pub_publishers``: one process per machine by default).
PUBLISHERS = ("python", "mosquitto_pub")


def mosquitto_pub_publishers(workdir: Path, procs: int | None = None) -> Publish:
    """``publish_mosquitto_pub`` with its files under a fresh ``workdir/runN`` for each call."""
    runs = itertools.count()
    return lambda port, msgs: publish_mosquitto_pub(port, msgs, workdir / f"run{next(runs)}", procs)


def row_ingest(count: int, machines: int = 50, *, profile_dir: Path | None = None,
               publishers: Sequence[str] = ("python",), mosquitto_pub_procs: int | None = None) -> dict[str, Any]:
    """Row 1, live: counting paho subscriber and mosquitto_sub vs gateway (default, tuned, detect off).

    ``publishers`` picks the load generators (``PUBLISHERS``): with ``"python"`` the runs above; with
    ``"mosquitto_pub"`` the paho subscriber and the default gateway again, under ``mosquitto_pub`` processes
    (``mosquitto_pub_procs``, default one per machine), in ``out["live_mosquitto_pub"]``.
    """
    unknown = set(publishers) - set(PUBLISHERS)
    if unknown:
        raise ValueError(f"publishers: unknown {sorted(unknown)}; choose from {', '.join(PUBLISHERS)}")
    base = time.time() - 600
    msgs = telemetry_messages(count, machines, base)
    out: dict[str, Any] = {"count": count, "machines": machines, "payload_bytes": len(msgs[0][1]), "tuned": TUNED,
                           "publishers": list(publishers)}
    with servers() as srv:
        if "python" in publishers:
            out["ceiling"] = ceiling(srv, msgs)
            out["mosquitto_sub"] = ceiling_mosquitto_sub(srv, msgs)
            out["gateway"] = gateway_throughput(srv, "ingest", msgs, expect=count, measurement="telemetry",
                                                field="temp_c",
                                                profile=profile_dir / "ingest.pyspy.txt" if profile_dir else None)
            out["gateway_tuned"] = gateway_throughput(srv, "ingest_tuned", msgs, expect=count,
                                                      measurement="telemetry", field="temp_c", **TUNED)
            out["gateway_nodetect"] = gateway_throughput(srv, "ingest_nodetect", msgs, expect=count,
                                                         measurement="telemetry", field="temp_c", detect=False)
        if "mosquitto_pub" in publishers:
            mq = mosquitto_pub_publishers(srv.tmp / "mosquitto_pub", mosquitto_pub_procs)
            out["live_mosquitto_pub"] = {
                "processes": machines if mosquitto_pub_procs is None else min(mosquitto_pub_procs, machines),
                "ceiling": ceiling(srv, msgs, publish=mq),
                "gateway": gateway_throughput(srv, "ingest_mqpub", msgs, expect=count, measurement="telemetry",
                                              field="temp_c", publish=mq),
            }
    return out


def row_columnar(blocks_true: int, blocks_false: int, machines: int = 20, samples: int = 1000) -> dict[str, Any]:
    """Row 2: fixed-rate 1000-sample blocks; counting subscriber vs gateway with/without store_waveforms."""
    base = time.time() - 3600
    msgs = fixed_rate_messages(max(blocks_true, blocks_false), machines, base, samples)
    out: dict[str, Any] = {"machines": machines, "samples_per_message": samples,
                           "payload_bytes": len(msgs[0][1])}
    with servers() as srv:
        c = ceiling(srv, msgs[:blocks_false])
        c["samples_per_s"] = c["msgs_per_s"] * samples
        out["ceiling"] = c
        g = gateway_throughput(srv, "columnar_nowave", msgs[:blocks_false], expect=blocks_false,
                               measurement="gateway_stats", field="messages_in", store_waveforms=False,
                               stats_interval_s=0.2, batch_size=COLUMNAR_BATCH)
        g["samples_per_s"] = blocks_false * samples / g["seconds"]
        out["gateway_store_waveforms_false"] = g
        g = gateway_throughput(srv, "columnar_wave", msgs[:blocks_true], expect=blocks_true * samples,
                               measurement="telemetry", field="accel_g", store_waveforms=True, timeout=240,
                               batch_size=COLUMNAR_BATCH)
        g["samples_per_s"] = blocks_true * samples / g["seconds"]
        out["gateway_store_waveforms_true"] = g
        g = gateway_throughput(srv, "columnar_wave_nodetect", msgs[:blocks_true], expect=blocks_true * samples,
                               measurement="telemetry", field="accel_g", store_waveforms=True, detect=False,
                               batch_size=COLUMNAR_BATCH)
        g["samples_per_s"] = blocks_true * samples / g["seconds"]
        out["gateway_store_waveforms_true_nodetect"] = g
    return out


# -- row 4: latency --------------------------------------------------------------------------------------
def _paced_publish(port: int, rate: int, seconds: float, machines: int, stop_at: list[float]) -> int:
    """Publish ``rate`` msg/s in 10 ms ticks, each message's ``ts`` = its wall-clock publish time."""
    import orjson

    pub = RawPublisher(port, f"bench-paced-{time.monotonic_ns()}")
    topics = machine_topics(machines)
    per_tick = max(1, round(rate / 100))
    sent = 0
    t_start = time.monotonic()
    tick = 0
    while True:
        target = t_start + tick * 0.01
        now = time.monotonic()
        if now - t_start >= seconds:
            break
        if target > now:
            time.sleep(target - now)
        ts = round(time.time(), 6)
        msgs = []
        for j in range(per_tick):
            m = (sent + j) % machines
            body = orjson.dumps({"ts": ts, "seq": sent + j, "values": {"temp_c": 60.0 + (j % 7) * 0.1,
                                                                       "vib": 2.0}})
            msgs.append((topics[m], body))
        pub.send_now(pub.build(msgs))
        sent += per_tick
        tick += 1
    pub.wait_acked(sent)
    pub.close()
    stop_at.append(time.time())
    return sent


def latency_run(srv: Servers, name: str, *, rate: int, seconds: float, flush_ms: int, machines: int = 50,
                poll_s: float = 0.05, sample_machines: int = 5) -> dict[str, Any]:
    db = f"bench_{name}"
    conf = gateway_config(srv, name, db=db, flush_ms=flush_ms, batch_size=5000)
    gw = GatewayProcess(conf)
    seen: dict[tuple[str, int], float] = {}
    poll_times: list[float] = []
    try:
        gw.start("subscribed", timeout=30)
        stop_at: list[float] = []
        sent_box: list[int] = []
        t = threading.Thread(target=lambda: sent_box.append(
            _paced_publish(srv.broker.port, rate, seconds, machines, stop_at)), daemon=True)
        t.start()
        # InfluxDB makes one write visible series by series, not atomically: a poll can see machine A's
        # newest points before machine B's older ones. So keep a watermark per machine and re-read from
        # the oldest watermark; to keep the poller light, follow a sample of machines only.
        sample = [topic.split("/")[4] for topic in machine_topics(machines)[:sample_machines]]
        marks = dict.fromkeys(sample, int((time.time() - 5) * 1e9))
        regex = "^(" + "|".join(sample) + ")$"
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            q0 = time.perf_counter()
            try:
                rows = srv.influx.query(
                    f'SELECT "temp_c" FROM "telemetry" WHERE "machine" =~ /{regex}/ '
                    f'AND time > {min(marks.values())} GROUP BY "machine"', db)
            except Exception:
                rows = []
            now = time.time()
            poll_times.append(time.perf_counter() - q0)
            for r in rows:
                key = (r["machine"], r["time"])
                if key not in seen:
                    seen[key] = now
                    marks[r["machine"]] = max(marks[r["machine"]], r["time"])
            expected = sent_box[0] * sample_machines // machines if sent_box else -1
            if not t.is_alive() and sent_box and len(seen) >= expected:
                break
            time.sleep(max(0.0, poll_s - (time.perf_counter() - q0)))
        t.join(timeout=10)
        stored = _count(srv.influx, db, "telemetry", "temp_c")
        missed = sorted(k[1] for k in _all_points(srv.influx, db) if k[0] in marks and k not in seen)
    finally:
        gw.stop()
    import numpy as np

    lat = np.array([v - k[1] / 1e9 for k, v in seen.items()]) * 1000
    sent = sent_box[0] if sent_box else 0
    return {"rate": rate, "seconds": seconds, "flush_interval_ms": flush_ms, "sent": sent,
            "sampled_machines": sample_machines, "seen": len(seen),
            "loss": sent - stored, "stored": stored, "missed_by_poller": len(missed),
            "missed_first_last_ns": [missed[0], missed[-1]] if missed else None,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None, "poll_interval_ms": poll_s * 1000,
            "poll_query_ms_median": float(np.median(poll_times) * 1000) if poll_times else None}


def _all_points(influx: InfluxDB1, db: str) -> list[tuple[str, int]]:
    rows = influx.query('SELECT "temp_c" FROM "telemetry" GROUP BY "machine"', db)
    return [(r["machine"], r["time"]) for r in rows]


def row_latency(seconds: float, rate: int = 5000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with servers() as srv:
        from gateway.config import InfluxConfig

        default = int(InfluxConfig.model_fields["flush_interval_ms"].default)
        for flush in (default, 500):
            out[f"flush_{flush}"] = latency_run(srv, f"latency_{flush}", rate=rate, seconds=seconds, flush_ms=flush)
    return out
