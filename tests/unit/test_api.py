"""``/api/v1/...`` on a real socket: the plant, one machine, the gateway panel, dead letters, config; read-only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.api import Rates
from gateway.pipeline import collect
from gateway.server import Server
from tests.unit.test_http import FakeSink, _cfg, _close, _deliver


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Server]:
    cfg = _cfg(tmp_path, oee={"enabled": True, "windows": ["1m"]}, http={"stale_after_s": 60, "ring_interval_s": 10},
               influx={"password": "hunter2"})
    server = Server(cfg, sink=FakeSink())
    assert server.http is not None
    await server.http.start()
    try:
        yield server
    finally:
        await server.http.stop()
        _close(server)


async def _get(server: Server, path: str, method: str = "GET") -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
            s.request(method, f"http://{server.cfg.http.listen}{path}") as resp:
        body = await resp.read()
        return resp.status, orjson.loads(body) if resp.content_type == "application/json" else body


async def test_plant_and_machine_documents(running: Server) -> None:
    server = running
    t0 = (int(time.time()) // 60 - 3) * 60
    _deliver(server, "factory/s1/a1/l1/press1/state", orjson.dumps({"ts": t0, "state": "RUNNING"}))
    _deliver(server, "factory/s1/a1/l1/press1/count", orjson.dumps({"ts": t0 + 30, "total": 10, "good": 9}))
    _deliver(server, "factory/s1/a1/l1/press1/state", orjson.dumps({"ts": t0 + 70, "state": "IDLE"}))
    _deliver(server, "factory/s1/a1/l1/press1/telemetry", orjson.dumps({"ts": time.time() - 1, "values": {"t": 3.5}}))
    _deliver(server, "factory/s1/a1/l2/old/telemetry", orjson.dumps({"ts": time.time() - 600, "values": {"t": 1.0}}))
    await server.pipeline.flush()
    status, plant = await _get(server, "/api/v1/plant")
    assert status == 200
    assert [m["id"] for m in plant["machines"]] == ["s1/a1/l1/press1", "s1/a1/l2/old"]
    press, old = plant["machines"]
    assert (press["state"], press["state_since"], press["stale"]) == ("IDLE", t0 + 70, False)
    assert old["stale"] is True
    assert old["state"] is None
    view = server.pipeline.view
    assert view is not None
    rec = view.machines[next(iter(k for k in view.machines if k.machine == "press1"))].oee["1m"]
    assert press["oee"]["oee"] == rec.oee
    assert press["oee"]["good_count"] == rec.good_count
    assert press["oee"]["start"] == rec.start_ns / 1e9

    status, detail = await _get(server, "/api/v1/machines/s1/a1/l1/press1")
    assert status == 200
    assert [s["state"] for s in detail["states"]] == ["RUNNING", "IDLE"]
    assert detail["series"]["t"]["v"][-1] == 3.5
    assert detail["ring_interval_s"] == 10
    status, missing = await _get(server, "/api/v1/machines/s1/a1/l1/nope")
    assert status == 404
    assert "s1/a1/l1/nope" in missing["error"]


async def test_tile_shows_this_shift_so_far(tmp_path: Path) -> None:
    now = time.time()
    start = time.strftime("%H:%M", time.gmtime(now - 3600))  # a shift that began an hour ago and is still on
    end = time.strftime("%H:%M", time.gmtime(now + 3600))
    cfg = _cfg(tmp_path, oee={"enabled": True, "windows": [], "shifts": [{"name": "day", "start": start,
                                                                          "end": end}]})
    server = Server(cfg, sink=FakeSink())
    assert server.http is not None
    await server.http.start()
    try:
        t0 = float(int(now) - 1800)
        _deliver(server, "factory/s1/a1/l1/press1/state", orjson.dumps({"ts": t0, "state": "RUNNING"}))
        _deliver(server, "factory/s1/a1/l1/press1/count", orjson.dumps({"ts": t0 + 1, "total": 100, "good": 100}))
        _deliver(server, "factory/s1/a1/l1/press1/state", orjson.dumps({"ts": t0 + 600, "state": "DOWN"}))
        _deliver(server, "factory/s1/a1/l1/press1/count", orjson.dumps({"ts": t0 + 601, "total": 160, "good": 150}))
        await server.pipeline.flush()
        _, plant = await _get(server, "/api/v1/plant")
        (press,) = plant["machines"]
        o = press["oee"]
        pipe = server.pipeline
        assert pipe.oee is not None
        assert pipe.view is not None
        (so_far,) = pipe.oee.open_records(next(iter(pipe.view.machines)))
        assert (o["shift"], o["open"], o["end"]) == ("day", True, so_far.end_ns / 1e9)
        assert (o["total_count"], o["good_count"]) == (60, 50)  # parts since the shift's first count
        assert o["availability"] == so_far.availability == pytest.approx(600 / 601)  # the DOWN second counts too
    finally:
        await server.http.stop()
        _close(server)


async def test_gateway_deadletters_config_and_read_only(running: Server) -> None:
    server = running
    _deliver(server, "factory/s1/a1/l1/m1/telemetry", b"{broken")
    await server.pipeline.flush()
    status, gw = await _get(server, "/api/v1/gateway")
    assert status == 200
    assert gw["pipeline"]["decode_errors"] == 1
    assert gw["mqtt"]["connected"] is False
    assert gw["wal"]["max_bytes"] == server.cfg.buffer.max_bytes
    status, dead = await _get(server, "/api/v1/deadletters")
    assert sum(dead["by_reason"].values()) == 1
    [recent] = dead["recent"]
    assert recent["topic"] == "factory/s1/a1/l1/m1/telemetry"
    assert "JSON" in recent["error"]
    status, conf = await _get(server, "/api/v1/config")
    assert status == 200
    assert conf["settings"]["influx"]["password"] == "***"
    assert b"hunter2" not in orjson.dumps(conf)
    for method in ("POST", "PUT", "DELETE"):
        status, _ = await _get(server, "/api/v1/plant", method)
        assert status == 405


def test_rates_over_the_last_minute(tmp_path: Path) -> None:
    server = Server(_cfg(tmp_path), sink=FakeSink())
    try:
        rates = Rates(span_s=60)
        assert rates.sample(collect(server.pipeline), now=0.0) == (None, None)
        server.pipeline.stats.messages_in = 120
        server.pipeline.output.stats.points_written = 600
        assert rates.sample(collect(server.pipeline), now=30.0) == (4.0, 20.0)
        server.pipeline.stats.messages_in = 240
        msgs, _ = rates.sample(collect(server.pipeline), now=90.0)
        assert msgs == pytest.approx(120 / 60)  # the sample at 0 s fell out of the minute
    finally:
        _close(server)


async def test_page_served_self_contained(running: Server) -> None:
    status, body = await _get(running, "/")
    assert status == 200
    assert b"/api/v1/plant" in body
    assert b"http://" not in body
    assert b"https://" not in body  # no asset from the internet
    assert b"<script src" not in body
