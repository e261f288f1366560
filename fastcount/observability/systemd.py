"""sd_notify for Type=notify units, with the standard library only: one datagram to $NOTIFY_SOCKET.

READY=1 once every worker serves, RELOADING=1 / READY=1 around a SIGHUP reload, STOPPING=1 on shutdown, STATUS=
lines, and WATCHDOG=1 at half of WatchdogSec when the unit sets it. Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # "@" means abstract namespace
        self.watchdog_interval = 0.0
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 2e6
        self._last_watchdog = 0.0
        self._socket: socket.socket | None = None

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            log.warning("event=sd_notify_failed error=%r", str(error))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets newer systemd (notify-reload) match the reload to this message; older ones ignore it.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Call often; pings only every half WatchdogSec."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.notify("WATCHDOG=1")
