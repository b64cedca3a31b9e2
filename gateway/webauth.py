"""``[http] web_config_file``: basic auth and TLS for the HTTP server, in Prometheus' web-config format.

The file is the one Prometheus exporters read (exporter-toolkit), so one file and one habit serve both::

    basic_auth_users:
      operator: $2b$12$...            # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n', or python -m bcrypt)
    tls_server_config:                # optional: serve HTTPS
      cert_file: /etc/factory-gateway/web.crt
      key_file: /etc/factory-gateway/web.key

Relative ``cert_file`` / ``key_file`` are taken from the file's directory. Only these keys are known; any
other is an error naming it.

>>> import bcrypt
>>> auth = WebConfig(users={"op": bcrypt.hashpw(b"pw", bcrypt.gensalt(4))})
>>> auth.check("op", "pw"), auth.check("op", "bad"), auth.check("nobody", "pw")
(True, False, False)
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml

__all__ = ["WebConfig", "WebConfigError", "is_loopback", "load_web_config"]

_TOP = {"basic_auth_users", "tls_server_config"}
_TLS = {"cert_file", "key_file"}


class WebConfigError(ValueError):
    """The web-config file is missing, unreadable or malformed; the message names the key."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as in ``http.listen``) only accepts connections from this machine.

    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "gw-01.example")]
    [True, True, True, False, False, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebConfig:
    users: dict[str, bytes]
    cert_file: Path | None = None
    key_file: Path | None = None
    _ok: set[bytes] = field(default_factory=set, compare=False, repr=False)  # verified (user, password) digests

    def check(self, user: str, password: str) -> bool:
        """Verify against the bcrypt hash; a pair once verified is remembered (as a SHA-256) so polling is cheap."""
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if digest in self._ok:
            return True
        hashed = self.users.get(user)
        if hashed is None or not bcrypt.checkpw(password.encode(), hashed):
            return False
        if len(self._ok) < 1000:
            self._ok.add(digest)
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def load_web_config(path: Path) -> WebConfig:
    """Read and check the file: every user has a bcrypt hash, the TLS files exist and load."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WebConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: expected a mapping with basic_auth_users")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise WebConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP))})")
    users_raw = data.get("basic_auth_users")
    if not isinstance(users_raw, dict) or not users_raw:
        raise WebConfigError(f"{path}: basic_auth_users must map at least one user name to a bcrypt hash")
    users: dict[str, bytes] = {}
    for name, hashed in users_raw.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"{path}: basic_auth_users.{name}: not a bcrypt hash ($2b$...)")
        try:
            bcrypt.checkpw(b"", hashed.encode())
        except ValueError as exc:
            raise WebConfigError(f"{path}: basic_auth_users.{name}: not a bcrypt hash ({exc})") from exc
        users[str(name)] = hashed.encode()
    tls = data.get("tls_server_config")
    cert = key = None
    if tls is not None:
        if not isinstance(tls, dict):
            raise WebConfigError(f"{path}: tls_server_config must be a mapping with cert_file and key_file")
        bad = sorted(set(tls) - _TLS)
        if bad:
            raise WebConfigError(f"{path}: tls_server_config.{bad[0]}: not supported (known: cert_file, key_file)")
        for k in ("cert_file", "key_file"):
            if not tls.get(k):
                raise WebConfigError(f"{path}: tls_server_config.{k} is required")
        cert, key = (path.parent / str(tls["cert_file"]), path.parent / str(tls["key_file"]))
    cfg = WebConfig(users, cert, key)
    try:
        cfg.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"{path}: tls_server_config: cannot load {cert} / {key}: {exc}") from exc
    return cfg
