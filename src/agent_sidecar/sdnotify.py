"""The sd_notify protocol, spoken directly: one datagram per state, no native library.

NOTIFY_SOCKET is a filesystem path or, with a leading '@', an abstract socket name.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

from agent_sidecar import logs

log = logs.get("sdnotify")


class Notifier:
    """Speaks sd_notify to the socket in NOTIFY_SOCKET; without one every call is a no-op.

    `send()` never raises (a lost datagram is logged at debug). `watchdog()` pings until
    cancelled, and returns at once when systemd asked for no watchdog.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *states: str) -> bool:
        """Send `KEY=value` lines. False (and a debug log) when it cannot be delivered."""
        if self._address is None:
            return False
        payload = "\n".join(states).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self._address)
                sock.sendall(payload)
            except OSError as exc:
                log.debug("sd_notify_failed", error=str(exc))
                return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "Shutting down") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval from the event loop, until cancelled.

        Sent from the loop itself, so a wedged loop stops the pings and systemd restarts us.
        """
        if self.watchdog_interval_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s / 2)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent shell)
    return int(usec) / 1_000_000
