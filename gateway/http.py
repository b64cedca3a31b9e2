"""Health and metrics over HTTP, served by aiohttp inside the gateway's own event loop.

- ``GET /healthz``: 200 ``ok`` whenever the process and its event loop answer;
- ``GET /readyz``: 200 ``ready`` when the broker connection is up and subscribed and the database takes
  writes; otherwise 503 with one ``broker: ...`` / ``sink: ...`` line per reason;
- ``GET /metrics``: Prometheus exposition of a registry of this server's own (not the global one).
- ``GET /``: the operator's page (:mod:`gateway.web`), which polls the JSON API;
- ``GET /api/v1/...``: the operator's JSON documents (:mod:`gateway.api`, from :mod:`gateway.view`), read-only.

The metrics are read at scrape time from :func:`gateway.pipeline.collect` (one typed snapshot per stage: pipeline,
output, WAL, dead-letter file, MQTT source), so the hot path pays nothing for them.
Every label comes from a small fixed set (reject reasons, detector names): no payload text gets in.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import api
from gateway.config import HttpConfig
from gateway.errors import GatewayError
from gateway.pipeline import collect
from gateway.web import index_html
from gateway.webauth import WebConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.config import GatewayConfig
    from gateway.pipeline import Pipeline
    from gateway.sources.mqtt import MqttSource
    from gateway.view import PlantView

__all__ = ["GatewayCollector", "GatewayState", "HttpConfig", "HttpListenError", "StatusServer", "readiness"]

log = logging.getLogger("gateway.http")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes answer without credentials


class HttpListenError(GatewayError):
    """The status server could not listen on ``http.listen`` (address in use, not local, no permission)."""


class GatewayState(Protocol):
    """What the endpoints read; :class:`gateway.server.Server` is one."""

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def source(self) -> MqttSource: ...

    @property
    def cfg(self) -> GatewayConfig: ...

    @property
    def config_path(self) -> Path | None: ...


def readiness(gateway: GatewayState) -> list[str]:
    """Why the gateway is not ready, one ``component: reason`` per problem; empty when it is ready."""
    reasons = []
    st = collect(gateway.pipeline, gateway.source)
    mq, out = st.mqtt, st.output
    if mq is not None and not mq.connected:
        detail = f"last error: {mq.last_error}" if mq.last_error else "connecting"
        reasons.append(f"broker: not connected to {mq.host}:{mq.port} ({detail})")
    if out.failing_for_s is not None:
        reasons.append(f"sink: write failing for {out.failing_for_s:.0f} s: {out.last_error}")
    if not st.pipeline.accepting:
        reasons.append("gateway: shutting down")
    return reasons


class GatewayCollector(Collector):
    """Reads the gateway's own counters at scrape time; names start with ``factory_gateway_``."""

    def __init__(self, gateway: GatewayState) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        st = collect(g.pipeline, g.source)
        p, out, mq = st.pipeline, st.output, st.mqtt
        assert mq is not None  # collect() was given the source
        yield InfoMetricFamily("factory_gateway", "Gateway version and instance.",
                               value={"version": st.version, "gateway_instance": st.instance})
        yield CounterMetricFamily("factory_gateway_messages_received", "MQTT messages delivered by the broker.",
                                  value=mq.messages)
        rejected = CounterMetricFamily(
            "factory_gateway_messages_rejected", "Messages that failed to decode or validate (dead-lettered).",
            labels=["reason"],
        )
        for reason, n in p.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("factory_gateway_points_decoded", "Points decoded from accepted messages.",
                                  value=p.points_in)
        yield CounterMetricFamily("factory_gateway_points_written", "Lines the database accepted.",
                                  value=out.points_written)
        yield CounterMetricFamily("factory_gateway_write_retries", "Database writes retried after a failure.",
                                  value=out.retries)
        yield CounterMetricFamily("factory_gateway_lines_rejected", "Lines the database refused (400/422).",
                                  value=out.rejected_lines)
        yield GaugeMetricFamily("factory_gateway_sink_failing_seconds",
                                "How long database writes have been failing; 0 while they succeed.",
                                value=out.failing_for_s or 0.0)
        if st.deadletter is not None:
            yield CounterMetricFamily("factory_gateway_dead_letters", "Records written to the dead-letter file.",
                                      value=st.deadletter.records_written)
        yield GaugeMetricFamily("factory_gateway_mqtt_connected", "1 while connected and subscribed to the broker.",
                                value=int(mq.connected))
        yield CounterMetricFamily("factory_gateway_mqtt_reconnects", "Broker connections after the first one.",
                                  value=mq.reconnects)
        yield from g.pipeline.batch_latency.collect()
        anomalies = CounterMetricFamily("factory_gateway_anomalies", "Anomaly events written, by detector.",
                                        labels=["detector"])
        for name, n in p.anomalies_by_detector.items():
            anomalies.add_metric([name], n)
        yield anomalies
        yield GaugeMetricFamily("factory_gateway_series", "Machine x metric series known.", value=p.series)
        yield GaugeMetricFamily("factory_gateway_series_max", "Cardinality cap (gateway.max_series).",
                                value=p.max_series)
        wal = st.wal
        if wal is not None:
            yield GaugeMetricFamily("factory_gateway_wal_bytes_pending", "Unconfirmed bytes in the write-ahead log.",
                                    value=wal.bytes_pending)
            yield GaugeMetricFamily("factory_gateway_wal_records_pending", "Unconfirmed records in the WAL.",
                                    value=wal.records_pending)
            yield GaugeMetricFamily("factory_gateway_wal_max_bytes", "WAL capacity (buffer.max_bytes); at it, "
                                    "acks stop until the database catches up.", value=wal.max_bytes)
            yield GaugeMetricFamily("factory_gateway_wal_oldest_pending_age_seconds",
                                    "Age of the oldest record not yet in the database; 0 when none.",
                                    value=wal.oldest_pending_age_s or 0.0)
            yield CounterMetricFamily("factory_gateway_wal_backpressure_waits",
                                      "Waits (of up to 1 s) for room in a full WAL, acks held meanwhile.",
                                      value=p.backpressure_waits)


class StatusServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``http.listen``; :meth:`start` and :meth:`stop` it."""

    def __init__(self, cfg: HttpConfig, gateway: GatewayState) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(gateway))
        try:
            self.auth = cfg.web_config()
        except WebConfigError as exc:
            raise HttpListenError(f"http.web_config_file: {exc}") from exc
        self.app = web.Application(middlewares=[self._authenticate] if self.auth is not None else [])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/api/v1/plant", self._plant)
        self.app.router.add_get("/api/v1/machines/{site}/{area}/{line}/{machine}", self._machine)
        self.app.router.add_get("/api/v1/gateway", self._gateway)
        self.app.router.add_get("/api/v1/deadletters", self._deadletters)
        self.app.router.add_get("/api/v1/config", self._config)
        self._rates = api.Rates()
        self._page = index_html()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = self.cfg.address
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            ctx = None if self.auth is None else self.auth.ssl_context()
            await web.TCPSite(runner, host, port, ssl_context=ctx).start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpListenError(f"http.listen: cannot listen on {self.cfg.listen}: {exc.strerror or exc}") from exc
        self._runner = runner
        log.info("serving the page, /api/v1, /healthz, /readyz and /metrics on %s://%s%s",
                 "http" if ctx is None else "https", self.cfg.listen, "" if self.auth is None else " (basic auth)")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = readiness(self.gateway)
        if reasons:
            return web.Response(status=503, text="\n".join(reasons))
        return web.Response(text="ready")

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Basic auth against ``web_config_file`` on everything but the probes."""
        if request.path in OPEN_PATHS or self.auth is None:
            return await handler(request)
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            sep = ""
        if scheme.lower() != "basic" or not sep or not self.auth.check(user, password):
            return web.Response(status=401, text="authentication required",
                                headers={"WWW-Authenticate": 'Basic realm="factory-gateway", charset="UTF-8"'})
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy":
                                     "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    def _json(self, doc: object, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                            content_type="application/json", headers={"Cache-Control": "no-store"})

    def _view(self) -> PlantView:
        view = self.gateway.pipeline.view
        if view is None:  # only when [http] is disabled, and then nothing serves this
            raise web.HTTPServiceUnavailable(text="no plant view")
        return view

    async def _plant(self, request: web.Request) -> web.Response:
        with self.gateway.pipeline.compute_lock:  # the view is updated by the batch computing in its thread
            doc = api.plant_doc(self._view(), self.cfg.stale_after_s)
        return self._json(doc)

    async def _machine(self, request: web.Request) -> web.Response:
        m = request.match_info
        path = f"{m['site']}/{m['area']}/{m['line']}/{m['machine']}"
        with self.gateway.pipeline.compute_lock:
            doc = api.machine_doc(self._view(), path, self.cfg.stale_after_s)
        if doc is None:
            return self._json({"error": f"no machine {path!r}"}, status=404)
        return self._json(doc)

    async def _gateway(self, request: web.Request) -> web.Response:
        st = collect(self.gateway.pipeline, self.gateway.source)
        return self._json(api.gateway_doc(st, self._rates.sample(st)))

    async def _deadletters(self, request: web.Request) -> web.Response:
        return self._json(api.deadletters_doc(self.gateway.pipeline))

    async def _config(self, request: web.Request) -> web.Response:
        path = self.gateway.config_path
        return self._json(api.config_doc(self.gateway.cfg, None if path is None else str(path)))
