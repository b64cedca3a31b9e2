"""InfluxDB adapters: v1 ``POST /write`` over aiohttp, v2 ``/api/v2/write`` through influxdb-client.

Every failure becomes a :class:`~gateway.errors.SinkError` that says whether a retry can help.
"""

from __future__ import annotations

import gzip
import logging
import ssl
from typing import Any

import aiohttp

from gateway.config import InfluxConfig
from gateway.errors import SinkError

__all__ = ["InfluxV1Sink", "InfluxV2Sink", "make_influx_sink"]

log = logging.getLogger("gateway.sinks.influx")

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _status_error(status: int, text: str, headers: Any) -> SinkError:
    retryable = status in _RETRYABLE_STATUS or status >= 500
    return SinkError(
        f"HTTP {status}: {text.strip()[:500]}",
        retryable=retryable,
        status=status,
        retry_after=_retry_after(headers),
    )


def _ssl_context(cfg: InfluxConfig) -> ssl.SSLContext | None:
    if not cfg.url.startswith("https://"):
        return None
    return ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)


class InfluxV1Sink:
    """InfluxDB 1.x ``/write?db=&rp=&precision=ns`` (also VictoriaMetrics' ``/write``)."""

    name = "influx-v1"

    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        params: dict[str, str] = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self._params = params

    def _auth(self) -> aiohttp.BasicAuth | None:
        if self.cfg.username is None:
            return None
        pw = self.cfg.password.get_secret_value() if self.cfg.password else ""
        return aiohttp.BasicAuth(self.cfg.username, pw)

    async def connect(self) -> None:
        connector = aiohttp.TCPConnector(ssl=_ssl_context(self.cfg) or False, limit=4)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auth=self._auth(),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
        )
        if self.cfg.create_database:
            try:
                await self.query(f'CREATE DATABASE "{self.cfg.database}"')
            except SinkError as exc:  # not fatal: the writer retries, and the database may exist
                log.warning("could not create database %r: %s", self.cfg.database, exc)

    async def query(self, q: str) -> dict[str, Any]:
        assert self._session is not None, "connect() first"
        try:
            async with self._session.post(f"{self.cfg.url}/query", data={"q": q}) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise _status_error(resp.status, text, resp.headers)
                result: dict[str, Any] = await resp.json(content_type=None)
                return result
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SinkError(f"{self.cfg.url}: {exc!r}", retryable=True) from exc

    async def write(self, body: bytes) -> None:
        if self._session is None:
            raise SinkError("sink not connected", retryable=True)
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        data = body
        if self.cfg.gzip:
            data = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(
                f"{self.cfg.url}/write", params=self._params, data=data, headers=headers
            ) as resp:
                if resp.status in (200, 204):
                    return
                text = await resp.text()
                raise _status_error(resp.status, text, resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SinkError(f"{self.cfg.url}: {exc!r}", retryable=True) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class InfluxV2Sink:
    """InfluxDB 2.x / 3.x / Cloud and anything speaking ``/api/v2/write``, via influxdb-client."""

    name = "influx-v2"

    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        self._client: Any = None
        self._write_api: Any = None

    async def connect(self) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        token = self.cfg.token.get_secret_value() if self.cfg.token else ""
        self._client = InfluxDBClientAsync(
            url=self.cfg.url,
            token=token,
            org=self.cfg.org,
            timeout=int(self.cfg.timeout_s * 1000),
            enable_gzip=self.cfg.gzip,
            ssl_ca_cert=str(self.cfg.ca_file) if self.cfg.ca_file else None,
        )
        self._write_api = self._client.write_api()

    async def write(self, body: bytes) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        if self._write_api is None:
            raise SinkError("sink not connected", retryable=True)
        try:
            await self._write_api.write(
                bucket=self.cfg.bucket, org=self.cfg.org, record=body, write_precision=WritePrecision.NS
            )
        except ApiException as exc:
            raise _status_error(int(exc.status or 0), str(exc.body or exc.reason), exc.headers) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise SinkError(f"{self.cfg.url}: {exc!r}", retryable=True) from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def make_influx_sink(cfg: InfluxConfig) -> InfluxV1Sink | InfluxV2Sink:
    return InfluxV1Sink(cfg) if cfg.api == "v1" else InfluxV2Sink(cfg)
