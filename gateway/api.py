"""The JSON documents of ``/api/v1/...`` (served by :mod:`gateway.http`), built from the plant view and the stats.

Pure functions of the gateway's memory: no I/O, nothing here changes the gateway. Times are seconds since
the epoch (floats); ``null`` means not known yet.

>>> from gateway.batch import MachineKey
>>> machine_path(MachineKey("s1", "a1", "l1", "m1"))
's1/a1/l1/m1'
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from gateway.batch import MachineKey

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.oee import OeeRecord
    from gateway.pipeline import Pipeline
    from gateway.stats import GatewayStats
    from gateway.view import AnomalyMark, MachineView, OeeMark, PlantView

__all__ = ["Rates", "config_doc", "deadletters_doc", "gateway_doc", "machine_doc", "machine_path", "plant_doc"]

ANOMALY_RECENT_S = 3600.0


def machine_path(key: MachineKey) -> str:
    return f"{key.site}/{key.area}/{key.line}/{key.machine}"


def _oee(r: OeeRecord | OeeMark, *, open_window: bool = False) -> dict[str, Any]:
    return {
        "window": r.window, "shift": r.shift, "open": open_window, "start": r.start_ns / 1e9, "end": r.end_ns / 1e9,
        "availability": r.availability, "performance": r.performance, "quality": r.quality, "oee": r.oee,
        "total_count": r.total_count, "good_count": r.good_count, "run_s": r.run_s, "down_s": r.down_s,
    }


def _current_oee(m: MachineView) -> dict[str, Any] | None:
    """The record a tile shows: this shift so far (its open window) when shifts are configured, else the
    last closed shift, else the longest closed window."""
    running = [r for r in m.oee_open if r.shift is not None]
    if running:
        return _oee(max(running, key=lambda r: r.start_ns), open_window=True)
    if not m.oee:
        return None
    shifts = [r for r in m.oee.values() if r.shift is not None]
    pick = max(shifts or m.oee.values(), key=lambda r: (r.end_ns - r.start_ns, r.end_ns))
    return _oee(pick)


def _tile(m: MachineView, now: float, stale_after_s: float, last: AnomalyMark | None, recent: int) -> dict[str, Any]:
    return {
        "id": machine_path(m.key), "site": m.key.site, "area": m.key.area, "line": m.key.line,
        "machine": m.key.machine, "state": m.state, "state_since": m.state_since, "online": m.online,
        "last_message": m.last_message,
        "stale": m.last_message is None or now - m.last_message > stale_after_s,
        "oee": _current_oee(m),
        "last_anomaly": None if last is None else {"ts": last.ts, "metric": last.metric, "detector": last.detector},
        "anomalies_last_hour": recent,
    }


def plant_doc(view: PlantView, stale_after_s: float, now: float | None = None) -> dict[str, Any]:
    """``GET /api/v1/plant``: one tile per machine, sorted by site, area, line, machine."""
    t = time.time() if now is None else now
    machines = sorted(view.machines.values(), key=lambda m: (m.key.site, m.key.area, m.key.line, m.key.machine))
    last, recent = view.last_anomalies(), view.anomalies_within(t, ANOMALY_RECENT_S)
    return {"now": t, "stale_after_s": stale_after_s,
            "machines": [_tile(m, t, stale_after_s, last[m.index], recent[m.index]) for m in machines]}


def machine_doc(view: PlantView, path: str, stale_after_s: float, now: float | None = None) -> dict[str, Any] | None:
    """``GET /api/v1/machines/{site}/{area}/{line}/{machine}``; None when no such machine is known."""
    parts = path.split("/")
    if len(parts) != 4:
        return None
    m = view.machines.get(MachineKey(*parts))
    if m is None:
        return None
    t = time.time() if now is None else now
    series = view.series_of(m.key)
    anomalies = view.anomalies(m)
    recent = sum(1 for a in anomalies if t - a.ts <= ANOMALY_RECENT_S)
    return {
        **_tile(m, t, stale_after_s, anomalies[-1] if anomalies else None, recent),
        "ring_interval_s": view.rings.interval_ns / 1e9,
        "series": {k: {"t": ts, "v": vs} for k, (ts, vs) in series.items()},
        "states": [{"ts": c.ts, "state": c.state, "reason": c.reason} for c in m.states],
        "anomalies": [{"ts": a.ts, "metric": a.metric, "detector": a.detector, "value": a.value, "score": a.score}
                      for a in anomalies],
        "oee_history": [_oee(r) for r in view.oee_history(m)],
    }


class Rates:
    """Messages/s and points/s over about the last minute, from counters sampled at each call."""

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, stats: GatewayStats, now: float | None = None) -> tuple[float | None, float | None]:
        t = time.monotonic() if now is None else now
        cur = (t, stats.pipeline.messages_in, stats.output.points_written)
        self._samples.append(cur)
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.span_s:
            self._samples.popleft()
        first = self._samples[0]
        dt = t - first[0]
        if dt <= 0:
            return None, None
        return (cur[1] - first[1]) / dt, (cur[2] - first[2]) / dt


def gateway_doc(stats: GatewayStats, rates: tuple[float | None, float | None]) -> dict[str, Any]:
    """``GET /api/v1/gateway``: every stage's snapshot plus the last minute's rates."""
    return {**stats.to_json(), "messages_per_s": rates[0], "points_per_s": rates[1]}


def deadletters_doc(pipeline: Pipeline) -> dict[str, Any]:
    """``GET /api/v1/deadletters``: counts by reason since start and the last few (newest first)."""
    return {
        "by_reason": pipeline.snapshot().rejected,
        "recent": [{"ts": ts, "topic": topic, "reason": reason, "error": why}
                   for ts, topic, reason, why in reversed(pipeline.recent_rejects)],
    }


def config_doc(cfg: GatewayConfig, path: str | None) -> dict[str, Any]:
    """``GET /api/v1/config``: the settings in effect, secrets redacted."""
    return {"path": path, "settings": cfg.redacted()}
