"""The relay: a small HTTP API on a private Unix socket.

POST /send forwards input to the agent through agentapi `POST /message`.

Ordering. Two locks. `user` inputs take the *queue* lock in arrival order (FIFO) and hold it
while they wait for the agent to be stable, while they are posted and, with `"reply": true`,
until the agent has answered. The *wire* lock is held only around one `POST /message`, by
`user` and `raw` inputs alike, so two POSTs never interleave. A `raw` input (keystrokes, e.g.
Escape) takes only the wire lock: it never waits for stable, nor behind a `user` input that
waits.

Half-close. A client may write its request and shut down its write side (`nc -N`, `socat`):
that read-side EOF is not a hang-up, so the connection stays open for the answer. A client
is gone when the socket reports a full hang-up (POLLHUP, which a half-close does not raise)
or when the connection is lost; that cancels its input if it has not been posted yet. The
relay decides this itself: aiohttp's handler cancellation is off.

Outcomes. Never sent (agentapi unreachable): 503. Sent and refused: 502 with agentapi's
detail, including "typed but not submitted", never retried. Sent and no answer: 504, the
input may have been typed. Every send is answered within `wait_s + send_timeout_s` (under
ACP `acp_turn_timeout_s`) plus ANSWER_MARGIN_S.

Limits. Connections are capped, idle connections and slow headers and bodies are timed out,
and the accept loop backs off instead of spinning when the process runs out of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import select
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from agent_sidecar import logs, paths
from agent_sidecar.agentapi import (
    AgentAPI,
    AgentAPIError,
    AgentAPIUnavailable,
    NotStable,
    SendUnconfirmed,
    TypedNotSubmitted,
)
from agent_sidecar.aio import Backoff, first_of
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation, Message
from agent_sidecar.metrics import CONTENT_TYPE, Metrics

log = logs.get("relay")

MAX_BODY_BYTES = 1 << 20
MAX_WAIT_S = 3600.0
NOT_STABLE_GRACE_S = 0.25  # agentapi's status lags its POST check by a 25 ms tick
UNIX_PATH_MAX = 107
# Connecting to agentapi (and asking it for its transport) may take this long even when
# wait_s is spent; with it, every send is answered within wait_s + send timeout + this.
CONNECT_FLOOR_S = 0.5
ANSWER_MARGIN_S = 2.0
# After accept() fails for lack of descriptors, the relay keeps this many below the count
# of its connections at that moment, for the rest of the daemon (uploads, agentapi).
FD_HEADROOM = 32
MIN_CONNECTIONS = 4
ACCEPT_RETRY_INITIAL_S = 0.05
ACCEPT_RETRY_MAX_S = 2.0
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CLIENT_GONE = 499  # nginx's "client closed request", for the metrics only
# A reply holds the agent's whole messages; huge, but never unbounded.
REPLY_MAX_CHARS = MAX_BODY_BYTES * 16
KNOWN_PATHS = ("/send", "/status", "/healthz", "/livez", "/metrics")


@dataclass(frozen=True)
class Health:
    """Critical reasons make /healthz 503; degraded ones (the sink) are reported with 200."""

    critical: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


class RelayError(Exception):
    """The socket cannot be served; the message says why and what to do."""


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid (SO_PEERCRED), or None if the transport has none."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def error(status: int, message: str, detail: str = "") -> web.Response:
    """Coder's error shape."""
    body = {"message": message, "detail": detail}
    return web.json_response(body, status=status)


def bind_unix(path: Path) -> socket.socket:
    """Bind a private listening socket at `path`, replacing a stale one, never a live one."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise RelayError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                         "choose a shorter --socket")
    try:
        paths.ensure_private_dir(str(path))  # the per-uid default directory: ours, 0700
    except paths.UnsafeDirectory as exc:
        raise RelayError(str(exc)) from None
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
        parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise RelayError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody is listening
        except OSError as exc:
            raise RelayError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        else:
            raise RelayError(f"another process is serving {path}; stop it or choose "
                             "another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is never, even briefly, open to others
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise RelayError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    path.chmod(0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


# -- connections ---------------------------------------------------------------------------


def _hung_up(fd: int) -> bool:
    """The peer of this stream socket has hung up for good (POLLHUP). A half-close (the peer
    shut down only its write side) does not raise POLLHUP."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are reported whatever the mask
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class BodyCutShort(ConnectionError):
    """The client shut down its side before the request body was complete."""


class _Hangups:
    """Tells when half-closed peers hang up for good, without polling: one epoll holds the
    watched sockets with an empty mask (epoll always reports EPOLLHUP and EPOLLERR), and the
    event loop watches that epoll. A callback runs once per watched socket; `unwatch` before
    the socket is closed. Linux only; `create()` returns None elsewhere."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> _Hangups | None:
        return cls(loop) if hasattr(select, "epoll") else None

    def watch(self, fd: int, on_hangup: Callable[[], None]) -> None:
        if fd not in self._callbacks:
            self._epoll.register(fd, 0)
        self._callbacks[fd] = on_hangup

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            self.unwatch(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()


class _Connection(RequestHandler):
    """One relay connection: aiohttp's HTTP/1.1 handler, plus what the relay decides itself.

    Owns `gone` (set once the peer has hung up or the connection is lost), the header timer
    (`relay_header_timeout_s` from a request's first byte to its last header) and the
    half-close rule (a read-side EOF keeps the write side open while a request is pending;
    the connection closes after its answer). Its errors are answered in Coder's shape and
    logged as one structured line, without a traceback.
    """

    __slots__ = ("_fd", "_header_timer", "_read_eof", "_relay", "gone")

    def __init__(self, manager: web.Server, relay: Relay, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._relay = relay
        self.gone = asyncio.Event()
        self._fd = -1
        self._read_eof = False
        self._header_timer: asyncio.TimerHandle | None = None

    # -- state ---------------------------------------------------------------------------

    def _awaiting_request(self) -> bool:
        """No request is queued or being handled: waiting for (the rest of) the next one."""
        waiter = getattr(self, "_waiter", None)
        return waiter is not None and not waiter.done() and not getattr(self, "_messages", ())

    @property
    def idle(self) -> bool:
        """No request is being handled: closing it loses nothing that has been asked."""
        return self.transport is not None and self._awaiting_request()

    def cut_short(self, request: web.BaseRequest | None = None) -> None:
        """After a read-side EOF, the body of a pending request can no longer arrive in full:
        reading it fails at once (a 400) instead of waiting for the body timeout. Called at
        the EOF, and by a handler before it reads (a request can be between the two)."""
        if not self._read_eof:
            return
        current = request or getattr(self, "_current_request", None)
        payloads = [payload for _, payload in getattr(self, "_messages", ())]
        if current is not None:
            payloads.append(current.content)
        for payload in payloads:
            if not payload.is_eof() and payload.exception() is None:
                payload.set_exception(BodyCutShort("the client closed its side mid-body"))

    # -- asyncio protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        super().connection_made(transport)
        self._relay._connections[self] = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._relay._connections.pop(self, None)
        if self._relay._hangups is not None:
            self._relay._hangups.unwatch(self._fd)
        self._cancel_header_timer()
        self.gone.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport is None or not self._awaiting_request():
            self._cancel_header_timer()
        elif data and self._header_timer is None:
            # The first bytes of a request: its headers must be complete within the bound,
            # however slowly the rest trickles in.
            self._header_timer = asyncio.get_running_loop().call_later(
                self._relay.settings.relay_header_timeout_s, self._headers_too_slow)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's: bool | None
        try:
            return self._keep_open_after_eof()
        except Exception as exc:  # asyncio would log a traceback and close it anyway
            log.exception("relay_connection_error", detail="at end of input",
                          error=type(exc).__name__)
            return False

    def _keep_open_after_eof(self) -> bool:
        if self._fd >= 0 and _hung_up(self._fd):
            return False  # gone for good: close, which cancels what it asked
        self._read_eof = True
        if self._awaiting_request():
            return False  # nothing to answer
        self.cut_short()
        if self._relay._hangups is not None:
            self._relay._hangups.watch(self._fd, self._hangup_after_half_close)
        return True  # half-closed: the answer still goes out on this connection

    def _hangup_after_half_close(self) -> None:
        self.gone.set()
        self.force_close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is None or not self._awaiting_request():
            return
        timeout_s = self._relay.settings.relay_header_timeout_s
        self._relay.metrics.relay_requests.labels(path="other", code="408").inc()
        body = json.dumps({"message": "The request headers did not arrive in time.",
                           "detail": f"they must be complete within relay_header_timeout_s "
                                     f"({timeout_s:g}s) of the request's first byte"})
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body.encode())
        self.force_close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # -- aiohttp hooks -------------------------------------------------------------------

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if self._read_eof and not getattr(self, "_messages", ()):
            resp.force_close()  # the peer can send nothing more: close after this answer
        return await super().finish_response(request, resp, start_time)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp answers what it cannot parse (an unknown method, a broken header) here,
        before any middleware runs: answer in Coder's shape, log one line, no traceback."""
        headline = (message or "").strip().splitlines()[0] if message else ""
        headline = headline or (f"{type(exc).__name__}: {exc}" if exc else "")
        if status >= 500:
            log.error("relay_request_failed", status=status, error=headline[:200])
        else:
            log.warning("relay_bad_http", status=status, error=headline[:200])
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun; the connection is closed instead")
        text = ("The request is not valid HTTP." if status < 500
                else "The sidecar failed to handle this request.")
        resp = error(status, text, headline[:200])
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        what = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else ""
        log.error("relay_connection_error", detail=str(args[0]) if args else "", error=what)


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One parsed POST /send body."""

    text: str
    kind: Literal["user", "raw"]
    wait_s: float
    reply: bool = False


class _Closing(Exception):
    pass


class _NotReady(Exception):
    """The wait for the agent (or for the input before it) ran out."""


class Relay:
    """The relay's HTTP API on a private Unix socket: /send, /status, /healthz, /metrics.

    `start()` binds the socket (RelayError if it cannot be served) and runs its accept loop
    and aiohttp's connection tasks; `close()` stops taking sends (inputs not yet posted are
    answered 503); `stop()` stops accepting, closes every connection and removes the socket
    file. A handler never raises: failures are answered in Coder's error shape and logged
    once. An input whose client hangs up before it is posted is dropped; once posted, a POST
    is always finished (agentapi cannot unsend keystrokes): cancelling a send handler (as
    `stop()` does past its timeout) drops an input still waiting, and a POST in flight is
    still finished. Every setting is read from `settings` when it is used, so a reload
    applies to the next send or connection.
    """

    def __init__(
        self,
        agentapi: AgentAPI,
        conversation: Conversation,
        metrics: Metrics,
        settings: Settings,
        *,
        status: Callable[[], dict[str, Any]] = dict,
        health: Callable[[], Health] = Health,
        live: Callable[[], list[str]] = list,
        uid_of: Callable[[web.Request], int | None] = peer_uid,
    ) -> None:
        self.agentapi = agentapi
        self.conversation = conversation
        self.metrics = metrics
        self.settings = settings
        self._status = status
        self._health = health
        self._live = live
        self._uid_of = uid_of
        self._allowed_uids = {0, os.getuid()}
        self._queue = asyncio.Lock()  # user inputs, FIFO: waiters acquire in arrival order
        self._wire = asyncio.Lock()  # one POST /message at a time
        self.waiting = 0  # user inputs queued behind the one being served
        self.raw_waiting = 0  # raw inputs waiting for a POST in flight to finish
        self.closing = False
        self._closed = asyncio.Event()
        self._probed: tuple[int, str] | None = None  # (follower reconnects, transport)
        self.path: Path | None = None
        self._inode: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._hangups: _Hangups | None = None
        self._connections: dict[_Connection, None] = {}  # in order of arrival
        self._fd_cap: int | None = None  # learnt when accept() ran out of descriptors
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._guard]
        )
        self.app.router.add_post("/send", self._send)
        self.app.router.add_get("/status", self._get_status)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/metrics", self._metrics)

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
        self._hangups = _Hangups.create(loop)
        self._listener = sock
        self._acceptor = loop.create_task(self._accept_loop(sock), name="agent-sidecar-accept")
        log.info("relay_listening", socket=str(path))

    @property
    def busy(self) -> bool:
        """An input is being served (waiting for stable, or being posted)."""
        return self._queue.locked() or self._wire.locked()

    @property
    def connections(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        """Stop taking new sends; inputs waiting for their turn are answered 503."""
        self.closing = True
        self._closed.set()

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Close the socket and remove its file, waiting at most `timeout_s` for handlers."""
        self.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            if self._runner is not None:
                async with asyncio.timeout(timeout_s):
                    await self._runner.cleanup()
        except TimeoutError:
            log.warning("relay_stop_timed_out", timeout_s=timeout_s)
        finally:
            self._runner = None
            if self._hangups is not None:
                self._hangups.close()
                self._hangups = None
            self._unlink()

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                # Only our own socket: a successor may already have bound the path.
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    # -- accepting -----------------------------------------------------------------------

    def max_connections(self) -> int:
        cap = self.settings.relay_max_connections
        return cap if self._fd_cap is None else min(cap, self._fd_cap)

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
        if excess > 0 and self._evict(excess) < excess:
            self.metrics.relay_requests.labels(path="other", code="503").inc()
            log.warning("relay_connections_full", max_connections=cap)
            body = json.dumps({"message": "The relay has too many connections.",
                               "detail": f"{cap} requests are being served (relay_max_"
                                         "connections); retry in a moment"})
            with contextlib.suppress(OSError):
                conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                          b"\r\nConnection: close\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
            conn.close()
            return
        runner = self._runner
        assert runner is not None
        server = runner.server
        assert server is not None
        settings = self.settings
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _Connection(
                server, self, loop=asyncio.get_running_loop(), access_log=None,
                tcp_keepalive=False, auto_decompress=False,
                # aiohttp's keep-alive timeout closes a connection that has no request
                # from its start, or since its last answer: the idle timeout.
                keepalive_timeout=settings.relay_idle_timeout_s,
                lingering_time=settings.relay_body_timeout_s),
            conn)

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

    # -- middleware ----------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = _shape(exc)
        except Exception as exc:
            log.exception("relay_handler_failed", path=_known(request.path),
                          error=type(exc).__name__)
            resp = error(500, "The sidecar failed to handle this request.", type(exc).__name__)
        self.metrics.relay_requests.labels(path=_known(request.path), code=str(resp.status)).inc()
        return resp

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        uid = self._uid_of(request)
        if uid is None or uid not in self._allowed_uids:
            # No uid is no proof: a peer we cannot identify is refused like a stranger.
            log.warning("relay_peer_refused", uid=uid)
            return error(403, "This socket only serves its own user and root.",
                         "the peer's uid cannot be read" if uid is None
                         else f"peer uid {uid} is not allowed")
        if "Origin" in request.headers:
            # Browsers send Origin; nothing legitimate on this socket is a web page.
            return error(403, "Requests from web pages are refused.",
                         "the request carries an Origin header")
        return await handler(request)

    # -- POST /send ----------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.StreamResponse:
        if self.closing:
            return error(503, "The sidecar is shutting down.", "retry against its successor")
        body_timeout_s = self.settings.relay_body_timeout_s
        conn = request.protocol
        if isinstance(conn, _Connection):
            conn.cut_short(request)
        try:
            async with asyncio.timeout(body_timeout_s):
                raw = await request.read()
        except TimeoutError:
            return error(408, "The request body did not arrive in time.",
                         f"it must arrive within relay_body_timeout_s ({body_timeout_s:g}s) "
                         "of the headers")
        except BodyCutShort as exc:
            return error(400, "The request body was cut short.", str(exc))
        except (ConnectionError, ValueError, HttpProcessingError) as exc:
            return error(400, "The request body could not be read.", type(exc).__name__)
        parsed = parse_send(raw, self.settings.send_wait_s)
        if isinstance(parsed, web.Response):
            return parsed
        gone = conn.gone if isinstance(conn, _Connection) else asyncio.Event()
        work = asyncio.ensure_future(self._handle(parsed))
        try:
            if await first_of(work, gone.wait()) == 0:
                return work.result()
            work.cancel()
            await asyncio.wait([work])
            log.info("relay_sender_gone", type=parsed.kind,
                     delivered=not work.cancelled() and work.exception() is None
                     and work.result().status < 300)
            return web.Response(status=CLIENT_GONE)
        finally:
            if not work.done():
                work.cancel()

    async def _handle(self, inp: Input) -> web.Response:
        """The answer to one input: the whole of its ordering, waiting and outcome."""
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + inp.wait_s
        try:
            if inp.kind == "raw":
                return await self._raw(inp, wait_until)
            return await self._user(inp, wait_until)
        except _Closing:
            return error(503, "The sidecar is shutting down.",
                         "the input was not sent; retry against its successor")
        except _NotReady:
            if not self.conversation.connected:
                return error(503, "agentapi cannot be reached.",
                             f"not connected to {self.agentapi.url} within {inp.wait_s:g}s; "
                             "the input was not sent")
            return error(409, "The agent is still busy.",
                         f"it did not become stable within {inp.wait_s:g}s; the input was not "
                         "sent; retry later or raise wait_s")
        except AgentAPIUnavailable as exc:
            return error(503, "agentapi cannot be reached.", f"{exc}; the input was not sent")
        except TypedNotSubmitted as exc:
            return error(
                502, "The input was typed into the agent's input box but not submitted.",
                f"agentapi: {exc.detail}. Do not resend it: that would type it a second time. "
                "Look at the agent, then submit it with a raw Enter (\\r) or clear it.")
        except AgentAPIError as exc:
            return error(502, "agentapi rejected the input.", exc.detail or str(exc))
        except SendUnconfirmed as exc:
            return error(504, "The input was sent, but agentapi did not answer.",
                         f"{exc} after the request was written; the input may have been typed "
                         "or submitted: check the agent before resending")

    async def _raw(self, inp: Input, wait_until: float) -> web.Response:
        transport = await self._transport(wait_until)
        if transport == "acp":
            return error(409, "Raw input is refused: this agentapi uses the ACP transport.",
                         "under ACP, agentapi sends raw input to the agent as a whole prompt, "
                         "not as keystrokes; send text as {\"type\": \"user\"}")
        if transport is None:
            # Keystrokes sent to an ACP agent would be a prompt; and an agentapi whose
            # /status does not answer is unreachable or in the middle of an ACP turn.
            return error(503, "agentapi cannot be reached.",
                         f"its GET /status did not say which transport it uses within "
                         f"{inp.wait_s:g}s; the input was not sent")
        self.raw_waiting += 1
        try:
            await self._acquire(self._wire, wait_until)
        except _NotReady:
            return error(409, "agentapi is still busy with the input before this one.",
                         f"that POST /message did not finish within {inp.wait_s:g}s; the input "
                         "was not sent; retry later or raise wait_s")
        finally:
            self.raw_waiting -= 1
        try:
            if self.closing:
                raise _Closing
            await self._post(inp, self.settings.send_timeout_s, wait_until)
        finally:
            self._wire.release()
        return web.Response(status=204)

    async def _user(self, inp: Input, wait_until: float) -> web.Response:
        self.waiting += 1
        try:
            await self._acquire(self._queue, wait_until)
        finally:
            self.waiting -= 1
        try:
            while True:
                await self._until_stable(wait_until)
                acp = await self._transport(wait_until) == "acp"
                timeout_s = (self.settings.acp_turn_timeout_s if acp
                             else self.settings.send_timeout_s)
                before = self.conversation.count
                turn = (asyncio.ensure_future(self._turn_over())
                        if inp.reply and not acp else None)
                try:
                    await self._acquire(self._wire, wait_until)
                    try:
                        if self.closing:
                            raise _Closing
                        answer_by = await self._post(inp, timeout_s, wait_until)
                    finally:
                        self._wire.release()
                    if not inp.reply:
                        return web.Response(status=204)
                    return await self._reply(inp, before, turn, answer_by, timeout_s)
                except NotStable:
                    # Our view lags agentapi's; nothing was typed. Wait for the status to
                    # catch up, then again for stable, within the same budget.
                    version = self.conversation.version
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(NOT_STABLE_GRACE_S):
                            await self._wait_change(version)
                finally:
                    if turn is not None and not turn.done():
                        turn.cancel()
        finally:
            self._queue.release()

    async def _acquire(self, lock: asyncio.Lock, wait_until: float) -> None:
        if self.closing:
            raise _Closing
        try:
            async with asyncio.timeout_at(wait_until):
                await lock.acquire()
        except TimeoutError:
            raise _NotReady from None

    async def _until_stable(self, wait_until: float) -> None:
        conv = self.conversation
        while True:
            if self.closing:
                raise _Closing
            if conv.connected and conv.status == "stable":
                return
            try:
                async with asyncio.timeout_at(wait_until):
                    await self._wait_change(conv.version)
            except TimeoutError:
                raise _NotReady from None

    async def _wait_change(self, version: int) -> None:
        """Until the conversation changes or the relay closes."""
        await first_of(self.conversation.wait_changed(version), self._closed.wait())

    async def _post(self, inp: Input, timeout_s: float, wait_until: float) -> float:
        """POST the input; the loop time by which its answer (and a reply) must be done.
        Once a POST has started it is finished even if our client hangs up: agentapi cannot
        unsend typed keystrokes, and abandoning it would leave its lock held."""
        loop = asyncio.get_running_loop()
        connect_s = min(self.settings.agentapi_timeout_s,
                        max(CONNECT_FLOOR_S, wait_until - loop.time()))
        answer_by = loop.time() + timeout_s  # connecting to agentapi is all but instant
        send = asyncio.ensure_future(self.agentapi.send(
            inp.text, inp.kind, timeout_s=timeout_s, connect_timeout_s=connect_s))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            await asyncio.wait([send])
            if not send.cancelled() and send.exception() is None:
                log.info("relay_delivered_after_hangup", type=inp.kind)
            raise
        return answer_by

    async def _transport(self, wait_until: float) -> str | None:
        """"pty" or "acp": the follower's knowledge, else (not known yet, or an agentapi
        before v0.12, which says nothing) asked once per agentapi connection;
        None when that cannot be told in time (then a user input goes as over a PTY, and a
        raw one is not sent)."""
        state = self.agentapi.state
        if state.transport is not None:
            return state.transport
        if self._probed is not None and self._probed[0] == state.reconnects:
            return self._probed[1]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(self.settings.agentapi_timeout_s,
                                           max(CONNECT_FLOOR_S, wait_until - loop.time()))):
                info = await self.agentapi.status_info()
            # Before v0.12 agentapi says nothing: those versions have no ACP.
            transport = info.transport or "pty"
        except (AgentAPIError, AgentAPIUnavailable, TimeoutError) as exc:
            log.warning("relay_transport_unknown", error=f"{type(exc).__name__}: {exc}")
            return None
        self._probed = (state.reconnects, transport)
        return transport

    # -- reply ---------------------------------------------------------------------------

    async def _turn_over(self) -> None:
        """Until the agent has been seen running, then stable again: the turn after a send
        over a PTY. Started before the POST, so that no status change is missed."""
        conv = self.conversation
        running = False
        while True:
            version = conv.version
            if conv.connected and conv.status == "running":
                running = True
            elif running and conv.connected and conv.status == "stable":
                return
            await conv.wait_changed(version)

    async def _reply(self, inp: Input, before: int, turn: asyncio.Future[None] | None,
                     answer_by: float, timeout_s: float) -> web.Response:
        """200 with the agent's answer to the delivered input, once it is stable again (over
        ACP the POST itself lasted the whole turn)."""
        turn_over = turn is None
        try:
            async with asyncio.timeout_at(answer_by):
                if turn is not None:
                    await turn
                    turn_over = True
                messages = await self.agentapi.messages(REPLY_MAX_CHARS)
        except TimeoutError:
            if not turn_over:
                return error(504, "The input was delivered, but the agent's reply did not "
                             "finish in time.",
                             f"the agent was not stable again within {timeout_s:g}s of the "
                             "send; do not resend it")
            messages = self.conversation.messages()  # agentapi is slow to answer: our view
        except (AgentAPIError, AgentAPIUnavailable) as exc:
            log.warning("relay_reply_from_view", error=str(exc))
            messages = self.conversation.messages()
        reply = reply_to(messages, before, inp.text)
        return web.json_response({"messages": [
            {"id": m.id, "role": m.role, "content": m.content, "time": m.time} for m in reply
        ]})

    # -- GET -----------------------------------------------------------------------------

    def send_timeout_s(self) -> float:
        """The bound on one POST /message once written: acp_turn_timeout_s under ACP, and
        the larger of the two while the transport is not known yet."""
        s = self.settings
        state = self.agentapi.state
        transport = state.transport
        if transport is None and self._probed is not None and self._probed[0] == state.reconnects:
            transport = self._probed[1]
        if transport == "acp":
            return s.acp_turn_timeout_s
        if transport == "pty":
            return s.send_timeout_s
        return max(s.send_timeout_s, s.acp_turn_timeout_s)

    def status_fields(self) -> dict[str, Any]:
        """The relay's part of GET /status."""
        return {
            "send_wait_s": self.settings.send_wait_s,
            "send_timeout_s": self.send_timeout_s(),
            "answer_margin_s": ANSWER_MARGIN_S,
            "queue_length": self.waiting,
            "connections": len(self._connections),
            "max_connections": self.max_connections(),
        }

    async def _get_status(self, request: web.Request) -> web.Response:
        data = self._status()
        data.setdefault("relay", {}).update(self.status_fields())
        return web.json_response(data)

    async def _healthz(self, request: web.Request) -> web.Response:
        health = self._health()
        critical = ["shutting down", *health.critical] if self.closing else health.critical
        if critical:
            return web.json_response(
                {"status": "unhealthy", "reasons": critical + health.degraded}, status=503
            )
        if health.degraded:
            return web.json_response({"status": "degraded", "reasons": health.degraded})
        return web.json_response({"status": "ok"})

    async def _livez(self, request: web.Request) -> web.Response:
        """Liveness only: answering proves the event loop turns, and `live` names any of the
        daemon's tasks that stopped. Never agentapi or uploads: a dependency that is slow to
        come up must not get the daemon restarted and its conversation dropped. Still 200
        while shutting down, so a probe does not kill the final upload."""
        stopped = self._live()
        if stopped:
            return web.json_response({"status": "stalled", "reasons": stopped}, status=503)
        return web.json_response({"status": "alive"})

    async def _metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp


def reply_to(messages: list[Message], before: int, text: str) -> list[Message]:
    """The agent's answer to the user message `text` posted when the conversation had
    `before` messages: the messages after that user message, up to the next user message.
    The user message is the first with id >= `before` and this text (else the first user
    message from there)."""
    ordered = sorted((m for m in messages if m.id >= before), key=lambda m: m.id)
    users = [m for m in ordered if m.role == "user"]
    mine = next((m for m in users if m.content == text), users[0] if users else None)
    if mine is None:
        return [m for m in ordered if m.role == "agent"]
    answer: list[Message] = []
    for message in ordered:
        if message.id <= mine.id:
            continue
        if message.role == "user":
            break
        answer.append(message)
    return answer


# -- parsing -------------------------------------------------------------------------------

_SEND_FIELDS = frozenset({"input", "type", "wait_s", "reply"})
_USAGE = ('expected {"input": "text", "type": "user"|"raw", "wait_s": seconds from 0 to '
          f'{MAX_WAIT_S:g}, "reply": true|false}}')


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _show(value: object) -> str:
    """A short, safe rendering of a client's value for an error detail."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to render
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _seconds(value: object) -> float | None:
    """`value` as seconds from 0 to MAX_WAIT_S, or None. Exact for any int, however long."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not 0 <= value <= MAX_WAIT_S:
        return None
    return float(value)


def parse_send(raw: bytes, default_wait_s: float) -> Input | web.Response:
    """A POST /send body as an Input, or the 400 that says what is wrong with it. Never
    raises, whatever the bytes: nesting, huge numbers and bad text are all a 400."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        return error(400, "The request body is nested too deeply.", _USAGE)
    except ValueError as exc:  # also bad UTF-8 and integers beyond Python's digit limit
        return error(400, "The request body is not valid JSON.", f"{str(exc)[:200]}; {_USAGE}")
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", _USAGE)
    unknown = sorted(set(body) - _SEND_FIELDS)
    if unknown:
        return error(400, f"Unknown field {_show(unknown[0])}.", _USAGE)
    kind = body.get("type", "user")
    if kind not in ("user", "raw"):
        return error(400, "Field 'type' must be \"user\" or \"raw\".", f"got {_show(kind)}")
    text = body.get("input")
    if not isinstance(text, str):
        return error(400, "Field 'input' is required and must be a string.", _USAGE)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return error(400, "Field 'input' must be valid Unicode text.",
                     "it holds a lone surrogate escape such as \\ud800")
    if kind == "user":
        # agentapi rejects surrounding whitespace; trim exactly the set it trims.
        text = text.strip(" \t\n\r\f\v")
    if not text:
        return error(400, "Field 'input' must not be empty.", _USAGE)
    wait_value = body.get("wait_s", default_wait_s)
    wait_s = _seconds(wait_value)
    if wait_s is None:
        return error(400, f"Field 'wait_s' must be a number from 0 to {MAX_WAIT_S:g}.",
                     f"got {_show(wait_value)}")
    reply = body.get("reply", False)
    if not isinstance(reply, bool):
        return error(400, "Field 'reply' must be true or false.", f"got {_show(reply)}")
    if reply and kind == "raw":
        return error(400, "Field 'reply' is only for \"user\" input.",
                     "raw keystrokes start no new message to reply with")
    return Input(text, kind, wait_s, reply)


def _shape(exc: web.HTTPException) -> web.Response:
    messages = {
        404: "No such endpoint; the relay serves POST /send, GET /status, /healthz, /livez, "
             "/metrics.",
        405: "Method not allowed on this endpoint.",
        413: f"The request body is over {MAX_BODY_BYTES} bytes.",
    }
    message = messages.get(exc.status, exc.reason)
    resp = error(exc.status, message, exc.text or "")
    if exc.status == 405 and "Allow" in exc.headers:
        resp.headers["Allow"] = exc.headers["Allow"]
    return resp


def _known(path: str) -> str:
    # A bounded label set: random paths from a fuzzer must not grow the registry.
    return path if path in KNOWN_PATHS else "other"
