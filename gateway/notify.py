"""systemd service notifications (``sd_notify``): READY, WATCHDOG, STATUS, RELOADING, STOPPING.

Written by hand: the protocol is one datagram per message to ``$NOTIFY_SOCKET``, while the PyPI
packages either need libsystemd headers to build (systemd-python) or are unmaintained (sdnotify).
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same anywhere.

>>> n = Notifier(env={})
>>> n.enabled, n.watchdog_interval_s
(False, None)
>>> n.ready("starting")   # no socket: nothing is sent, nothing fails
False
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("gateway.notify")


class Notifier:
    """Sends state changes to the service manager named by ``NOTIFY_SOCKET`` (path or ``@abstract``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()  # Linux abstract namespace
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout, so one late tick is not a restart.
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False (logged once) if it cannot be delivered."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %r: %s", self._addr, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: systemd >= 253 (Type=notify-reload) matches the reload to this message by it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining: flushing buffered data, then exiting")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
