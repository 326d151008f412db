"""One connection of a bounded server (the relay's, or the metrics port's): aiohttp's
HTTP/1.1 handler, plus what the server decides itself.

Half-close. A client may write its request and shut down its write side (`nc -N`, `socat`):
that read-side EOF is not a hang-up, so the connection stays open for the answer. A client
is gone when the socket reports a full hang-up (POLLHUP, which a half-close does not raise)
or when the connection is lost; that cancels its input if it has not been posted yet. The
server decides this itself: aiohttp's handler cancellation is off.

Headers. A request's headers must be complete within `relay_header_timeout_s` of its first
byte, however slowly they trickle in; the body and idle timeouts are aiohttp's own. These
three timeouts bound the metrics port's connections too.

Logs. Its events are named after its server (`relay_bad_http`, `metrics_bad_http`). What a
peer wrote goes in `detail`, redacted and clipped, never in `error`, which holds a fixed
kind (an exception type): the repeat limiter keys on `error`, so peer text there would make
every line a kind of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from agent_sidecar import logs
from agent_sidecar.config import Settings
from agent_sidecar.error_shape import error, raw_error
from agent_sidecar.unix_socket import Hangups, hung_up

log = logs.get("relay")  # one logger for both listeners: their event names say which
DETAIL_CHARS = 200  # of a peer's text in a log line or an answer


class BodyCutShort(ConnectionError):
    """The client shut down its side before the request body was complete."""


class ConnectionOwner(Protocol):
    """What a connection needs of the server that accepted it."""

    settings: Settings
    name: str  # the prefix of its log events
    hangups: Hangups | None

    def opened(self, conn: Connection) -> None: ...

    def closed(self, conn: Connection) -> None: ...

    def refused(self, status: int) -> None: ...


# -- aiohttp coupling ----------------------------------------------------------------------
#
# Verified against aiohttp 3.14.4 and 3.14.5, the range pyproject.toml allows (>=3.14.4,
# <3.15): the relay tests pass on both. Older releases fail them: before 3.14.4 aiohttp
# starts its keep-alive timer only after a first answer, so a connection that never sends
# a request is never timed out. Check a new minor version here before raising the bound.
#
# Why: aiohttp has no public way to ask whether a connection is between requests, nor to
# fail a pending body when the peer half-closes. The relay needs the first to tell idle
# connections (evicted at the cap, under the header timer, closed at a read-side EOF) from
# busy ones, and the second to answer a body cut short with a 400 at once. So this module
#   - subclasses `web_protocol.RequestHandler` and builds it itself, with the keywords that
#     `web.Server.__call__` would pass it;
#   - overrides its `finish_response`, `handle_error` and `log_exception` hooks, and the
#     asyncio protocol methods it implements;
#   - reads three private attributes, in the three functions below and nowhere else. They
#     are read with defaults, so a renamed attribute changes which connections look idle
#     instead of raising; tests/test_relay_connections.py pins what depends on them.


def _next_request_awaited(handler: RequestHandler) -> bool:
    """The handler's request loop is parked, waiting for the next request to be parsed."""
    waiter: asyncio.Future[None] | None = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


def _parsed_unhandled(handler: RequestHandler) -> Sequence[tuple[Any, StreamReader]]:
    """(message, body) of each request parsed but not handled yet, oldest first."""
    messages: Sequence[tuple[Any, StreamReader]] = getattr(handler, "_messages", ())
    return messages


def _current_request(handler: RequestHandler) -> web.BaseRequest | None:
    """The request being handled, if any."""
    current: web.BaseRequest | None = getattr(handler, "_current_request", None)
    return current


# -- the connection ------------------------------------------------------------------------


class Connection(RequestHandler):
    """One connection of a bounded server: aiohttp's HTTP/1.1 handler, plus what the server
    decides itself.

    Owns `gone` (set once the peer has hung up or the connection is lost), the header timer
    (`relay_header_timeout_s` from a request's first byte to its last header) and the
    half-close rule (a read-side EOF keeps the write side open while a request is pending;
    the connection closes after its answer). It registers itself with its `owner` while
    open. Its errors are answered in Coder's shape and logged as one structured line,
    without a traceback; nothing escapes into asyncio. It runs no task of its own: aiohttp's
    request task is cancelled when the connection is lost or closed.
    """

    __slots__ = ("_fd", "_header_timer", "_owner", "_read_eof", "gone", "probe_only")

    def __init__(self, manager: web.Server, owner: ConnectionOwner) -> None:
        settings = owner.settings
        super().__init__(
            manager, loop=asyncio.get_running_loop(),
            access_log=None,  # type: ignore[arg-type]  # typed Logger; None means none
            tcp_keepalive=False, auto_decompress=False,
            # aiohttp's keep-alive timeout closes a connection that has no request from its
            # start (since aiohttp 3.14.4), or since its last answer: the idle timeout.
            keepalive_timeout=settings.relay_idle_timeout_s,
            lingering_time=settings.relay_body_timeout_s)
        self._owner = owner
        self.gone = asyncio.Event()
        # Admitted over the connection cap, in the reserve kept for probes: it may read
        # (/status, /healthz, /livez, /metrics) but not send input.
        self.probe_only = False
        self._fd = -1
        self._read_eof = False
        self._header_timer: asyncio.TimerHandle | None = None

    # -- state ---------------------------------------------------------------------------

    def _awaiting_request(self) -> bool:
        """No request is queued or being handled: waiting for (the rest of) the next one."""
        return _next_request_awaited(self) and not _parsed_unhandled(self)

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
        current = request or _current_request(self)
        payloads = [payload for _, payload in _parsed_unhandled(self)]
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
        self._owner.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._owner.closed(self)
        if self._owner.hangups is not None:
            self._owner.hangups.unwatch(self._fd)
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
                self._owner.settings.relay_header_timeout_s, self._headers_too_slow)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's: bool | None
        try:
            return self._keep_open_after_eof()
        except Exception as exc:  # asyncio would log a traceback and close it anyway
            log.exception(f"{self._owner.name}_connection_error", where="at end of input",
                          error=type(exc).__name__)
            return False

    def _keep_open_after_eof(self) -> bool:
        if self._fd >= 0 and hung_up(self._fd):
            return False  # gone for good: close, which cancels what it asked
        self._read_eof = True
        if self._awaiting_request():
            return False  # nothing to answer
        self.cut_short()
        if self._owner.hangups is not None:
            self._owner.hangups.watch(self._fd, self._hangup_after_half_close)
        return True  # half-closed: the answer still goes out on this connection

    def _hangup_after_half_close(self) -> None:
        self.gone.set()
        self.force_close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is None or not self._awaiting_request():
            return
        timeout_s = self._owner.settings.relay_header_timeout_s
        self._owner.refused(408)
        self.transport.write(raw_error(
            408, "The request headers did not arrive in time.",
            f"they must be complete within relay_header_timeout_s ({timeout_s:g}s) of the "
            "request's first byte"))
        self.force_close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # -- aiohttp hooks -------------------------------------------------------------------

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if self._read_eof and not _parsed_unhandled(self):
            resp.force_close()  # the peer can send nothing more: close after this answer
        return await super().finish_response(request, resp, start_time)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp answers what it cannot parse (an unknown method, a broken header) here,
        before any middleware runs: answer in Coder's shape, log one line, no traceback.
        The line's `error` is the kind of failure (the exception's type); its headline,
        which quotes the peer's bytes, is the `detail`."""
        headline = (message or "").strip().splitlines()[0] if message else ""
        headline = headline or (f"{type(exc).__name__}: {exc}" if exc else "")
        kind = type(exc).__name__ if exc is not None else f"HTTP {status}"
        detail = logs.clip(headline, DETAIL_CHARS)
        if status >= 500:
            log.error(f"{self._owner.name}_request_failed", status=status, error=kind,
                      detail=detail)
        else:
            log.warning(f"{self._owner.name}_bad_http", status=status, error=kind,
                        detail=detail)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun; the connection is closed instead")
        text = ("The request is not valid HTTP." if status < 500
                else "The sidecar failed to handle this request.")
        resp = error(status, text, headline[:DETAIL_CHARS])
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else "unknown"
        detail = logs.clip(str(exc), DETAIL_CHARS) if isinstance(exc, BaseException) else ""
        # args[0] is aiohttp's message template: fixed text, the peer's address is args[1].
        log.error(f"{self._owner.name}_connection_error", where=str(args[0]) if args else "",
                  error=kind, detail=detail)
