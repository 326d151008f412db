"""The relay's HTTP API: POST /send, GET /status, /healthz, /livez and /metrics.

POST /send forwards input to the agent through agentapi `POST /message`. The relay binds its
private socket (unix_socket.py) and checks each peer's uid; the accept loop, the connections
and their limits are relay_server.py's; the body of a send is send_input.py's.

Ordering. Two locks. `user` inputs take the *queue* lock in arrival order (FIFO) and hold it
while they wait for the agent to be stable, while they are posted and, with `"reply": true`,
until the agent has answered. The *wire* lock is held only around one `POST /message`, by
`user` and `raw` inputs alike, so two POSTs never interleave. A `raw` input (keystrokes, e.g.
Escape) takes only the wire lock: it never waits for stable, nor behind a `user` input that
waits.

Outcomes. Never sent (agentapi unreachable): 503. Sent and refused: 502 with agentapi's
detail, including "typed but not submitted", never retried. Sent and no answer: 504, the
input may have been typed. Every send is answered within `wait_s + send_timeout_s` (under
ACP `acp_turn_timeout_s`) plus ANSWER_MARGIN_S. A client that hangs up before its input is
posted cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent_sidecar import logs
from agent_sidecar.agentapi import (
    TOO_LARGE,
    AgentAPI,
    AgentAPIError,
    AgentAPIUnavailable,
    NotStable,
    SendUnconfirmed,
    TypedNotSubmitted,
)
from agent_sidecar.aio import first_of
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation, Message
from agent_sidecar.error_shape import error
from agent_sidecar.metrics import CONTENT_TYPE, Metrics
from agent_sidecar.relay_connection import DETAIL_CHARS, BodyCutShort, Connection
from agent_sidecar.relay_server import PROBE_RESERVE, BoundedServer
from agent_sidecar.send_input import Input, parse_send
from agent_sidecar.unix_socket import RelayError, bind_unix, peer_uid, remove_socket_file

# What the rest of the code and the tests import from here, wherever it is defined.
__all__ = ["ANSWER_MARGIN_S", "Health", "Input", "Relay", "RelayError", "bind_unix", "error",
           "parse_send", "redacted", "reply_to"]

log = logs.get("relay")

MAX_BODY_BYTES = 1 << 20
NOT_STABLE_GRACE_S = 0.25  # agentapi's status lags its POST check by a 25 ms tick
# Connecting to agentapi (and asking it for its transport) may take this long even when
# wait_s is spent; with it, every send is answered within wait_s + send timeout + this.
CONNECT_FLOOR_S = 0.5
ANSWER_MARGIN_S = 2.0
CLIENT_GONE = 499  # nginx's "client closed request", for the metrics only
# A reply holds the agent's whole messages; huge, but never unbounded.
REPLY_MAX_CHARS = MAX_BODY_BYTES * 16
KNOWN_PATHS = ("/send", "/status", "/healthz", "/livez", "/metrics")


@dataclass(frozen=True)
class Health:
    """Critical reasons make /healthz 503; degraded ones (the sink) are reported with 200."""

    critical: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


class _Closing(Exception):
    """The relay is closing: the input is not sent."""


class _NotReady(Exception):
    """The wait for the agent (or for the input before it) ran out."""


class Relay:
    """The relay's HTTP API on a private Unix socket: /send, /status, /healthz, /livez,
    /metrics.

    Owns the aiohttp application, the send ordering (its two locks and the counts of inputs
    waiting), the peer check and the socket file; the accept loop, the connections and their
    limits are its `server`'s. `start()` binds the socket (RelayError if it cannot be
    served) and runs its accept loop and aiohttp's connection tasks; `close()` stops taking
    sends (inputs not yet posted are answered 503); `stop()` stops accepting, closes every
    connection and removes the socket file if it is still ours (a stop cancelled before the
    socket is closed leaves the file too). A handler never raises: failures are answered in
    Coder's error shape and logged once. Every JSON answer but a delivered reply is scrubbed
    of secrets on its way out (`redacted`). An input whose client hangs up before it is posted
    is dropped; once posted, a POST is always finished (agentapi cannot unsend keystrokes):
    cancelling a send handler (as `stop()` does past its timeout) drops an input still
    waiting, and a POST in flight is still finished. Every setting is read from `settings`
    when it is used, so a reload applies to the next send or connection.
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
        self._status = status
        self._health = health
        self._live = live
        self._uid_of = uid_of
        self._allowed_uids = {0, os.getuid()}
        self._queue = asyncio.Lock()  # user inputs, FIFO: waiters acquire in arrival order
        self._wire = asyncio.Lock()  # one POST /message at a time
        self.waiting = 0  # user inputs queued behind the one being served
        self.raw_waiting = 0  # raw inputs waiting for a POST in flight to finish
        # Inputs (by id) that reached agentapi after their client hung up: a shielded POST
        # outlives the cancelled handler, so only this says what became of them.
        self._delivered: set[int] = set()
        self.closing = False
        self._closed = asyncio.Event()
        self._probed: tuple[int, str] | None = None  # (follower reconnects, transport)
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._guard]
        )
        self.app.router.add_post("/send", self._send)
        self.app.router.add_get("/status", self._get_status)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/metrics", self._metrics)
        self.server = BoundedServer(
            self.app, settings, name="relay", cap_setting="relay_max_connections",
            max_connections=lambda settings: settings.relay_max_connections,
            probe_reserve=PROBE_RESERVE,
            on_refused=lambda status: metrics.relay_requests.labels(
                path="other", code=str(status)).inc())
        self._bound: tuple[Path, int] | None = None  # the socket file and its inode

    @property
    def settings(self) -> Settings:
        # One copy, the server's: a reload that sets it here reaches the connections too.
        return self.server.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.server.settings = settings

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, path: Path) -> None:
        sock = bind_unix(path)
        self._bound = (path, path.stat().st_ino)  # noqa: ASYNC240 - one stat of a local socket
        try:
            await self.server.start([sock])
        except BaseException:
            self._unlink()
            raise
        log.info("relay_listening", socket=str(path))

    @property
    def busy(self) -> bool:
        """An input is being served (waiting for stable, or being posted)."""
        return self._queue.locked() or self._wire.locked()

    @property
    def connections(self) -> int:
        return self.server.connections

    def close(self) -> None:
        """Stop taking new sends; inputs waiting for their turn are answered 503."""
        self.closing = True
        self._closed.set()

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Close the socket and remove its file, waiting at most `timeout_s` for handlers."""
        self.close()
        try:
            await self.server.stop(timeout_s)
        finally:
            if not self.server.listening:
                self._unlink()

    def _unlink(self) -> None:
        if self._bound is not None:
            remove_socket_file(*self._bound)
            self._bound = None

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
        resp = redacted(request, resp)
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
        if isinstance(conn, Connection) and conn.probe_only:
            return error(503, *self.server.full())
        if isinstance(conn, Connection):
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
        gone = conn.gone if isinstance(conn, Connection) else asyncio.Event()
        work = asyncio.ensure_future(self._handle(parsed))
        try:
            if await first_of(work, gone.wait()) == 0:
                return work.result()
            work.cancel()
            await asyncio.wait([work])
            log.info("relay_sender_gone", type=parsed.kind,
                     delivered=id(parsed) in self._delivered)
            return web.Response(status=CLIENT_GONE)
        finally:
            self._delivered.discard(id(parsed))
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
                state = self.agentapi.state
                headline = ("agentapi answers, but the sidecar cannot follow it."
                            if state.last_error and state.answered
                            else "agentapi cannot be reached.")
                return error(503, headline,
                             f"not connected to {self.agentapi.url} within {inp.wait_s:g}s"
                             f"{self._follower_error()}; the input was not sent")
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
                # With a reply, where the input will land is asked of agentapi itself:
                # the model can be a poll interval stale (another client's input and its
                # answer missing) or from before an agentapi restart (ids too high).
                placed = (await self._next_id(wait_until) if inp.reply
                          else _Placed(self.conversation.count))
                before = placed.next_id
                # What the view holds from there at the post: after an agentapi restart it
                # has not seen, old messages sit at the new ids, and are not the reply.
                watch = _Turn(before, inp.text, {m.id: m.content for m in
                                                 self.conversation.messages()
                                                 if m.id >= before})
                turn = (asyncio.ensure_future(self._turn_over(watch))
                        if inp.reply and not acp else None)
                try:
                    await self._acquire(self._wire, wait_until)
                    try:
                        answer_by = await self._post(inp, timeout_s, wait_until)
                        watch.polls_at_post = self.agentapi.state.polls_started
                    finally:
                        self._wire.release()
                    if not inp.reply:
                        return web.Response(status=204)
                    return await self._reply(inp, placed, turn, answer_by, timeout_s)
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
        """POST the input, unless the relay is closing (the caller holds the wire lock); the
        loop time by which its answer (and a reply) must be done. Once a POST has started it
        is finished even if our client hangs up: agentapi cannot unsend typed keystrokes, and
        abandoning it would leave its lock held."""
        if self.closing:
            raise _Closing
        loop = asyncio.get_running_loop()
        connect_s = self._connect_s(wait_until)
        answer_by = loop.time() + timeout_s  # connecting to agentapi is all but instant
        send = asyncio.ensure_future(self.agentapi.send(
            inp.text, inp.kind, timeout_s=timeout_s, connect_timeout_s=connect_s))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            await asyncio.wait([send])
            if not send.cancelled() and send.exception() is None:
                self._delivered.add(id(inp))  # for _send's log line: the client left, but
                log.info("relay_delivered_after_hangup", type=inp.kind)  # agentapi has it
            raise
        return answer_by

    async def _transport(self, wait_until: float) -> str | None:
        """"pty" or "acp": the follower's knowledge, else (not known yet, or an agentapi
        before v0.12, which says nothing) asked once per agentapi connection;
        None when that cannot be told in time (then a user input goes as over a PTY, and a
        raw one is not sent)."""
        known = self._known_transport()
        if known is not None:
            return known
        state = self.agentapi.state
        try:
            async with asyncio.timeout(self._connect_s(wait_until)):
                info = await self.agentapi.status_info()
            # Before v0.12 agentapi says nothing: those versions have no ACP.
            transport = info.transport or "pty"
        except (AgentAPIError, AgentAPIUnavailable, TimeoutError) as exc:
            log.warning("relay_transport_unknown", error=type(exc).__name__,
                        detail=logs.clip(str(exc), DETAIL_CHARS))
            return None
        self._probed = (state.reconnects, transport)
        return transport

    def _known_transport(self) -> str | None:
        """"pty" or "acp" as the follower or this agentapi connection's probe told; None
        when neither has."""
        state = self.agentapi.state
        if state.transport is not None:
            return state.transport
        if state.status_read:
            return "pty"  # before v0.12 agentapi says nothing: those versions have no ACP
        if self._probed is not None and self._probed[0] == state.reconnects:
            return self._probed[1]
        return None

    def _follower_error(self) -> str:
        """The follower's last error, as a clause for a detail ("" when it has none): an
        agentapi that answers but whose /messages cannot be read (over
        max_agentapi_response_bytes, say) must not read as one that cannot be reached."""
        last = self.agentapi.state.last_error
        if not last:
            return ""
        return f"; the follower's last error: {logs.clip(last, DETAIL_CHARS)}"

    def _connect_s(self, wait_until: float) -> float:
        """How long connecting to agentapi (or asking it for its transport) may take: what
        is left of wait_s, but at least CONNECT_FLOOR_S and at most agentapi_timeout_s."""
        left = wait_until - asyncio.get_running_loop().time()
        return min(self.settings.agentapi_timeout_s, max(CONNECT_FLOOR_S, left))

    # -- reply ---------------------------------------------------------------------------

    async def _turn_over(self, watch: _Turn) -> None:
        """Until the turn after a send over a PTY is over: the agent was seen running, then
        stable again; or, when polling is too slow to see it run, it is stable with a new
        reply after the input (agentapi is `running` until its screen has been still for
        2 s, so stable with a reply means the reply is whole), or with one a poll after the
        post dropped (larger than max_event_bytes). Started before the POST, so that no
        status change is missed."""
        conv = self.conversation
        running = False
        while True:
            version = conv.version
            if conv.connected and conv.status == "running":
                running = True
            elif conv.connected and conv.status == "stable" and (
                    running or self._replied_after(watch) or self._dropped_after(watch)):
                return
            await conv.wait_changed(version)

    def _mine(self, watch: _Turn) -> list[int]:
        """The ids of the user messages in the view that may be our input, found by its
        text: a view not yet rebuilt after an agentapi restart holds old messages at and
        after `before` (ids from 0 again)."""
        return [m.id for m in self.conversation.messages()
                if m.id >= watch.before and m.role == "user" and (
                    m.content == watch.text
                    or (m.cut_chars and watch.text.endswith(m.content)))]

    def _replied_after(self, watch: _Turn) -> bool:
        """The view's last message is the agent's, after our input, and not one the view
        held as it is at the post (a stale one at the id our reply will take)."""
        messages = self.conversation.messages()
        if not messages or messages[-1].role != "agent":
            return False
        last, mine = messages[-1], self._mine(watch)
        return bool(mine) and last.id > mine[-1] and watch.stale.get(last.id) != last.content

    def _dropped_after(self, watch: _Turn) -> bool:
        """A poll begun after the post dropped an element after our input: the reply is
        there, too large to read, and the reply's read says so."""
        polled = self.agentapi.state.polled
        if polled is None or watch.polls_at_post is None or polled[0] <= watch.polls_at_post:
            return False
        drop_after, mine = polled[1], self._mine(watch)
        return drop_after is not None and bool(mine) and drop_after >= mine[-1]

    async def _next_id(self, wait_until: float) -> _Placed:
        """The id agentapi will give the next message, from a GET /messages read just
        before the post (each message's content is cut to nothing as it is read, so only
        the ids cost memory). Elements dropped after the newest usable one still took
        ids. If the read fails, the model's count, with why."""
        top = -1
        trailing = 0  # elements dropped since the newest usable message

        def seen(message: Message) -> None:
            nonlocal top, trailing
            top, trailing = max(top, message.id), 0

        def dropped(_reason: str) -> None:
            nonlocal trailing
            trailing += 1

        try:
            # Within the send's own bound: the connect floor is in ANSWER_MARGIN_S.
            async with asyncio.timeout(self._connect_s(wait_until)):
                await self.agentapi.read_messages(0, seen, dropped)
        except (AgentAPIError, AgentAPIUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._connect_s(wait_until):g}s"
            log.warning("relay_reply_place_from_view", error=type(exc).__name__,
                        detail=logs.clip(why, DETAIL_CHARS))
            return _Placed(self.conversation.count, logs.clip(why, DETAIL_CHARS))
        return _Placed(top + 1 + trailing)

    async def _reply(self, inp: Input, placed: _Placed, turn: asyncio.Future[None] | None,
                     answer_by: float, timeout_s: float) -> web.Response:
        """200 with the agent's answer to the delivered input, once it is stable again (over
        ACP the POST itself lasted the whole turn), and `incomplete` saying why when it
        may lack a part."""
        before = placed.next_id
        turn_over = turn is None
        # Only the messages from the input on: what the reply can hold, so that a long
        # /messages costs one element's memory, not the whole history's.
        messages: list[Message] = []
        unplaced: list[str] = []  # drops not known to come before the input

        def take(message: Message) -> None:
            if message.id <= before:
                unplaced.clear()  # every drop so far came before this message, or the input
            if message.id >= before:
                messages.append(message)

        from_view: str | None = None
        try:
            async with asyncio.timeout_at(answer_by):
                if turn is not None:
                    await turn
                    turn_over = True
                await self.agentapi.read_messages(REPLY_MAX_CHARS, take, unplaced.append)
        except TimeoutError:
            if not turn_over:
                return error(504, "The input was delivered, but the agent's reply did not "
                             "finish in time.",
                             f"the agent was not stable again within {timeout_s:g}s of the "
                             f"send{self._follower_error()}; do not resend it")
            from_view = f"agentapi did not answer GET /messages within {timeout_s:g}s"
        except (AgentAPIError, AgentAPIUnavailable) as exc:
            from_view = logs.clip(str(exc), DETAIL_CHARS)
        if from_view is not None:
            log.warning("relay_reply_from_view", detail=from_view)
            messages, unplaced = self.conversation.messages(), []
        reply = reply_to(messages, before, inp.text)
        incomplete = self._incomplete(reply, unplaced, from_view, placed.from_view)
        body: dict[str, Any] = {"messages": [
            {"id": m.id, "role": m.role, "content": m.content, "time": m.time} for m in reply
        ]}
        if incomplete:
            log.warning("relay_reply_incomplete", detail=incomplete)
            body["incomplete"] = incomplete
        return web.json_response(body)

    def _incomplete(self, reply: list[Message], unplaced: list[str], from_view: str | None,
                    placed_from_view: str | None) -> str:
        """Why the reply may lack part of the agent's answer, naming the setting or limit
        that cut it; "" when nothing is known to be missing."""
        why: list[str] = []
        if from_view is not None:
            retain = self.conversation.retain_chars
            why.append(f"agentapi's /messages could not be read ({from_view}), so this is "
                       f"the sidecar's own view, which keeps only the last {retain} "
                       "characters of a message and the newest messages")
        elif any(m.cut_chars for m in reply):
            why.append(f"a message was cut to its last {REPLY_MAX_CHARS} characters (the "
                       "relay's cap on a reply)")
        if unplaced:
            counts: dict[str, int] = {}
            for reason in unplaced:
                counts[reason] = counts.get(reason, 0) + 1
            shown = ", ".join(
                f"{n} {reason}" + (f" ({self.settings.max_event_bytes} bytes)"
                                   if reason == TOO_LARGE else "")
                for reason, n in counts.items())
            why.append(f"agentapi's /messages held elements from the input on that were "
                       f"dropped: {shown}")
        if not any(m.role == "agent" for m in reply):
            text = "agentapi lists no agent message after the delivered input"
            if placed_from_view is not None:
                text += (" (where the input landed was taken from the sidecar's view, which "
                         f"may be stale: GET /messages failed before the post: "
                         f"{placed_from_view})")
            why.append(text)
        return "; ".join(why)

    # -- GET -----------------------------------------------------------------------------

    def send_timeout_s(self) -> float:
        """The bound on one POST /message once written: acp_turn_timeout_s under ACP, and
        the larger of the two while the transport is not known yet."""
        s = self.settings
        transport = self._known_transport()
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
            "connections": self.server.connections,
            "max_connections": self.server.max_connections(),
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


@dataclass(slots=True)
class _Turn:
    """A reply's input, as the turn-over watch knows it: agentapi's next id before the
    post, the text, what the view held from that id at the post, and how many polls had
    started when the POST returned (None: not yet)."""

    before: int
    text: str
    stale: dict[int, str]
    polls_at_post: int | None = None


@dataclass(frozen=True, slots=True)
class _Placed:
    """Where a reply's input lands: the id agentapi gives the next message, and why it
    was taken from the sidecar's view instead (None: agentapi said)."""

    next_id: int
    from_view: str | None = None


def reply_to(messages: list[Message], before: int, text: str) -> list[Message]:
    """The agent's answer to the user message `text` posted when agentapi's next id was
    `before`: the messages after that user message, up to the next user message.
    The user message is the last with id >= `before` and this text (else the first user
    message from there): should `before` be too low, an identical input of another
    client's is older than ours, and one posted after ours had to wait for our turn to end
    (agentapi takes input only while the agent is stable)."""
    ordered = sorted((m for m in messages if m.id >= before), key=lambda m: m.id)
    users = [m for m in ordered if m.role == "user"]
    mine = next((m for m in reversed(users) if m.content == text),
                users[0] if users else None)
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


def redacted(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """`resp` with every string of its JSON body scrubbed as the logs are (`logs.redactor`:
    URL userinfo, the agent token, old and rotated, and the configured URLs' passwords).

    Every answer of the relay passes here (the outermost middleware), so no field of
    /status, /healthz, /livez or an error body, present or future, can carry a secret that
    a log line would mask. The one exception is a delivered /send's reply: the agent's own
    messages, passed as they are, as the snapshots carry them.
    """
    if not isinstance(resp, web.Response) or resp.content_type != "application/json":
        return resp
    body = resp.body
    if not isinstance(body, bytes) or (request.path == "/send" and resp.status < 300):
        return resp
    try:
        clean = json.dumps(_scrubbed(json.loads(body))).encode()
    except (ValueError, RecursionError):  # not ours, then: scrub it as a JSON log line
        clean = logs.redactor.scrub_escaped(body.decode("utf-8", "replace")).encode()
    if clean != body:
        resp.body = clean
    return resp


def _scrubbed(value: Any) -> Any:
    """Decoded JSON with each string in it, keys too, scrubbed."""
    if isinstance(value, str):
        return logs.redactor.scrub(value)
    if isinstance(value, dict):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


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
