"""Start real mosquitto, InfluxDB 1.x and VictoriaMetrics servers for tests, benchmarks and the local demo.

Every server keeps its config, data and log in its own ``workdir``, listens on 127.0.0.1 on ports picked by
:func:`free_port`, runs in its own process group and is stopped by its own pid. An ``atexit`` hook kills any
child still running when the interpreter exits.

Example::

    from pathlib import Path
    from tempfile import mkdtemp
    from tests.servers import InfluxDB1, Mosquitto

    with Mosquitto(Path(mkdtemp())) as broker, InfluxDB1(Path(mkdtemp())) as influx:
        influx.create_database("demo")
        influx.write("demo", "m,line=a v=1i 1700000000000000000")
        assert influx.count("m", "demo") == 1
        print(broker.host, broker.port)

Only the standard library is used, so bench scripts and the demo runner can import it with the repo root on
``sys.path``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "AclMosquitto",
    "InfluxDB1",
    "Mosquitto",
    "ServerError",
    "ServerProcess",
    "TlsFiles",
    "VictoriaMetrics",
    "free_port",
    "make_password_file",
    "make_test_ca",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
# The mosquitto acl_file shipped in the deploy kit (AclMosquitto appends it to the test broker's config).
SHIPPED_ACL = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "acl"

# Set by a runner (deploy/dev/run_local.py) so the servers never outlive it, even when it is SIGKILLed.
DIE_WITH_PARENT = False


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends this child SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG).

    Only for single-threaded parents (fork + preexec_fn is unsafe with threads).
    """
    parent = os.getppid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:  # pragma: no cover - no libc to load
    _LIBC = None

# pid -> Popen of every child still running; the atexit hook kills what is left.
_RUNNING: dict[int, subprocess.Popen[bytes]] = {}


class ServerError(RuntimeError):
    """A server binary is missing, failed to start, or answered with an error."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Send ``sig`` by pid, wait up to ``timeout`` seconds, then SIGKILL; return the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _require_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if path is None:
        raise ServerError(
            f"{name!r} not found on PATH, /usr/sbin or /usr/bin; the project's setup installs it"
        )
    return path


_CA_FILES: dict[str, Path] = {}  # https base URL -> CA that signed its certificate


def _http_url(host: str, port: int, tls: TlsFiles | None) -> str:
    """The server's base URL; with TLS it is https://localhost (the test certificate's name)."""
    if tls is None:
        return f"http://{host}:{port}"
    base = f"https://localhost:{port}"
    _CA_FILES[base] = tls.ca_cert  # _http verifies this server against the test CA
    return base


def _http(
    method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for any status instead of raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    context = None
    for base, ca in _CA_FILES.items():
        if url.startswith(base):
            context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@atexit.register
def _kill_leftovers() -> None:
    for pid, proc in list(_RUNNING.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _RUNNING.pop(pid, None)


class ServerProcess(ABC):
    """Lifecycle shared by all servers: write config, spawn, wait until ready, stop/kill/restart by pid.

    Subclasses set ``binary`` and implement ``_write_config``, ``_command`` and ``_is_ready``; ``_pick_ports``
    chooses fresh ports for every port the caller did not fix (used again on a port clash).
    """

    binary: ClassVar[str]

    def __init__(self, workdir: Path, *, log_to: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.log_path = Path(log_to) if log_to is not None else self.workdir / f"{self.binary}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None  # wall time of the last successful start()

    # -- subclass hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def _pick_ports(self) -> None:
        """Choose a free port for every port the caller did not fix."""

    @abstractmethod
    def _write_config(self) -> None:
        """Write the server's config (and create its data directories) under ``workdir``."""

    @abstractmethod
    def _command(self, binary: str) -> list[str]:
        """The command line that starts the server."""

    @abstractmethod
    def _is_ready(self) -> bool:
        """Whether the server answers (polled until START_TIMEOUT)."""

    def _after_ready(self) -> None:  # noqa: B027 - an optional hook, deliberately empty by default
        """Runs once the server answers (e.g. create the admin user)."""

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start the server and wait until it is ready; retries once with fresh ports on a port clash."""
        if self.running:
            raise ServerError(f"{self.binary} already running (pid {self.pid})")
        try:
            self._spawn_and_wait()
        except ServerError:
            if not self._port_clash():
                raise
            self._pick_ports()
            self._spawn_and_wait()
        return self

    def _port_clash(self) -> bool:
        return "address already in use" in self.log_tail(50).lower()

    def _spawn_and_wait(self) -> None:
        binary = _require_binary(self.binary)
        self._write_config()
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            # Own process group: a test's Ctrl-C does not reach it and killpg reaches only it.
            proc = subprocess.Popen(
                self._command(binary), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True, preexec_fn=die_with_parent if DIE_WITH_PARENT else None,
            )
        self._proc = proc
        _RUNNING[proc.pid] = proc
        deadline = t0 + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                self._forget()
                raise ServerError(
                    f"{self.binary} exited with code {proc.returncode} during start-up; log tail:\n"
                    f"{self.log_tail()}"
                )
            if self._is_ready():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    f"{self.binary} not ready after {START_TIMEOUT:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self._after_ready()
        self.startup_seconds = time.monotonic() - t0

    def _forget(self) -> None:
        if self._proc is not None:
            _RUNNING.pop(self._proc.pid, None)
        self._proc = None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM by pid, wait up to ``timeout`` seconds, then SIGKILL the process group."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """SIGKILL without a chance to flush (for chaos tests)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self._forget()

    def restart(self, timeout: float = 10) -> Self:
        """Stop (gracefully) and start again on the same ports with the same data directory."""
        self.stop(timeout=timeout)
        self._spawn_and_wait()
        return self

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------------
# TLS and password helpers
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """Paths of a throwaway CA, a server cert for localhost/127.0.0.1 and a client cert (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(
        [_require_binary("openssl"), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise ServerError(f"openssl {' '.join(args)} failed:\n{res.stderr}")


def make_test_ca(directory: Path, *, days: int = 3650) -> TlsFiles:
    """Generate a CA, a server cert (SAN localhost, 127.0.0.1) and a client cert with the openssl CLI."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_cert=d / "ca.crt", ca_key=d / "ca.key",
        server_cert=d / "server.crt", server_key=d / "server.key",
        client_cert=d / "client.crt", client_key=d / "client.key",
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
        "-keyout", str(files.ca_key), "-out", str(files.ca_cert), "-subj", "/CN=factory-gateway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=d,
    )
    leaves = (
        ("server", files.server_key, files.server_cert, "serverAuth",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\n"),
        ("client", files.client_key, files.client_cert, "clientAuth", ""),
    )
    for name, key, cert, usage, san in leaves:
        csr = d / f"{name}.csr"
        ext = d / f"{name}.ext"
        # Python's ssl (OpenSSL 3) rejects leaf certs without SAN/AKI under strict verification.
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n" + san
        )
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={'localhost' if name == 'server' else 'factory-gateway-test-client'}",
            cwd=d,
        )
        _openssl(
            "x509", "-req", "-sha256", "-days", str(days), "-in", str(csr), "-CA", str(files.ca_cert),
            "-CAkey", str(files.ca_key), "-CAcreateserial", "-out", str(cert), "-extfile", str(ext),
            cwd=d,
        )
    for key in (files.ca_key, files.server_key, files.client_key):
        key.chmod(0o600)
    return files


def make_password_file(directory: Path, user: str, password: str) -> Path:
    """Create a mosquitto password file with one user (``mosquitto_passwd -b -c``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "passwd"
    res = subprocess.run(
        [_require_binary("mosquitto_passwd"), "-b", "-c", str(path), user, password],
        capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        raise ServerError(f"mosquitto_passwd failed: {res.stderr or res.stdout}")
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------------------------------------
# mosquitto
# ----------------------------------------------------------------------------------------------------------
_MOSQUITTO_START_MARK = "---- tests/servers.py: starting mosquitto"


class Mosquitto(ServerProcess):
    """A mosquitto 2.0 broker on 127.0.0.1 with persistence in ``workdir/data``.

    ``max_queued_messages`` defaults to 1 000 000 because mosquitto's default (1000) silently drops QoS 1
    messages queued for a slow or offline persistent subscriber. ``autosave_interval`` (seconds) bounds what a
    SIGKILL loses; a graceful stop always saves.
    """

    binary = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = True,
        max_queued_messages: int = 1_000_000,
        max_inflight_messages: int | None = None,
        autosave_interval: int = 1,
        tls: TlsFiles | None = None,
        tls_port: int | None = None,
        require_certificate: bool = False,
        password_file: Path | None = None,
        log_to: Path | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, log_to=log_to)
        self._fixed_port = port
        self._fixed_tls_port = tls_port
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.autosave_interval = autosave_interval
        self.tls = tls
        self.require_certificate = require_certificate
        self.password_file = password_file
        self.extra_config = extra_config
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"
        self.port = 0
        self.tls_port: int | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = self._fixed_port or free_port()
        if self.tls is not None:
            self.tls_port = self._fixed_tls_port or free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "# written by tests/servers.py",
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if os.geteuid() == 0:
            lines.append("user root")  # else, as root, it drops to 'mosquitto' and loses workdir
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.data_dir}",
            f"autosave_interval {self.autosave_interval}",
            f"max_queued_messages {self.max_queued_messages}",
        ]
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        lines += [
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"listener {self.port} {self.host}",
        ]
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self, binary: str) -> list[str]:
        return [binary, "-c", str(self.config_path)]

    def _is_ready(self) -> bool:
        # "running" is logged after every listener is open, so a clashing foreign listener cannot fool us.
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        if " running" not in log[log.rfind(_MOSQUITTO_START_MARK):]:
            return False
        # Probe only the plain listener: a bare TCP probe of the TLS one logs an OpenSSL error.
        return _port_accepts(self.port)

    def _spawn_and_wait(self) -> None:
        # Mark where this run's log starts so _is_ready does not see the previous run's "running" line.
        with self.log_path.open("a") as log:
            log.write(f"{_MOSQUITTO_START_MARK} port {self.port}\n")
        super()._spawn_and_wait()


class AclMosquitto(Mosquitto):
    """The test broker with the shipped acl_file (:data:`SHIPPED_ACL`); pair it with a ``password_file``."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_path.open("a") as f:
            f.write(f"\nacl_file {SHIPPED_ACL}\n")


# ----------------------------------------------------------------------------------------------------------
# InfluxDB 1.x
# ----------------------------------------------------------------------------------------------------------
def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxDB1(ServerProcess):
    """An InfluxDB 1.x ``influxd`` with meta/data/wal under ``workdir``; HTTP API v1 (``/write``, ``/query``).

    With ``auth=True`` HTTP auth is enabled and an admin ``username``/``password`` is created at first start;
    the helper methods authenticate as that user.
    """

    binary = "influxd"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        rpc_port: int | None = None,
        auth: bool = False,
        username: str = "admin",
        password: str = "admin-password",
        tls: TlsFiles | None = None,
        log_to: Path | None = None,
    ) -> None:
        super().__init__(workdir, log_to=log_to)
        self.tls = tls
        self._fixed_port = port
        self._fixed_rpc_port = rpc_port
        self.auth = auth
        self.username = username
        self.password = password
        self.config_path = self.workdir / "influxdb.conf"
        self.port = 0
        self.rpc_port = 0
        self._admin_created = False
        self._pick_ports()

    @property
    def url(self) -> str:
        return _http_url(self.host, self.port, self.tls)

    def _pick_ports(self) -> None:
        self.port = self._fixed_port or free_port()
        self.rpc_port = self._fixed_rpc_port or free_port()
        while self.rpc_port == self.port:
            self.rpc_port = free_port()

    def _write_config(self) -> None:
        w = self.workdir
        self.config_path.write_text(
            f"""# written by tests/servers.py
reporting-enabled = false
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{w / 'meta'}"
  logging-enabled = false

[data]
  dir = "{w / 'data'}"
  wal-dir = "{w / 'wal'}"
  query-log-enabled = false
  max-series-per-database = 0
  max-values-per-tag = 0

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false
  log-enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = {'true' if self.auth else 'false'}
  https-enabled = {'true' if self.tls else 'false'}
  https-certificate = "{self.tls.server_cert if self.tls else ''}"
  https-private-key = "{self.tls.server_key if self.tls else ''}"
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""
        )

    def _command(self, binary: str) -> list[str]:
        return [binary, "-config", str(self.config_path)]

    def _is_ready(self) -> bool:
        try:
            status, _ = _http("GET", f"{self.url}/ping", timeout=1)
        except OSError:
            return False
        return status == 204

    def _after_ready(self) -> None:
        if self.auth and not self._admin_created:
            # InfluxDB allows exactly this one unauthenticated statement while no admin user exists.
            status, body = _http(
                "POST", f"{self.url}/query",
                data=urllib.parse.urlencode({
                    "q": f"CREATE USER {_ident(self.username)} WITH PASSWORD "
                         f"'{self.password.replace(chr(39), chr(92) + chr(39))}' WITH ALL PRIVILEGES",
                }).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            if status != 200 or b'"error"' in body:
                raise ServerError(f"creating the InfluxDB admin user failed ({status}): {body!r}")
            self._admin_created = True

    def _headers(self, **extra: str) -> dict[str, str]:
        # influxd reads u/p only from the URL query; Basic auth keeps the password out of URLs and logs.
        if self.auth:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            extra["Authorization"] = f"Basic {token}"
        return extra

    def raw_query(self, influxql: str, db: str | None = None) -> dict[str, Any]:
        """POST one InfluxQL query (``epoch=ns``) and return the decoded JSON; raises on any error."""
        params = {"q": influxql, "epoch": "ns"}
        if db is not None:
            params["db"] = db
        status, body = _http(
            "POST", f"{self.url}/query", data=urllib.parse.urlencode(params).encode(),
            headers=self._headers(**{"Content-Type": "application/x-www-form-urlencoded"}),
        )
        try:
            doc: dict[str, Any] = json.loads(body or b"{}")
        except ValueError as exc:
            raise ServerError(f"InfluxDB query {influxql!r} returned {status}: {body!r}") from exc
        errors = [doc.get("error")] + [r.get("error") for r in doc.get("results", [])]
        errors = [e for e in errors if e]
        if status != 200 or errors:
            raise ServerError(f"InfluxDB query {influxql!r} failed ({status}): {errors or body!r}")
        return doc

    def query(self, influxql: str, db: str | None = None) -> list[dict[str, Any]]:
        """Run a query and flatten every series into rows: ``{**series_tags, column: value, ...}``.

        Times are integer nanoseconds (``epoch=ns``).
        """
        rows: list[dict[str, Any]] = []
        for result in self.raw_query(influxql, db).get("results", []):
            for series in result.get("series", []):
                tags = series.get("tags") or {}
                columns = series["columns"]
                rows.extend({**tags, **dict(zip(columns, vals, strict=True))} for vals in series["values"])
        return rows

    def count(self, measurement: str, db: str, field: str | None = None) -> int:
        """Number of points in ``measurement`` (for ``field=None``: the count of its most-populated field)."""
        what = f"count({_ident(field)})" if field else "count(*)"
        rows = self.query(f"SELECT {what} FROM {_ident(measurement)}", db)
        counts = [int(v) for row in rows for k, v in row.items() if k.startswith("count") and v is not None]
        return max(counts, default=0)

    def create_database(self, name: str) -> None:
        self.raw_query(f"CREATE DATABASE {_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.raw_query(f"DROP DATABASE {_ident(name)}")

    def write(self, db: str, lines: str | bytes, *, precision: str = "ns") -> None:
        """POST line protocol to ``/write``; raises unless InfluxDB answers 204."""
        params = {"db": db, "precision": precision}
        data = lines.encode() if isinstance(lines, str) else lines
        status, body = _http(
            "POST", f"{self.url}/write?{urllib.parse.urlencode(params)}", data=data, headers=self._headers()
        )
        if status != 204:
            raise ServerError(f"InfluxDB write failed ({status}): {body!r}")


# ----------------------------------------------------------------------------------------------------------
# VictoriaMetrics
# ----------------------------------------------------------------------------------------------------------
class VictoriaMetrics(ServerProcess):
    """A single-node VictoriaMetrics; accepts InfluxDB line protocol on ``/write`` and ``/api/v2/write``.

    A field ``f`` of measurement ``m`` is stored as metric ``m_f``. Retention is 100 years so test points with
    old timestamps are kept.
    """

    binary = "victoria-metrics"

    def __init__(
        self, workdir: Path, *, port: int | None = None, extra_args: tuple[str, ...] = (),
        tls: TlsFiles | None = None, log_to: Path | None = None,
    ) -> None:
        super().__init__(workdir, log_to=log_to)
        self._fixed_port = port
        self.tls = tls
        self.extra_args = extra_args
        self.data_dir = self.workdir / "data"
        self.port = 0
        self._pick_ports()

    @property
    def url(self) -> str:
        return _http_url(self.host, self.port, self.tls)

    def _pick_ports(self) -> None:
        self.port = self._fixed_port or free_port()

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr={self.host}:{self.port}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-search.latencyOffset=0s",
            "-loggerLevel=WARN",
            *(("-tls", f"-tlsCertFile={self.tls.server_cert}", f"-tlsKeyFile={self.tls.server_key}")
              if self.tls is not None else ()),
            *self.extra_args,
        ]

    def _is_ready(self) -> bool:
        try:
            status, _ = _http("GET", f"{self.url}/health", timeout=1)
        except OSError:
            return False
        return status == 200

    def write(self, lines: str | bytes, *, precision: str = "ns") -> None:
        """POST line protocol to ``/write``; raises unless the server answers 204."""
        data = lines.encode() if isinstance(lines, str) else lines
        status, body = _http("POST", f"{self.url}/write?precision={precision}", data=data)
        if status != 204:
            raise ServerError(f"VictoriaMetrics write failed ({status}): {body!r}")

    def flush(self) -> None:
        """Make everything written so far visible to queries (``/internal/force_flush``)."""
        status, body = _http("GET", f"{self.url}/internal/force_flush")
        if status != 200:
            raise ServerError(f"VictoriaMetrics force_flush failed ({status}): {body!r}")

    def export(self, match: str, *, flush: bool = True) -> list[dict[str, Any]]:
        """Raw samples of every series matching ``match`` (e.g. ``'{__name__=~"m_.*"}'``).

        Each item is ``{"metric": {labels}, "values": [...], "timestamps": [ms, ...]}``.
        """
        if flush:
            self.flush()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        status, body = _http("GET", f"{self.url}/api/v1/export?{query}")
        if status != 200:
            raise ServerError(f"VictoriaMetrics export {match!r} failed ({status}): {body!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]


@contextlib.contextmanager
def chromium(profile_dir: Path) -> Any:
    """Debian's chromium, headless, through chromium-driver (Selenium), with its profile in ``profile_dir``;
    quit on exit. Used by the browser tests and ``bench/page.py``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={profile_dir}"):
        opts.add_argument(arg)
    binary = shutil.which("chromium")
    if binary:
        opts.binary_location = binary
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
