"""The relay: a small HTTP API on a private Unix socket.

POST /send forwards input to the agent through agentapi, one request at a time, in arrival
order, waiting for the agent to be stable first. A sender that hangs up before its turn
comes is dropped (aiohttp cancels its handler), so input is never delivered late.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent_sidecar import logs, paths
from agent_sidecar.agentapi import AgentAPI, AgentAPIError, AgentAPIUnavailable, NotStable
from agent_sidecar.aio import first_of
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import CONTENT_TYPE, Metrics

log = logs.get("relay")

MAX_BODY_BYTES = 1 << 20
MAX_WAIT_S = 3600.0
NOT_STABLE_GRACE_S = 0.25  # agentapi's status lags its POST check by a 25 ms tick
UNIX_PATH_MAX = 107


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


class _ShapedErrorsHandler(RequestHandler):
    """aiohttp answers what it cannot parse (an unknown method, a broken header) itself, in
    plain text, before any middleware runs. This gives those answers Coder's shape too."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs, checks state
        headline = (message or "").strip().splitlines()[0] if message else plain.reason
        text = ("The request is not valid HTTP." if plain.status < 500
                else "The sidecar failed to handle this request.")
        resp = error(plain.status, text, headline)
        resp.force_close()
        return resp


class _ShapedErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        # Mirrors web.Server.__call__ (aiohttp 3.9-3.14), with our handler class.
        return _ShapedErrorsHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ShapedErrorsServer
        return server


class Relay:
    """The relay's HTTP API on a private Unix socket: /send, /status, /healthz, /metrics.

    `start()` binds the socket (RelayError if it cannot be served) and serves it from
    aiohttp's own tasks; `close()` stops taking sends; `stop()` closes the socket and removes
    its file. A handler never raises: failures are answered in Coder's error shape. A client
    that hangs up cancels its handler, and with it an input that has not been forwarded yet.
    `send_wait_s` and `send_timeout_s` are read from `settings` at each request.
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
        self._lock = asyncio.Lock()  # FIFO: waiters acquire in arrival order
        self.waiting = 0  # sends queued behind the one being served
        self.closing = False
        self._closed = asyncio.Event()
        self.path: Path | None = None
        self._inode: int | None = None
        self._runner: web.AppRunner | None = None
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
        self._runner = _Runner(
            self.app, handle_signals=False, access_log=None, handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("relay_listening", socket=str(path))

    @property
    def busy(self) -> bool:
        """A send is being served (waiting for stable, or being forwarded)."""
        return self._lock.locked()

    def close(self) -> None:
        """Stop taking new sends; requests waiting for their turn are answered 503."""
        self.closing = True
        self._closed.set()

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Close the socket and remove its file, waiting at most `timeout_s` for handlers."""
        self.close()
        try:
            if self._runner is not None:
                async with asyncio.timeout(timeout_s):
                    await self._runner.cleanup()
        except TimeoutError:
            log.warning("relay_stop_timed_out", timeout_s=timeout_s)
        finally:
            self._runner = None
            self._unlink()

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                # Only our own socket: a successor may already have bound the path.
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

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
            log.exception("relay_handler_failed", path=request.path)
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

    # -- handlers ------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        if self.closing:
            return error(503, "The sidecar is shutting down.", "retry against its successor")
        parsed = _parse_send(await request.read(), self.settings.send_wait_s)
        if isinstance(parsed, web.Response):
            return parsed
        text, kind, wait_s = parsed
        self.waiting += 1
        try:
            async with asyncio.timeout(wait_s) as budget:
                try:
                    await self._lock.acquire()
                finally:
                    self.waiting -= 1
                try:
                    await self._deliver(text, kind, budget)
                finally:
                    self._lock.release()
        except TimeoutError:
            if not self.conversation.connected:
                return error(503, "agentapi cannot be reached.",
                             f"not connected to {self.agentapi.url} within {wait_s:g}s")
            return error(409, "The agent is still busy.",
                         f"it did not become stable within {wait_s:g}s; retry later or raise "
                         "wait_s")
        except _Closing:
            return error(503, "The sidecar is shutting down.", "retry against its successor")
        except AgentAPIUnavailable as exc:
            return error(503, "agentapi cannot be reached.", str(exc))
        except AgentAPIError as exc:
            return error(502, "agentapi rejected the input.", exc.detail or str(exc))
        return web.Response(status=204)

    async def _deliver(self, text: str, kind: str, budget: asyncio.Timeout) -> None:
        if kind == "raw":
            budget.reschedule(None)
            await self._forward(text, kind)
            return
        conv = self.conversation
        while True:
            if self.closing:
                raise _Closing
            if conv.status != "stable" or not conv.connected:
                await self._wait_change(conv.version)
                continue
            deadline = budget.when()
            # Once forwarding starts, it finishes: a 409 for a delivered input would lie.
            budget.reschedule(None)
            try:
                await self._forward(text, kind)
                return
            except NotStable:
                # Our view lags agentapi's: wait for the status to catch up, then again
                # for stable, all within the same budget.
                budget.reschedule(deadline)
                version = conv.version
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(NOT_STABLE_GRACE_S):
                        await self._wait_change(version)

    async def _wait_change(self, version: int) -> None:
        """Until the conversation changes or the relay closes."""
        await first_of(self.conversation.wait_changed(version), self._closed.wait())

    async def _forward(self, text: str, kind: str) -> None:
        # Once a POST has started it is finished even if our client hangs up: agentapi
        # cannot unsend typed keystrokes, and abandoning it would leave its lock held.
        send = asyncio.ensure_future(self.agentapi.send(text, kind))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            await asyncio.wait([send])
            if not send.cancelled() and send.exception() is None:
                log.info("relay_delivered_after_hangup", type=kind)
            raise

    async def _get_status(self, request: web.Request) -> web.Response:
        data = self._status()
        data.setdefault("relay", {})["queue_length"] = self.waiting
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


class _Closing(Exception):
    pass


_SEND_FIELDS = frozenset({"input", "type", "wait_s"})


def _parse_send(raw: bytes, default_wait_s: float) -> tuple[str, str, float] | web.Response:
    usage = 'expected {"input": "text", "type": "user"|"raw", "wait_s": seconds}'
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return error(400, "The request body is not valid JSON.", f"{exc}; {usage}")
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", usage)
    unknown = sorted(set(body) - _SEND_FIELDS)
    if unknown:
        return error(400, f"Unknown field {unknown[0]!r}.", usage)
    kind = body.get("type", "user")
    if kind not in ("user", "raw"):
        return error(400, "Field 'type' must be \"user\" or \"raw\".", f"got {kind!r}")
    text = body.get("input")
    if not isinstance(text, str):
        return error(400, "Field 'input' is required and must be a string.", usage)
    if kind == "user":
        # agentapi rejects surrounding whitespace; trim exactly the set it trims.
        text = text.strip(" \t\n\r\f\v")
    if not text:
        return error(400, "Field 'input' must not be empty.", usage)
    wait_s = body.get("wait_s", default_wait_s)
    if (isinstance(wait_s, bool) or not isinstance(wait_s, int | float)
            or not math.isfinite(wait_s) or not 0 <= wait_s <= MAX_WAIT_S):
        return error(400, f"Field 'wait_s' must be a number from 0 to {MAX_WAIT_S:g}.",
                     f"got {wait_s!r}")
    return text, kind, float(wait_s)


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
    return path if path in ("/send", "/status", "/healthz", "/livez", "/metrics") else "other"
