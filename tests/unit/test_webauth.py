"""``[http] web_config_file``: non-loopback listen refused without it; with it, 401 / 401 / 200; probes open."""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.server import Server
from tests.servers import free_port, make_test_ca
from tests.unit.test_http import FakeSink, _cfg, _close


def _web_config(tmp_path: Path, body: str | None = None) -> Path:
    path = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    path.write_text(body if body is not None else f"basic_auth_users:\n  operator: {hashed}\n")
    return path


@pytest.mark.parametrize("listen", ["0.0.0.0:9273", "[::]:9273", "gw-01.plant.example:80", "192.168.1.5:9273"])
def test_non_loopback_without_auth_refused(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(f'[http]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"http\.web_config_file: required to listen on"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("basic_auth_users: {}\n", "basic_auth_users must map at least one user"),
        ("basic_auth_users:\n  op: plain\n", r"basic_auth_users\.op: not a bcrypt hash"),
        ("basic_auth_users:\n  op: $2b$04$x\nfoo: 1\n", "unknown key 'foo'"),
        ("tls_server_config: {cert_file: a.crt}\nbasic_auth_users:\n  op: $2b$04$x\n", None),
        ("[1, 2]\n", "expected a mapping"),
    ],
)
def test_bad_web_config_names_the_key(tmp_path: Path, body: str, message: str | None) -> None:
    web = _web_config(tmp_path, body)
    path = tmp_path / "gw.toml"
    path.write_text('[http]\nlisten = "0.0.0.0:9273"\nweb_config_file = "web.yml"\n')
    with pytest.raises(ConfigError, match=r"http\.web_config_file: ") as err:
        load_config(path, env={})
    assert message is None or re.search(message, str(err.value)), str(err.value)
    assert str(web) in str(err.value)


def test_missing_web_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[http]\nlisten = "0.0.0.0:9273"\nweb_config_file = "nope.yml"\n')
    with pytest.raises(ConfigError, match=r"http\.web_config_file: cannot read .*nope\.yml"):
        load_config(path, env={})


def test_non_loopback_with_auth_accepted_relative_to_config(tmp_path: Path) -> None:
    web = _web_config(tmp_path)
    path = tmp_path / "gw.toml"
    path.write_text('[http]\nlisten = "0.0.0.0:9273"\nweb_config_file = "web.yml"\n')
    assert load_config(path, env={}).http.web_config_file == web


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Server]:
    web = _web_config(tmp_path)
    server = Server(_cfg(tmp_path, http={"listen": f"127.0.0.1:{free_port()}", "web_config_file": str(web)}),
                    sink=FakeSink())
    assert server.http is not None
    await server.http.start()
    try:
        yield server
    finally:
        await server.http.stop()
        _close(server)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def _status(server: Server, path: str, auth: str | None) -> tuple[int, str | None]:
    headers = {} if auth is None else {"Authorization": auth}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.get(f"http://{server.cfg.http.listen}{path}", headers=headers) as resp:
        return resp.status, resp.headers.get("WWW-Authenticate")


@pytest.mark.parametrize("path", ["/", "/metrics", "/api/v1/plant", "/api/v1/gateway", "/api/v1/config"])
async def test_auth_401_401_200(secured: Server, path: str) -> None:
    status, challenge = await _status(secured, path, None)
    assert status == 401
    assert challenge is not None
    assert challenge.startswith("Basic realm=")
    assert (await _status(secured, path, _basic("operator", "wrong")))[0] == 401
    assert (await _status(secured, path, _basic("intruder", "s3cret")))[0] == 401
    assert (await _status(secured, path, "Basic !!notbase64"))[0] == 401
    assert (await _status(secured, path, _basic("operator", "s3cret")))[0] == 200


async def test_probes_need_no_credentials(secured: Server) -> None:
    assert (await _status(secured, "/healthz", None))[0] == 200
    assert (await _status(secured, "/readyz", None))[0] == 503  # not connected to a broker: answers, unauthenticated


async def test_tls_server_config_serves_https(tmp_path: Path) -> None:
    tls = make_test_ca(tmp_path / "tls")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    web = _web_config(tmp_path, f"basic_auth_users:\n  operator: {hashed}\ntls_server_config:\n"
                                f"  cert_file: {tls.server_cert}\n  key_file: {tls.server_key}\n")
    server = Server(_cfg(tmp_path, http={"listen": f"127.0.0.1:{free_port()}", "web_config_file": str(web)}),
                    sink=FakeSink())
    assert server.http is not None
    await server.http.start()
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            url = f"https://{server.cfg.http.listen}"
            auth = {"Authorization": _basic("operator", "s3cret")}
            async with s.get(url + "/api/v1/plant", ssl=ctx, headers=auth) as r:
                assert r.status == 200
            async with s.get(url + "/healthz", ssl=ctx) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                async with s.get(f"http://{server.cfg.http.listen}/healthz") as r:
                    await r.read()
    finally:
        await server.http.stop()
        _close(server)
