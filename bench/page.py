"""Row 9: the operator's page with many machines, in Debian's chromium (headless, through chromium-driver).

An in-process gateway (no broker, no database: a sink that keeps nothing) is fed ``n`` machines (a state,
a count and one telemetry sample each) through the MQTT source's own delivery callback, flushed, and its
``[http]`` server started; the browser then opens ``/`` and the page reports ``window.firstRenderMs``
(navigation start to every tile drawn; the first of each browser's loads is not counted). The baseline is
the same page with one machine, in the same run: what the browser, the server and the page cost before
any tile. Target: 2,000 machines < 1 s.

Usage: ``python bench/page.py [--machines 100,2000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import Server  # noqa: E402
from tests.fakes import NullSink, feed_machines  # noqa: E402
from tests.servers import chromium, free_port  # noqa: E402


def first_render_ms(n: int, rounds: int, tmp: Path) -> list[float]:
    """``rounds`` page loads of a gateway holding ``n`` machines: navigation start to all tiles, in ms."""
    cfg = GatewayConfig.model_validate({
        "mqtt": {"port": free_port()},
        "buffer": {"enabled": False},
        "deadletter": {"path": str(tmp / f"dead-{n}.jsonl")},
        "oee": {"enabled": True, "windows": ["1m"]},
        "features": {"enabled": False},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {"stats_interval_s": 3600, "max_series": max(50, 10 * n)},
    })
    server = Server(cfg, sink=NullSink())
    feed_machines(server, n, time.time())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    out: list[float] = []
    try:
        asyncio.run_coroutine_threadsafe(server.pipeline.flush(), loop).result(120)
        assert server.http is not None
        asyncio.run_coroutine_threadsafe(server.http.start(), loop).result(10)
        with chromium(tmp / f"chrome-{n}") as browser:
            for k in range(rounds + 1):  # the first load warms the browser's caches: not counted
                browser.get(f"http://{cfg.http.listen}/")
                deadline = time.monotonic() + 30
                ms = None
                while ms is None and time.monotonic() < deadline:
                    ms = browser.execute_script("return window.firstRenderMs")
                    time.sleep(0.02)
                tiles = browser.execute_script("return document.querySelectorAll('.tile').length")
                if ms is None or tiles != n:
                    raise RuntimeError(f"{n} machines: the page drew {tiles} tiles (first render {ms})")
                if k:
                    out.append(float(ms))
    finally:
        if server.http is not None:
            asyncio.run_coroutine_threadsafe(server.http.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        server.deadletter.close()
    return out


def run(machines: list[int], rounds: int) -> dict[str, Any]:
    """Median first render per machine count, with the 1-machine page as the same run's baseline."""
    with tempfile.TemporaryDirectory(prefix="fgw-page-") as d:
        tmp = Path(d)
        base = first_render_ms(1, rounds, tmp)
        result: dict[str, Any] = {"rounds": rounds, "baseline_ms": statistics.median(base), "baseline_all": base}
        for n in machines:
            ms = first_render_ms(n, rounds, tmp)
            result[str(n)] = {"median_ms": statistics.median(ms), "all_ms": ms}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", default="100,2000", help="machine counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    r = run([int(s) for s in a.machines.split(",")], a.rounds)
    base = ", ".join(f"{v:.0f}" for v in r["baseline_all"])
    print(f"1 machine (baseline): {r['baseline_ms']:.0f} ms (rounds {base})")
    for key, v in r.items():
        if isinstance(v, dict):
            print(f"{int(key):,} machines: first render {v['median_ms']:.0f} ms "
                  f"({v['median_ms'] / r['baseline_ms']:.1f}x the 1-machine page; rounds "
                  f"{', '.join(f'{x:.0f}' for x in v['all_ms'])}); target < 1000 ms at 2,000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
