"""The listening side of the relay and of the metrics port: accept loops and open
connections, with the bounds that keep a flood of one listener from taking the daemon.

One `BoundedServer` serves one aiohttp application on the listening sockets it is given:
the relay's private Unix socket (relay.py binds it and checks the peer's uid), or the
metrics TCP port (daemon.py, `metrics_addr`; no uid there, the port is opt-in).

Limits. Connections are capped (`relay_max_connections`, `metrics_max_connections`); at the
cap the oldest idle one is closed for a new one, so a flood of idle or slow connections
holds at most the cap's descriptors and a new client is still served. When every one is
busy, `probe_reserve` more are admitted for reading only (the relay keeps PROBE_RESERVE, so
that a liveness probe still gets its answer while every connection waits on a busy agent,
and their `POST /send` is answered 503); beyond that the new one is answered 503. Idle
connections and slow headers and bodies are timed out (relay_connection.py). The accept
loop backs off instead of spinning when the process runs out of descriptors, and from then
on keeps the cap below the number of connections it had, for the rest of the daemon.

A server knows nothing of its application's endpoints. Its log events are named after it:
`relay_accept_failed`, `metrics_accept_failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Sequence

from aiohttp import web

from agent_sidecar import logs
from agent_sidecar.aio import Backoff
from agent_sidecar.config import Settings
from agent_sidecar.error_shape import raw_error
from agent_sidecar.relay_connection import Connection
from agent_sidecar.unix_socket import Hangups

log = logs.get("relay")  # one logger for both listeners: their event names say which

# After accept() fails for lack of descriptors, a server keeps this many below the count
# of its connections at that moment, for the rest of the daemon (uploads, agentapi).
FD_HEADROOM = 32
MIN_CONNECTIONS = 4
ACCEPT_RETRY_INITIAL_S = 0.05
ACCEPT_RETRY_MAX_S = 2.0
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The relay's connections admitted beyond the cap for GET requests only: the probes must
# never be the ones refused because senders fill the relay (a liveness probe would restart
# the daemon).
PROBE_RESERVE = 8
# A refused connection is closed this long after its 503, so that a client which wrote its
# request first still reads the answer (closing with its bytes unread would reset it). At
# most this many linger at once, and never more than the server's cap: past that they are
# closed at once, so refusals cannot hold more descriptors than connections do.
REFUSED_LINGER_S = 1.0
MAX_LINGERING = 64
TCP_BACKLOG = 128  # aiohttp's default, which the metrics port had before


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets on `host`:`port`, one per address the host resolves
    to (as asyncio's create_server binds them: "localhost" is 127.0.0.1 and ::1). Raises
    OSError (socket.gaierror included) when one cannot be bound; none is left open then."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Each address family gets its own socket, as the host resolved it.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(TCP_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


class BoundedServer:
    """Serves `app` on the listening sockets given to `start()`, one `Connection` per
    accepted client, within the limits of the module docstring.

    Owns those listening sockets from `start()`, aiohttp's runner, one accept loop task per
    listening socket, the open connections in order of arrival, the connection cap and the
    hang-up watcher they share. `name` ("relay", "metrics") names its log events and, with
    `cap_setting`, its 503s; `max_connections(settings)` reads that setting. `on_refused`
    is told the status of each connection it answers itself (503 full, 408 slow headers).
    `start()` raises OSError when the hang-up watcher cannot be made (the sockets are
    closed then). `stop(timeout_s)` cancels the accept loops, closes the listening sockets
    and every connection, waiting at most `timeout_s` for handlers; a stop cancelled while
    it waits for the accept loops leaves the sockets open (`listening` says so). The accept
    loops never end on an error: they log it and back off. `settings` is read when it is
    used, so a reload applies to the next connection.
    """

    def __init__(self, app: web.Application, settings: Settings, *, name: str,
                 cap_setting: str, max_connections: Callable[[Settings], int],
                 probe_reserve: int = 0, evict_busy: bool = False,
                 on_refused: Callable[[int], None] = lambda status: None) -> None:
        self.app = app
        self.settings = settings
        self.name = name
        self.cap_setting = cap_setting
        self._cap = max_connections
        self.probe_reserve = probe_reserve
        # Whether a busy connection may be closed for a new one, once no idle one is left:
        # where every request is a GET that can be asked again (the metrics port), so that
        # clients which never read their answers cannot keep a scraper out.
        self.evict_busy = evict_busy
        self.refused = on_refused
        self.hangups: Hangups | None = None
        self._runner: web.AppRunner | None = None
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._connections: dict[Connection, None] = {}  # in order of arrival
        self._fd_cap: int | None = None  # learnt when accept() ran out of descriptors
        # Refused connections waiting to be closed, with their timers; stop() closes them.
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, listeners: Sequence[socket.socket]) -> None:
        """Serve on these bound, listening, non-blocking sockets, which it owns from now."""
        self._listeners = list(listeners)
        loop = asyncio.get_running_loop()
        try:
            self.hangups = Hangups.create(loop)
            runner = web.AppRunner(
                self.app, handle_signals=False, access_log=None, handler_cancellation=False,
                shutdown_timeout=1.0,
            )
            await runner.setup()
        except BaseException:
            if self.hangups is not None:
                self.hangups.close()
                self.hangups = None
            self._close_listeners()
            raise
        self._runner = runner
        self._acceptors = [
            loop.create_task(self._accept_loop(sock), name=f"agent-sidecar-{self.name}-accept")
            for sock in self._listeners
        ]

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    async def stop(self, timeout_s: float) -> None:
        for acceptor in self._acceptors:
            acceptor.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        self._acceptors = []
        self._close_listeners()
        for conn in list(self._lingering):
            self._close_refused(conn)
        try:
            if self._runner is not None:
                async with asyncio.timeout(timeout_s):
                    await self._runner.cleanup()
        except TimeoutError:
            log.warning(f"{self.name}_stop_timed_out", timeout_s=timeout_s)
        finally:
            self._runner = None
            if self.hangups is not None:
                self.hangups.close()
                self.hangups = None

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners = []

    # -- connections ---------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._connections)

    def max_connections(self) -> int:
        cap = self._cap(self.settings)
        return cap if self._fd_cap is None else min(cap, self._fd_cap)

    def full(self) -> tuple[str, str]:
        """The message and detail of the 503 that says every connection is taken."""
        what = "relay" if self.name == "relay" else f"{self.name} port"
        return (f"The {what} has too many connections.",
                f"{self.max_connections()} requests are being served ({self.cap_setting}); "
                "retry in a moment")

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
                log.warning(f"{self.name}_accept_failed", error=os.strerror(exc.errno or 0),
                            connections=len(self._connections),
                            max_connections=self.max_connections(),
                            retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug must not stop the accepting
                delay = backoff.next_delay(ACCEPT_RETRY_INITIAL_S, ACCEPT_RETRY_MAX_S)
                log.exception(f"{self.name}_accept_crashed", error=type(exc).__name__)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            try:
                await self._admit(conn)
            except Exception as exc:  # one connection must never stop the accepting
                conn.close()
                log.warning(f"{self.name}_connection_failed", error=type(exc).__name__,
                            detail=logs.clip(str(exc), 200))

    async def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        cap = self.max_connections()
        excess = len(self._connections) + 1 - cap
        probe_only = excess > 0 and self._evict(excess) < excess
        if probe_only and len(self._connections) >= cap + self.probe_reserve:
            self.refused(503)
            log.warning(f"{self.name}_connections_full", max_connections=cap)
            self._refuse(conn, raw_error(503, *self.full()))
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
        if len(self._lingering) >= min(MAX_LINGERING, self.max_connections()):
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
        """Close up to `count` idle connections, oldest first (then busy ones, oldest
        first, with `evict_busy`); how many were closed."""
        if count <= 0:
            return 0
        victims = [c for c in self._connections if c.idle][:count]
        if self.evict_busy and len(victims) < count:
            victims += [c for c in self._connections if not c.idle][:count - len(victims)]
        for victim in victims:
            self._connections.pop(victim, None)
            victim.force_close()
        if victims:
            log.warning(f"{self.name}_connections_at_limit",
                        max_connections=self.max_connections(),
                        detail="the oldest connections, busy ones too, are closed to make room"
                        if self.evict_busy else "idle connections are closed to make room")
        return len(victims)
