"""The benchmark suite: one command, a table of ratios against baselines measured in the same run.

``make bench`` runs ``.venv/bin/python bench/run.py``: it starts its own mosquitto and InfluxDB 1.x on
free loopback ports (``tests/servers.py``), runs the gateway as a subprocess, prints a table and writes
``bench/results.json`` (every absolute figure, the machine description, and the profile if asked).

Rows (``--only`` takes names or numbers, comma-separated):

1. ``ingest``   one-sample JSON telemetry, QoS 1, 50 machines: gateway into InfluxDB (default config and a
                tuned one, detect on) vs a counting paho subscriber and ``mosquitto_sub``, live (publishers
                running) and as the drain of a queued backlog (``bench/ingest.py``); live with 2 Python
                publisher processes and/or one ``mosquitto_pub`` per machine (``--publishers``)
2. ``columnar`` 1000-sample fixed-rate blocks: samples/s, ``store_waveforms`` true and false
3. ``encode``   ``LineProtocolEncoder.telemetry`` vs influxdb-client ``Point`` (and an f-string loop)
4. ``latency``  publish → visible in InfluxDB at 5,000 msg/s, flush_interval_ms at the default (200) and 500
5. ``memory``   RSS with detector state for 10,000 machines × 8 metrics
6. ``peer``     HARDWARIO ``mqtt2influxdb`` 1.5.2 on workload 1 (throwaway venv under /tmp)
7. ``crash``    checkpoint size / copy / write for 10,000 machines × 8 metrics, restore, restart-to-ready with
   a WAL backlog to re-compute (extrapolated to 1 GiB)
8. ``sparkplug`` Sparkplug B DDATA, 20 aliased metrics per message, drained from a queued backlog: the gateway
   (host application) into InfluxDB vs a counting paho subscriber (``bench/sparkplug.py``)
9. ``page``     the operator's page in headless chromium: first render with 2,000 machines vs the 1-machine
   page (``bench/page.py``)

Usage: ``python bench/run.py [--only ingest,encode] [--quick] [--publishers python,mosquitto_pub]
[--profile DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

ROWS = ("ingest", "columnar", "encode", "latency", "memory", "peer", "crash", "sparkplug", "page")

FULL = {"ingest": 200_000, "backlog": 100_000, "backlog_rounds": 3, "blocks_false": 10_000, "blocks_true": 600,
        "latency_s": 20.0, "mem_rounds": 5, "mem_per": 10, "peer": 5_000, "encode_rows": 200_000,
        "ckpt_machines": 10_000, "ckpt_rounds": 3, "ckpt_backlog_rounds": 3, "spb": 50_000, "spb_rounds": 3,
        "page_rounds": 5}
QUICK = {"ingest": 40_000, "backlog": 40_000, "backlog_rounds": 1, "blocks_false": 2_000, "blocks_true": 150,
         "latency_s": 6.0, "mem_rounds": 2, "mem_per": 25, "peer": 1_000, "encode_rows": 50_000,
         "ckpt_machines": 10_000, "ckpt_rounds": 1, "ckpt_backlog_rounds": 1, "spb": 20_000, "spb_rounds": 1,
         "page_rounds": 2}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                                  if ln.startswith("model name")), "?")
    except OSError:
        info["cpu_model"] = "?"
    info["cores"] = os.cpu_count()
    info["cores_usable"] = len(os.sched_getaffinity(0))
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
        info["ram_gb"] = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    import numpy as np

    info["numpy"] = np.__version__
    try:
        cfg = np.show_config(mode="dicts")
        info["blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:
        pass
    info["blas_env"] = {k: v for k, v in os.environ.items()
                        if k.startswith(("OPENBLAS", "OMP_", "MKL_")) or k == "GOTO_NUM_THREADS"} or "unset"
    for binary, args in (("mosquitto", ["-h"]), ("influxd", ["version"])):
        try:
            out = subprocess.run([f"/usr/sbin/{binary}" if binary == "mosquitto" else binary, *args],
                                 capture_output=True, text=True, timeout=10)
            first = (out.stdout or out.stderr).splitlines()
            info[binary] = first[0].strip() if first else "?"
        except (OSError, subprocess.TimeoutExpired):
            info[binary] = "not found"
    return info


def row(name: str, what: str, value: float | None, unit: str, baseline: float | None, baseline_what: str,
        ratio: float | None, target: str, ok: bool | None, note: str = "") -> dict[str, Any]:
    return {"row": name, "what": what, "value": value, "unit": unit, "baseline": baseline,
            "baseline_what": baseline_what, "ratio": ratio, "target": target,
            "status": "-" if ok is None else ("PASS" if ok else "MISS"), "note": note}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- the rows ---------------------------------------------------------------------------------------------
def run_ingest(sz: dict[str, Any], profile: Path | None, raw: dict[str, Any],
               publishers: list[str], mosquitto_pub_procs: int | None = None) -> list[dict[str, Any]]:
    import e2e
    import ingest

    r = e2e.row_ingest(sz["ingest"], profile_dir=profile, publishers=publishers,
                       mosquitto_pub_procs=mosquitto_pub_procs)
    b = ingest.row_backlog(sz["backlog"], rounds=sz["backlog_rounds"], gateways={"default": {}, "tuned": e2e.TUNED})
    raw["ingest"] = r
    raw["ingest_backlog"] = b
    live = _ingest_live_python(r) if "python" in publishers else []
    live += _ingest_live_mosquitto_pub(r) if "mosquitto_pub" in publishers else []
    return live + _ingest_backlog(b)


def _ingest_live_python(r: dict[str, Any]) -> list[dict[str, Any]]:
    import e2e

    c, m, g, t, n = r["ceiling"], r["mosquitto_sub"], r["gateway"], r["gateway_tuned"], r["gateway_nodetect"]
    paho, mq = c["msgs_per_s"], m["msgs_per_s"]
    tuned = ", ".join(f"{k} {v}" for k, v in e2e.TUNED.items())
    loss = (f"loss: paho {c['loss']}, mosquitto_sub {m['loss']}, gateway {g['loss']}, tuned {t['loss']}, "
            f"no-detect {n['loss']} (points counted in InfluxDB)")
    return [
        row("1 ingest", f"live: gateway msgs/s ({r['count']:,} msgs, default config, detect on)", g["msgs_per_s"],
            "msg/s", paho, "paho counting subscriber", _div(g["msgs_per_s"], paho), ">= 2x",
            g["loss"] == 0 and g["msgs_per_s"] >= 2 * paho, loss),
        row("1 ingest", f"live: gateway tuned ({tuned})", t["msgs_per_s"], "msg/s", paho,
            "paho counting subscriber", _div(t["msgs_per_s"], paho), "- (info)", None if t["loss"] == 0 else False),
        row("1 ingest", "live: gateway, [detect] enabled = false", n["msgs_per_s"], "msg/s", paho,
            "paho counting subscriber", _div(n["msgs_per_s"], paho), "- (info)", None if n["loss"] == 0 else False),
        row("1 ingest", "live: mosquitto_sub (C, QoS 1), the broker's pace", mq, "msg/s", paho,
            "paho counting subscriber", _div(mq, paho), "- (info)", None),
        row("1 ingest", "live: gateway (default) vs mosquitto_sub", g["msgs_per_s"], "msg/s", mq, "mosquitto_sub",
            _div(g["msgs_per_s"], mq), "- (goal 0.5x)", None),
        row("1 ingest", "live: publisher alone (PUBACKed msgs/s, subscriber attached)", c["publisher_msgs_per_s"],
            "msg/s", paho, "paho counting subscriber", _div(c["publisher_msgs_per_s"], paho),
            "> 1x (not the bottleneck)", c["publisher_msgs_per_s"] > paho),
        row("1 ingest", "live: the publishers while the gateway (default) subscribes", g["publisher_msgs_per_s"],
            "msg/s", paho, "paho counting subscriber", _div(g["publisher_msgs_per_s"], paho), "- (info: the ceiling "
            "the gateway shares)", None),
        row("1 ingest", "live: gateway (default) CPU per message (user + system, all threads)", g["cpu_us_per_msg"],
            "us", c["cpu_us_per_msg"], "paho counting subscriber's CPU per message",
            _div(g["cpu_us_per_msg"], c["cpu_us_per_msg"]), "- (info: < 1x is less)", None),
    ]


def _ingest_live_mosquitto_pub(r: dict[str, Any]) -> list[dict[str, Any]]:
    x = r["live_mosquitto_pub"]
    c, g = x["ceiling"], x["gateway"]
    paho, pubs = c["msgs_per_s"], f"{x['processes']} mosquitto_pub"
    owns = ("one machine's topic each" if x["processes"] >= r["machines"]
            else "each owns whole machines, published one topic after another (+0.2 s per topic)")
    return [
        row("1 ingest", f"live, {pubs}: gateway msgs/s ({r['count']:,} msgs, default config, detect on)",
            g["msgs_per_s"], "msg/s", paho, f"paho counting subscriber, {pubs}", _div(g["msgs_per_s"], paho),
            ">= 2x", g["loss"] == 0 and g["msgs_per_s"] >= 2 * paho,
            f"loss: paho {c['loss']}, gateway {g['loss']} (points counted in InfluxDB); "
            f"C publishers (mosquitto_pub -q 1 -l), {owns}"),
        row("1 ingest", f"live, {pubs}: publishers alone (start to last exit, subscriber attached)",
            c["publisher_msgs_per_s"], "msg/s", paho, f"paho counting subscriber, {pubs}",
            _div(c["publisher_msgs_per_s"], paho), "> 1x (not the bottleneck)", c["publisher_msgs_per_s"] > paho,
            "a mosquitto_pub exits after its last PUBACK and a fixed 100 ms sleep"),
    ]


def _ingest_backlog(b: dict[str, Any]) -> list[dict[str, Any]]:
    import e2e

    tuned = ", ".join(f"{k} {v}" for k, v in e2e.TUNED.items())
    med, bl = b["median"], b["loss"]
    bpaho, bg, bt = med["paho"], med["gateway_default"], med["gateway_tuned"]
    rounds = f"median of {len(b['rounds']['paho'])} rounds"
    return [
        row("1 ingest", f"backlog: gateway drains {b['messages']:,} queued, default config", bg, "msg/s", bpaho,
            "paho draining the same backlog", _div(bg, bpaho), ">= 2x",
            bl["gateway_default"] == 0 and bg >= 2 * bpaho,
            f"{rounds}; loss default {bl['gateway_default']}, tuned {bl['gateway_tuned']} (points in InfluxDB); "
            "timed from the gateway's 'fast receive on' log line (the CONNACK) to the last point in InfluxDB"),
        row("1 ingest", f"backlog: gateway tuned ({tuned})", bt, "msg/s", bpaho, "paho draining the same backlog",
            _div(bt, bpaho), "- (info)", None if bl["gateway_tuned"] == 0 else False),
        row("1 ingest", "backlog: mosquitto_sub drains the same backlog", med["mosquitto_sub"], "msg/s", bpaho,
            "paho draining the same backlog", _div(med["mosquitto_sub"], bpaho), "- (info)", None),
        row("1 ingest", "backlog: gateway (default) vs mosquitto_sub", bg, "msg/s", med["mosquitto_sub"],
            "mosquitto_sub", _div(bg, med["mosquitto_sub"]), "- (goal 0.5x)", None),
    ]


def run_columnar(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    import e2e

    r = e2e.row_columnar(sz["blocks_true"], sz["blocks_false"])
    raw["columnar"] = r
    c = r["ceiling"]
    f, t = r["gateway_store_waveforms_false"], r["gateway_store_waveforms_true"]
    n = r["gateway_store_waveforms_true_nodetect"]
    return [
        row("2 columnar", "store_waveforms=false samples/s (decode + window features)",
            f["samples_per_s"], "sample/s", c["samples_per_s"], "paho counting subscriber",
            _div(f["samples_per_s"], c["samples_per_s"]), ">= 3M sample/s",
            f["loss"] == 0 and f["samples_per_s"] >= 3e6, f"loss {f['loss']} msgs"),
        row("2 columnar", "store_waveforms=true samples/s (every sample a point)", t["samples_per_s"],
            "sample/s", c["samples_per_s"], "paho counting subscriber",
            _div(t["samples_per_s"], c["samples_per_s"]), "- (info: InfluxDB ingest bound)",
            None, f"loss {t['loss']} points; every raw sample is a line-protocol point"),
        row("2 columnar", "store_waveforms=true, [detect] enabled = false", n["samples_per_s"],
            "sample/s", c["samples_per_s"], "paho counting subscriber",
            _div(n["samples_per_s"], c["samples_per_s"]), "- (info: InfluxDB ingest bound)",
            None, f"loss {n['loss']} points"),
    ]


def run_encode(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    import encode

    r = encode.run(sz["encode_rows"])
    raw["encode"] = r
    return [
        row("3 encode", f"LineProtocolEncoder.telemetry rows/s ({r['rows']:,} rows)", r["ours_rows_per_s"],
            "row/s", r["point_rows_per_s"], "influxdb-client Point", r["ratio_vs_point"], ">= 5x",
            r["ratio_vs_point"] >= 5, f"outputs equal on {r['checked_rows']:,} rows"),
        row("3 encode", "same, vs naive f-string loop", r["ours_rows_per_s"], "row/s", r["naive_rows_per_s"],
            "f-string per row", r["ratio_vs_naive"], "-", None),
    ]


def run_latency(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    import e2e

    r = e2e.row_latency(sz["latency_s"])
    raw["latency"] = r
    out = []
    for i, key in enumerate(r):  # the first run uses the default flush_interval_ms; the others are info
        x = r[key]
        note = (f"p50 {x['p50_ms']:.0f} ms, max {x['max_ms']:.0f} ms, {x['stored']}/{x['sent']} stored, "
                f"latency of {x['seen']} msgs of {x['sampled_machines']} machines ({x['missed_by_poller']} missed), "
                f"poll every 50 ms (+{x['poll_query_ms_median']:.0f} ms query)") if x["p99_ms"] else "no data"
        out.append(row("4 latency", f"p99 publish->visible, 5k msg/s, flush_interval_ms={x['flush_interval_ms']}",
                       x["p99_ms"], "ms", float(x["flush_interval_ms"]), "flush_interval_ms",
                       _div(x["p99_ms"], x["flush_interval_ms"]), "p99 <= 500 ms" if i == 0 else "- (info)",
                       (x["p99_ms"] is not None and x["p99_ms"] <= 500 and x["loss"] == 0) if i == 0 else None,
                       note))
    return out


def run_memory(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    out, res = [], []
    for bs in (5000, 20000):
        cmd = [sys.executable, str(BENCH / "memory.py"), "--rounds", str(sz["mem_rounds"]),
               "--per", str(sz["mem_per"]), "--batch-size", str(bs)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=REPO)
        m = json.loads(p.stdout.strip().splitlines()[-1])
        res.append(m)
        out.append(row("5 memory", f"RSS, {m['machines']:,} machines x {m['metrics']} metrics, batch_size {bs}",
                       m["rss_after_mb"], "MB", m["rss_baseline_mb"], "RSS after imports",
                       _div(m["rss_after_mb"], m["rss_baseline_mb"]), "<= 200 MB", m["rss_after_mb"] <= 200,
                       f"{m['series']:,} series; after malloc_trim {m['rss_after_malloc_trim_mb']:.0f} MB; "
                       f"OEE state for {m['oee_machines']:,} machines"))
    raw["memory"] = res
    return out


# Targets for the crash row. A Raspberry Pi's SD card writes 10-20 MB/s: a checkpoint every 60 s may keep
# the card busy a quarter of the time at most (size <= 150 MB at 10 MB/s); the copy taken between two
# batches is a pause of the event loop (<= 0.5 s here, ~4x on a Pi: one batch later, once a minute);
# restart-to-ready must stay well inside systemd's 90 s start timeout even with 1 GiB to re-compute.
CKPT_MAX_BYTES = 150e6
CKPT_MAX_COPY_S = 0.5
CKPT_MAX_RESTORE_S = 10.0
CKPT_MAX_READY_1GIB_S = 45.0
SD_CARD_BYTES_PER_S = 10e6


def run_crash(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(BENCH / "checkpoint.py"), "--machines", str(sz["ckpt_machines"]),
           "--rounds", str(sz["ckpt_rounds"]), "--backlog-rounds", str(sz["ckpt_backlog_rounds"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True, cwd=REPO)
    m = json.loads(p.stdout.strip().splitlines()[-1])
    raw["crash"] = m
    size, sd_s = m["checkpoint_bytes"], m["checkpoint_bytes"] / SD_CARD_BYTES_PER_S
    what = f"{m['machines']:,} machines x {m['metrics']} metrics ({m['series']:,} series)"
    backlog = f"{m['backlog_bytes'] / 2**20:.0f} MiB backlog, {m['backlog_records']} records re-computed"
    return [
        row("7 crash", f"checkpoint size, {what}", size / 1e6, "MB", m["checkpoint_write_s"], "write s (here)",
            None, "<= 150 MB", size <= CKPT_MAX_BYTES,
            f"{size / m['series']:.0f} B/series; {sd_s:.0f} s on a 10 MB/s SD card (<= 1/4 of 60 s)"),
        row("7 crash", "checkpoint copy (event loop pause)", m["checkpoint_copy_s"], "s", None, "-", None,
            "<= 0.5 s", m["checkpoint_copy_s"] <= CKPT_MAX_COPY_S, f"{m['checkpoint_arrays']} arrays copied"),
        row("7 crash", "restore (load + check + restore, no backlog)", m["restore_s"], "s", None, "-", None,
            "<= 10 s", m["restore_s"] <= CKPT_MAX_RESTORE_S, ""),
        row("7 crash", f"restart-to-ready, {backlog}", m["ready_s"], "s", m["ready_s_1gib_extrapolated"],
            "1 GiB extrapolated (s)", None, "1 GiB <= 45 s", m["ready_s_1gib_extrapolated"] <= CKPT_MAX_READY_1GIB_S,
            f"WAL scan {m['wal_open_s_per_mib'] * 1e3:.1f} ms/MiB (page cache; an SD card reads ~40 MB/s: "
            f"+26 s per GiB), re-compute {m['recompute_s_per_mib'] * 1e3:.1f} ms/MiB; WAL "
            f"{m['wal_bytes_per_sample']:.0f} B/sample, retained <= checkpoint_interval_s x that rate"),
        row("7 crash", "extra disk: records kept for one 60 s checkpoint interval, every series at 1 Hz",
            m["series"] * m["wal_bytes_per_sample"] * 60 / 1e6, "MB", m["wal_bytes_per_sample"], "WAL B/sample",
            None, "info", None, "confirmed records wait for the next checkpoint; not counted in max_bytes"),
    ]


def run_sparkplug(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    from sparkplug import run

    m = run(sz["spb"], sz["spb_rounds"])
    raw["sparkplug"] = m
    gw, paho = m["median"]["gateway"], m["median"]["paho"]
    return [row("8 sparkplug", f"DDATA x {m['metrics_per_message']} aliased metrics, backlog, msg/s", gw, "msg/s",
                paho, "bare paho msg/s", gw / paho, ">= 0.7x", gw / paho >= 0.7,
                f"{gw * m['metrics_per_message']:,.0f} metrics/s; loss {m['loss']}")]


def run_page(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    from page import run

    m = run([2000], sz["page_rounds"])
    raw["page"] = m
    ms, base = m["2000"]["median_ms"], m["baseline_ms"]
    return [row("9 page", "operator's page, 2,000 machines: navigation to all tiles drawn (median)", ms, "ms",
                base, "same page, 1 machine", ms / base, "< 1000 ms", ms < 1000,
                f"rounds {', '.join(f'{v:.0f}' for v in m['2000']['all_ms'])} ms")]


def run_peer(sz: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    import e2e
    import peer
    import publisher

    msgs = publisher.telemetry_messages(sz["peer"], 50, time.time() - 600)
    with e2e.servers() as srv:
        p = peer.run_peer(srv, msgs)
        g = e2e.gateway_throughput(srv, "peer_cmp", msgs, expect=len(msgs), measurement="telemetry",
                                   field="temp_c", batch_size=e2e.COLUMNAR_BATCH)
    raw["peer"] = {"peer": p, "gateway_same_load": g}
    if "error" in p:
        return [row("6 peer", "mqtt2influxdb", None, "msg/s", g["msgs_per_s"], "gateway, same load", None, "-",
                    None, p["error"][:200])]
    return [row("6 peer", f"mqtt2influxdb 1.5.2 msgs/s ({p['messages']:,} msgs, QoS 0)", p["msgs_per_s"], "msg/s",
                g["msgs_per_s"], "gateway, same load", _div(p["msgs_per_s"], g["msgs_per_s"]), "- (info)", None,
                f"loss {p['loss']}; one HTTP write per message; seq tag added (it stamps arrival time, 1 s)")]


# -- output -----------------------------------------------------------------------------------------------
def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "ms" or abs(v) < 100:
        return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"
    if abs(v) >= 1e6:
        return f"{v / 1e6:,.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:,.1f}k"
    return f"{v:,.0f}"


def print_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    print(f"\nmachine: {info.get('cpu_model')}, {info.get('cores')} cores, {info.get('ram_gb')} GB RAM, "
          f"Python {info['python']}, numpy {info['numpy']} ({info.get('blas')}), BLAS env {info['blas_env']}")
    print(f"         {info.get('mosquitto')}; {info.get('influxd')}\n")
    head = ("row", "what", "value", "unit", "baseline", "ratio", "target", "status")
    table = [head] + [(r["row"], r["what"], _fmt(r["value"], r["unit"]), r["unit"], _fmt(r["baseline"], r["unit"]),
                       "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"], r["status"])
                      for r in rows]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    for i, t in enumerate(table):
        print("  ".join(str(c).ljust(w) if j in (0, 1, 3, 6) else str(c).rjust(w)
                        for j, (c, w) in enumerate(zip(t, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    notes = [(r["row"], r["baseline_what"], r["note"]) for r in rows]
    print()
    for name, base, note in notes:
        print(f"  {name}: baseline = {base}" + (f"; {note}" if note else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description="factory-gateway benchmark suite")
    ap.add_argument("--only", default="", help="rows to run: names or numbers, comma-separated")
    ap.add_argument("--quick", action="store_true", help="smaller loads (a smoke run, noisier)")
    ap.add_argument("--publishers", default="python,mosquitto_pub",
                    help="row 1's live publishers, comma-separated: python (2 raw-socket processes), "
                         "mosquitto_pub (the C client, one process per machine)")
    ap.add_argument("--mosquitto-pub-procs", type=int, default=None, metavar="N",
                    help="mosquitto_pub processes, each owning whole machines (default: one per machine)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy the gateway during row 1 (detect on); collapsed stacks written to DIR")
    ap.add_argument("--out", type=Path, default=BENCH / "results.json")
    a = ap.parse_args()
    wanted = []
    for item in filter(None, (s.strip() for s in a.only.split(","))):
        name = ROWS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(ROWS) else item
        if name not in ROWS:
            ap.error(f"--only: unknown row {item!r}; choose from {', '.join(ROWS)} or 1..{len(ROWS)}")
        wanted.append(name)
    wanted = wanted or list(ROWS)
    from e2e import PUBLISHERS

    publishers = [s.strip() for s in a.publishers.split(",") if s.strip()]
    if not publishers or set(publishers) - set(PUBLISHERS):
        ap.error(f"--publishers: {a.publishers!r}; choose from {', '.join(PUBLISHERS)} (comma-separated)")
    if a.mosquitto_pub_procs is not None and a.mosquitto_pub_procs < 1:
        ap.error(f"--mosquitto-pub-procs: {a.mosquitto_pub_procs}; at least 1")
    sz = QUICK if a.quick else FULL
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    info = machine()
    raw: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    runners: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "ingest": lambda: run_ingest(sz, a.profile, raw, publishers, a.mosquitto_pub_procs),
        "columnar": lambda: run_columnar(sz, raw),
        "encode": lambda: run_encode(sz, raw),
        "latency": lambda: run_latency(sz, raw),
        "memory": lambda: run_memory(sz, raw),
        "peer": lambda: run_peer(sz, raw),
        "crash": lambda: run_crash(sz, raw),
        "sparkplug": lambda: run_sparkplug(sz, raw),
        "page": lambda: run_page(sz, raw),
    }
    t0 = time.monotonic()
    for name in ROWS:
        if name not in wanted:
            continue
        t = time.monotonic()
        print(f"[{time.monotonic() - t0:5.0f}s] {name} ...", flush=True)
        try:
            rows += runners[name]()
        except Exception as exc:
            errors[name] = "".join(traceback.format_exception(exc))[-2000:]
            rows.append(row(name, "FAILED", None, "", None, "-", None, "-", False, str(exc)[:200]))
            print(errors[name], file=sys.stderr)
        print(f"        {name} took {time.monotonic() - t:.0f} s", flush=True)
    print_table(rows, info)
    doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": a.quick, "seconds": time.monotonic() - t0,
           "machine": info, "rows": rows, "raw": raw, "errors": errors}
    a.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {a.out} ({time.monotonic() - t0:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
