"""The relay's listening side: the private socket, the accept loop and the open connections.

Limits. Connections are capped (`relay_max_connections`); at the cap the oldest idle one is
closed for a new one. When every one is busy, PROBE_RESERVE more are admitted for reading
only, so that a liveness probe still gets its answer while every connection waits on a busy
agent (their `POST /send` is answered 503); beyond that the new one is answered 503. Idle
connections and slow headers and bodies are timed out (relay_connection.py). The accept
loop backs off instead of spinning when the process runs out of descriptors, and from then
on keeps the cap below the number of connections it had, for the rest of the daemon.

It serves whatever aiohttp application it is given, and knows nothing of its endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from pathlib import Path

from aiohttp import web

from agent_sidecar import logs
from agent_sidecar.aio import Backoff
from agent_sidecar.config import Settings
from agent_sidecar.error_shape import raw_error
from agent_sidecar.metrics import Metrics
from agent_sidecar.relay_connection import Connection
from agent_sidecar.unix_socket import Hangups, bind_unix

log = logs.get("relay")  # the relay's one logger, whichever of its modules writes the line

# After accept() fails for lack of descriptors, the relay keeps this many below the count
# of its connections at that moment, for the rest of the daemon (uploads, agentapi).
FD_HEADROOM = 32
MIN_CONNECTIONS = 4
ACCEPT_RETRY_INITIAL_S = 0.05
ACCEPT_RETRY_MAX_S = 2.0
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Connections admitted beyond the cap for GET requests only: the probes must never be the
# ones refused because senders fill the relay (a liveness probe would restart the daemon).
PROBE_RESERVE = 8
# A refused connection is closed this long after its 503, so that a client which wrote its
# request first still reads the answer (closing with its bytes unread would reset it).
REFUSED_LINGER_S = 1.0
MAX_LINGERING = 64
FULL_MESSAGE = "The relay has too many connections."


def full_detail(cap: int) -> str:
    return f"{cap} requests are being served (relay_max_connections); retry in a moment"


class RelayServer:
    """Serves `app` on a private Unix socket, one `Connection` per accepted client.

    Owns the listening socket and its file, aiohttp's runner, the accept loop task, the open
    connections in order of arrival, the connection cap and the hang-up watcher they share.
    `start(path)` binds the socket (RelayError if it cannot be served) and starts the accept
    loop; `stop(timeout_s)` cancels that loop, closes the listening socket and every
    connection, waiting at most `timeout_s` for handlers, and removes the socket file if it
    is still ours. A stop cancelled while it waits for the accept loop leaves the socket
    open; cancelled later, it still removes the file. The accept loop never ends on an
    error: it logs it and backs off. `settings` is read when it is used, so a reload
    applies to the next connection.
    """

    def __init__(self, app: web.Application, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.hangups: Hangups | None = None
        self.path: Path | None = None
        self._inode: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._connections: dict[Connection, None] = {}  # in order of arrival
        self._fd_cap: int | None = None  # learnt when accept() ran out of descriptors
        # Refused connections waiting to be closed, with their timers; stop() closes them.
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, path: Path) -> None:
        sock = bind_unix(path)
        self.path = path
        self._inode = path.stat().st_ino  # noqa: ASYNC240 - one stat of a local socket file
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, handler_cancellation=False,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self.hangups = Hangups.create(loop)
        self._listener = sock
        self._acceptor = loop.create_task(self._accept_loop(sock), name="agent-sidecar-accept")

    async def stop(self, timeout_s: float) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in list(self._lingering):
            self._close_refused(conn)
        try:
            if self._runner is not None:
                async with asyncio.timeout(timeout_s):
                    await self._runner.cleanup()
        except TimeoutError:
            log.warning("relay_stop_timed_out", timeout_s=timeout_s)
        finally:
            self._runner = None
            if self.hangups is not None:
                self.hangups.close()
                self.hangups = None
            self._unlink()

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                # Only our own socket: a successor may already have bound the path.
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    # -- connections ---------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._connections)

    def max_connections(self) -> int:
        cap = self.settings.relay_max_connections
        return cap if self._fd_cap is None else min(cap, self._fd_cap)

    def opened(self, conn: Connection) -> None:
        self._connections[conn] = None

    def closed(self, conn: Connection) -> None:
        self._connections.pop(conn, None)

    # -- accepting -----------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept connections until cancelled. Out of descriptors, it closes idle
        connections, lowers its cap below that level and backs off; it never spins."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN):
                    continue
                delay = backoff.next_delay(ACCEPT_RETRY_INITIAL_S, ACCEPT_RETRY_MAX_S)
                if exc.errno in _OUT_OF_FDS:
                    self._fd_cap = max(MIN_CONNECTIONS, len(self._connections) - FD_HEADROOM)
                    self._evict(len(self._connections) - self._fd_cap)
                log.warning("relay_accept_failed", error=os.strerror(exc.errno or 0),
                            connections=len(self._connections),
                            max_connections=self.max_connections(),
                            retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug must not stop the accepting
                delay = backoff.next_delay(ACCEPT_RETRY_INITIAL_S, ACCEPT_RETRY_MAX_S)
                log.exception("relay_accept_crashed", error=type(exc).__name__)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            try:
                await self._admit(conn)
            except Exception as exc:  # one connection must never stop the accepting
                conn.close()
                log.warning("relay_connection_failed", error=f"{type(exc).__name__}: {exc}")

    async def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        cap = self.max_connections()
        excess = len(self._connections) + 1 - cap
        probe_only = excess > 0 and self._evict(excess) < excess
        if probe_only and len(self._connections) >= cap + PROBE_RESERVE:
            self.metrics.relay_requests.labels(path="other", code="503").inc()
            log.warning("relay_connections_full", max_connections=cap)
            self._refuse(conn, raw_error(503, FULL_MESSAGE, full_detail(cap)))
            return
        runner = self._runner
        assert runner is not None
        server = runner.server
        assert server is not None

        def connection() -> Connection:
            made = Connection(server, self)
            made.probe_only = probe_only
            return made

        await asyncio.get_running_loop().connect_accepted_socket(connection, conn)

    def _refuse(self, conn: socket.socket, answer: bytes) -> None:
        """Answer and close a connection that is not served, without resetting a client
        that wrote its request first."""
        with contextlib.suppress(OSError):
            conn.send(answer)
        if len(self._lingering) >= MAX_LINGERING:
            conn.close()
            return
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        self._lingering[conn] = asyncio.get_running_loop().call_later(
            REFUSED_LINGER_S, self._close_refused, conn)

    def _close_refused(self, conn: socket.socket) -> None:
        timer = self._lingering.pop(conn, None)
        if timer is not None:
            timer.cancel()
        conn.close()

    def _evict(self, count: int) -> int:
        """Close up to `count` idle connections, oldest first; how many were closed."""
        if count <= 0:
            return 0
        victims = [c for c in self._connections if c.idle][:count]
        for victim in victims:
            self._connections.pop(victim, None)
            victim.force_close()
        if victims:
            log.warning("relay_connections_at_limit", max_connections=self.max_connections(),
                        detail="idle connections are closed to make room")
        return len(victims)
