"""The agentapi client: a reconnecting follower of /events, and the one-shot calls.

Every connect to /events replays the whole conversation, then one status_change, then live
deltas (agentapi-protocol.md §7). The follower collects the replay aside and swaps it in
when that status_change arrives, so a reconnect or an agentapi restart rebuilds the model
instead of merging into it.

Versions (field-notes.md §3, §4). v0.10 says only `status`; v0.11 adds `agent_type`;
v0.12 adds `transport` ("pty" or "acp") to /status, never to status_change. On each
connect the follower reads /status once, beside the stream, to learn the transport and
agent type (FollowState); status_change keeps agent_type current. Under ACP:
- a user POST /message holds agentapi's lock for the whole turn, so /status and /messages
  hang until it ends. Reads that wait on that lock are "busy", never "unreachable": the
  polling fallback keeps the last state and waits for the answer (no timeout on the
  answer once the transport is known to be ACP; before that, it asks again every
  `agentapi_timeout_s`), and never marks agentapi disconnected for it;
- a failed prompt's placeholder agent message is removed without an event. The follower
  reconciles: after each status_change to `stable` (the end of every turn, failed or not),
  and when it first learns the transport is ACP while the agent is stable, it reads
  /messages once and drops the held ids agentapi no longer has. A replay (any reconnect)
  and every poll rebuild the model anyway.

What agentapi sends is bounded (issue 15): response bodies by a cap after decompression
(bodies.py; /messages by `max_agentapi_response_bytes`), SSE events by `max_event_bytes`, and
redirects are followed only within agentapi's own origin (issue 10): agentapi's API paths
never redirect (only `/` does, to its chat UI), so a redirect elsewhere is refused and
named, never followed to another host. An event stream is never decompressed: agentapi
writes it as plain text, so one with a Content-Encoding is refused.

GET /messages is read as it arrives: its `messages` array is split into elements
(jsonarray.py) and each is parsed on its own, so one bad element (an id past Python's
int digit limit, a field nested 100 000 deep, a wrong type, one larger than
`max_event_bytes`) is dropped with a warning and the others are kept. The whole body is
never held: what the reader keeps is one element and whatever its caller keeps of the
messages (the follower: a pruned model).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from agent_sidecar import logs, neterrors
from agent_sidecar.aio import Backoff, Pulse
from agent_sidecar.bodies import IDENTITY, BodyError, BodyTooLarge, iter_capped, read_capped
from agent_sidecar.config import Settings
from agent_sidecar.conversation import MAX_ID, Conversation, Message, Status, make_message
from agent_sidecar.jsonarray import ArraySplitter, NoArray, TooLarge
from agent_sidecar.sse import Decoder, Event, Oversized

log = logs.get("agentapi")

HEALTHY_CONNECTION_S = 60.0  # a stream that lived this long resets the reconnect back-off
# A followed stream that lived this long is retried at once when it ends; a shorter one
# backs off, so an agentapi that drops every stream at once cannot make us spin.
QUICK_RECONNECT_AFTER_S = 1.0
EVENTS_RETRY_S = 60.0  # while polling, how often to try /events again
NOT_STABLE = "agent is waiting for user input"  # the text of agentapi's "not stable" 500
# The released phase 1 failure (v0.10 - v0.12.1): the text was typed, Enter was not sent.
TYPED_NOT_SUBMITTED = "failed to wait for screen to stabilize"
STATUS_BODY_BYTES = 64 * 1024  # /status is about 150 bytes
ERROR_BODY_BYTES = 64 * 1024  # an error body is only shown, cut to 500 characters
MAX_REDIRECTS = 3  # same-origin hops followed; agentapi's API paths never redirect
REDIRECTS = frozenset({301, 302, 303, 307, 308})
TRANSPORTS = frozenset({"pty", "acp"})
MAX_AGENT_TYPE_CHARS = 64


DETAIL_CHARS = 500  # of agentapi's error text, in a log line or a relay answer


class AgentAPIError(Exception):
    """agentapi answered, but not with what was asked for."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class AgentAPIUnavailable(Exception):
    """agentapi could not be reached. From `send()`: the request was never written, so
    nothing was typed and sending again is safe."""


class AgentAPIBusy(AgentAPIUnavailable):
    """agentapi took the request but has not answered in time: it holds its lock for a
    POST /message (a PTY send, or a whole ACP turn). It is alive."""


class NotStable(AgentAPIError):
    """agentapi refused a user message because the agent is not waiting for input; nothing
    was typed."""


class TypedNotSubmitted(AgentAPIError):
    """agentapi typed the text into the agent's input box, then failed before submitting it
    (`failed to wait for screen to stabilize`, field-notes.md §3). Sending again would type
    it a second time."""


class SendUnconfirmed(Exception):
    """The request was written, but no answer came: it timed out or the connection dropped.
    The input may have been typed, or even submitted; sending again blindly may repeat it."""


class BadMessage(ValueError):
    """A message from agentapi that coderd could not take; the text says which field."""


@dataclass
class FollowState:
    """What /status and /healthz report about the follower."""

    mode: str = "events"  # or "polling"
    reconnects: int = 0
    last_error: str | None = None
    # Whether agentapi answered the attempt that failed last (an answer the follower
    # could not use, such as a /messages over its cap), rather than not at all.
    answered: bool = False
    transport: str | None = None  # "pty" | "acp" from /status (v0.12+); None: not said
    agent_type: str | None = None  # from /status or status_change (v0.11+); None: not said
    status_read: bool = False  # a /status answer was read: a None transport is then a "no"
    # Polling: how many polls have started, and of the newest one adopted, its number and
    # the id of the usable message before its last dropped element (-1: the drop came
    # first; None: nothing was dropped). A reply in polling mode learns from it that the
    # agent's answer exists but was dropped (relay.py).
    polls_started: int = 0
    polled: tuple[int, int | None] | None = None
    # Notified once per disappearance of agentapi: a stream it had been following ended,
    # and the next connect failed (polling: a poll failed after one that answered). The
    # uploader then writes the last word (uploader.py).
    gone: Pulse = field(default_factory=Pulse)


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """One /status answer: `status` is None for a value this client does not know;
    `transport` and `agent_type` are None when this agentapi version does not say."""

    status: Status | None
    transport: str | None = None
    agent_type: str | None = None


def parse_message(data: dict[str, Any], text_field: str, retain_chars: int) -> Message:
    """A message from /messages (`content`) or from message_update (`message`).

    Raises BadMessage when coderd could not take it: an id that is not an integer within
    0..2**63-1 (Go's int64; agentapi's ids start at 0), a role or text that is not a
    string. An unusable time is not an error: the message comes back `time_replaced`.
    """
    id_ = data.get("id")
    if type(id_) is not int or not 0 <= id_ <= MAX_ID:
        raise BadMessage("id is not an integer within int64")
    role = data.get("role")
    text = data.get(text_field)
    if not isinstance(role, str) or not isinstance(text, str):
        raise BadMessage(f"role or {text_field} is not a string")
    return make_message(id_, role, text, data.get("time"), retain_chars)


def parse_status(value: object) -> Status | None:
    if value == "running" or value == "stable":
        return value
    return None


def parse_status_info(data: object) -> StatusInfo:
    """A /status body of any version (field-notes.md §3): unknown or odd values are None."""
    if not isinstance(data, dict):
        return StatusInfo(None)
    transport = data.get("transport")
    return StatusInfo(parse_status(data.get("status")),
                      transport if transport in TRANSPORTS else None,
                      _agent_type(data.get("agent_type")))


def _agent_type(value: object) -> str | None:
    """agentapi's agent type (`claude`, `custom`, ...) if it is a short printable string."""
    if isinstance(value, str) and 0 < len(value) <= MAX_AGENT_TYPE_CHARS and value.isprintable():
        return value
    return None


def _clipped(value: object) -> str:
    """A peer's value for a log line: its repr, from at most 60 characters of it."""
    return repr(value[:60] if isinstance(value, str) else value)[:80]


def _loads(body: bytes | str) -> Any:
    """JSON from a peer; ValueError for anything that is not, however deeply nested."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


TOO_LARGE = "larger than max_event_bytes"  # the reason an oversized element is dropped


def _element(element: bytes | TooLarge, retain_chars: int) -> Message | str:
    """One element of /messages as a Message, or why it cannot be used (fixed texts,
    never the peer's)."""
    if isinstance(element, TooLarge):
        return TOO_LARGE
    try:
        data = _loads(element.decode("utf-8", "replace"))
    except ValueError:  # the int digit limit and nesting too deep included
        return "invalid JSON"
    try:
        if not isinstance(data, dict):
            raise BadMessage("not an object")
        return parse_message(data, "content", retain_chars)
    except BadMessage as exc:
        return str(exc)


def _below(limit: int, each: Callable[[Message], None]) -> Callable[[Message], None]:
    """`each`, for the messages whose id is below `limit` only."""
    def take(message: Message) -> None:
        if message.id < limit:
            each(message)
    return take


def problem_detail(body: bytes) -> str:
    """A person-readable text from agentapi's problem+json, or the raw text of anything else,
    at most DETAIL_CHARS characters (redacted before it is cut)."""
    try:
        data = _loads(body)
    except ValueError:
        return logs.clip(body.decode("utf-8", "replace").strip(), DETAIL_CHARS)
    if not isinstance(data, dict):
        return logs.clip(str(data), DETAIL_CHARS)
    parts = [str(data.get("detail") or data.get("title") or "")]
    errors = data.get("errors")
    if isinstance(errors, list):
        parts += [str(e.get("message")) for e in errors if isinstance(e, dict) and e.get("message")]
    return logs.clip(": ".join(p for p in parts if p), DETAIL_CHARS)


def _shown(url: URL) -> str:
    """A URL fit for a log line: no user info, no query, no fragment, cut short."""
    try:
        shown = str(url.with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        shown = "<unusable URL>"
    return shown[:200]


class AgentAPI:
    """The client of one agentapi (agentapi-protocol.md).

    `follow()` keeps a Conversation in step until cancelled and never raises otherwise;
    cancelling it also cancels the /status probe and the ACP reconcile it runs beside the
    stream. The one-shot calls raise AgentAPIUnavailable (no answer; AgentAPIBusy when
    agentapi took the request but holds its lock) or AgentAPIError (a wrong answer, a body
    over its cap, a redirect to another host). It reads its timeouts, caps and back-off
    from `settings` at each use, so a reload that replaces `settings` takes effect at the
    next request or reconnect; `agentapi_url` needs a restart. It owns no session: the
    caller's is used and left open.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self.settings = settings
        self._base = URL(settings.agentapi_url)
        self._on_event = on_event or (lambda _kind: None)
        self.state = FollowState()

    def _url(self, path: str) -> URL:
        return self._base.with_path(self._base.path.rstrip("/") + path)

    @property
    def url(self) -> str:
        """agentapi's base URL as errors, logs and the relay show it: without its user and
        password (requests still send them)."""
        return str(self._base.with_user(None))

    # -- GETs ----------------------------------------------------------------------------

    def _same_origin(self, url: URL) -> bool:
        base = self._base
        return (url.scheme == base.scheme and (url.host or "").lower() == (base.host or "").lower()
                and url.port == base.port)

    @asynccontextmanager
    async def _get(self, path: str, *, wait_s: float | None,
                   headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `path`, its response open until the block ends; the body is not read.

        Connecting is bounded by agentapi_timeout_s; waiting for the answer's head by
        `wait_s` (None: as long as it takes), past which AgentAPIBusy is raised. Redirects
        are followed within agentapi's origin, up to MAX_REDIRECTS; one elsewhere raises
        AgentAPIError naming its target, without following it. The body is never
        decompressed by aiohttp (see bodies.py).
        """
        resp = await self._open(path, wait_s, headers or {})
        try:
            yield resp
        finally:
            resp.release()

    async def _open(self, path: str, wait_s: float | None,
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        connect_s = self.settings.agentapi_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s)
        url = self._url(path)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with asyncio.timeout(wait_s):
                    resp = await self._session.get(
                        url, timeout=timeout, allow_redirects=False, auto_decompress=False,
                        headers={**IDENTITY, **headers})
            except TimeoutError:
                raise AgentAPIBusy(
                    f"agentapi at {self.url} took GET {path} but has not answered within "
                    f"{wait_s:g}s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AgentAPIUnavailable(
                    f"agentapi at {self.url} is unreachable: {neterrors.describe(exc)}"
                ) from exc
            if resp.status not in REDIRECTS:
                return resp
            resp.release()
            url = self._redirect(path, url, resp)
        raise AgentAPIError(f"GET {path} was redirected more than {MAX_REDIRECTS} times")

    def _redirect(self, path: str, url: URL, resp: aiohttp.ClientResponse) -> URL:
        """Where a redirect of GET `path` leads, if it stays within agentapi's origin."""
        location = resp.headers.get("Location", "")
        try:
            target = url.join(URL(location))
        except ValueError:
            target = None
        if not location or target is None or not target.is_absolute():
            raise AgentAPIError(f"GET {path} answered {resp.status} with an unusable Location "
                                f"{logs.clip(location, 200)!r}", resp.status)
        if not self._same_origin(target):
            raise AgentAPIError(f"GET {path} answered {resp.status}, redirecting to "
                                f"{_shown(target)}, another host; not followed", resp.status)
        return target

    def _answer_wait_s(self) -> float | None:
        """How long a GET waits for agentapi's answer: for the whole turn under ACP, where
        agentapi holds its lock that long (field-notes.md §4); else agentapi_timeout_s."""
        return None if self.state.transport == "acp" else self.settings.agentapi_timeout_s

    @asynccontextmanager
    async def _read_200(self, path: str, cap_name: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `path`, yielding the response once it is a 200, for a body read within
        agentapi_timeout_s. What reading it raises is mapped to this client's errors:
        AgentAPIUnavailable (not finished in time, or cut), AgentAPIError (not 200, over
        the cap named `cap_name`, badly encoded, without a messages list)."""
        async with self._get(path, wait_s=self._answer_wait_s()) as resp:
            try:
                async with asyncio.timeout(self.settings.agentapi_timeout_s):
                    if resp.status != 200:
                        body = await read_capped(resp, ERROR_BODY_BYTES, truncate=True)
                        raise AgentAPIError(f"GET {path} answered {resp.status}", resp.status,
                                            problem_detail(body))
                    yield resp
            except TimeoutError:
                raise AgentAPIUnavailable(
                    f"agentapi at {self.url} did not finish the body of GET {path} within "
                    f"{self.settings.agentapi_timeout_s:g}s") from None
            except BodyTooLarge as exc:
                raise AgentAPIError(
                    f"GET {path} answered more than {exc.cap} bytes ({cap_name})") from None
            except NoArray as exc:
                raise AgentAPIError(f"GET {path} answered without a messages list: {exc}"
                                    ) from None
            except BodyError as exc:
                raise AgentAPIError(f"GET {path}: {exc}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AgentAPIUnavailable(
                    f"agentapi at {self.url} cut the body of GET {path}: "
                    f"{neterrors.describe(exc)}") from exc

    async def _get_json(self, path: str, cap: int, cap_name: str) -> Any:
        async with self._read_200(path, cap_name) as resp:
            body = await read_capped(resp, cap)
        try:
            return _loads(body)
        except ValueError as exc:
            raise AgentAPIError(f"GET {path} answered with invalid JSON") from exc

    async def messages(self, retain_chars: int) -> list[Message]:
        """GET /messages: every message agentapi lists that can be used, in its order,
        each content cut to its last `retain_chars` characters. Raises as read_messages."""
        out: list[Message] = []
        await self.read_messages(retain_chars, out.append)
        return out

    async def read_messages(self, retain_chars: int, each: Callable[[Message], None],
                            on_drop: Callable[[str], None] | None = None) -> dict[str, int]:
        """GET /messages, read as it arrives: `each` gets every usable message in order,
        its content cut to its last `retain_chars` characters. Returns how many elements
        were dropped, by reason (empty: none).

        An element that cannot be used is dropped and counted in one warning per answer
        (`agentapi_messages_dropped`): invalid JSON (ints past Python's digit limit and
        nesting too deep included), larger than `max_event_bytes` (TOO_LARGE), not an
        object, or a message coderd could not take (parse_message). `on_drop` gets each
        drop's reason in its place among the calls to `each`, so that a caller can tell
        where in the history it fell (a dropped element has no id that can be trusted).
        One whose time is unusable is kept
        with the time it was read (see conversation.go_time). The loop gets a turn after
        every piece of the body, so a long answer delays nothing else.

        Raises AgentAPIUnavailable (no answer, or the body was cut or not finished within
        agentapi_timeout_s), AgentAPIBusy (no answer in time while agentapi holds its
        lock), or AgentAPIError (not 200, a body over `max_agentapi_response_bytes`
        decoded, a redirect elsewhere, a body that is not an object with a `messages`
        array). `each` may have had messages before a raise: a caller that must not keep
        half an answer builds aside and adopts only on success.
        """
        path, cap = "/messages", self.settings.max_agentapi_response_bytes
        splitter = ArraySplitter("messages", self.settings.max_event_bytes)
        dropped: dict[str, int] = {}
        replaced = 0
        async with self._read_200(path, "max_agentapi_response_bytes") as resp:
            async for piece in iter_capped(resp, cap):
                for element in splitter.feed(piece):
                    message = _element(element, retain_chars)
                    if isinstance(message, str):
                        dropped[message] = dropped.get(message, 0) + 1
                        if on_drop is not None:
                            on_drop(message)
                        continue
                    replaced += message.time_replaced
                    each(message)
                await asyncio.sleep(0)  # between pieces, the loop runs
            splitter.close()
        if dropped:
            log.warning("agentapi_messages_dropped", count=sum(dropped.values()),
                        reasons=dropped)
        if replaced:
            log.warning("agentapi_time_replaced", error="time is not RFC 3339 as coderd reads it",
                        count=replaced)
        return dropped

    async def status_info(self) -> StatusInfo:
        """GET /status of any agentapi version: status, transport and agent type."""
        return parse_status_info(await self._get_json("/status", STATUS_BODY_BYTES,
                                                     "STATUS_BODY_BYTES"))

    async def status(self) -> Status | None:
        """GET /status: "running", "stable", or None for a value this client does not know."""
        return (await self.status_info()).status

    async def send(self, content: str, kind: str, *, timeout_s: float | None = None,
                   connect_timeout_s: float | None = None) -> None:
        """POST /message, on a connection of its own, telling "never sent" from "sent".

        Connecting is bounded by `connect_timeout_s` (default agentapi_timeout_s); once the
        request is written, waiting for the answer is bounded by `timeout_s` (default
        send_timeout_s). Raises AgentAPIUnavailable (never written: nothing was typed),
        NotStable or TypedNotSubmitted or AgentAPIError (agentapi answered and refused), or
        SendUnconfirmed (written, no answer). Never retries. A fresh connection per POST
        means the request never rides a kept-alive connection that agentapi has closed.
        """
        settings = self.settings
        timeout_s = settings.send_timeout_s if timeout_s is None else timeout_s
        connect_s = settings.agentapi_timeout_s if connect_timeout_s is None else connect_timeout_s
        loop = asyncio.get_running_loop()
        written = False
        bound: asyncio.Timeout | None = None

        async def on_written(*_: object) -> None:
            nonlocal written
            written = True
            if bound is not None:  # from now on, the answer's bound
                bound.reschedule(loop.time() + timeout_s)

        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(on_written)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True), trace_configs=[trace],
                    timeout=aiohttp.ClientTimeout(total=None)) as session,
                asyncio.timeout(connect_s) as bound,
                session.post(self._url("/message"), json={"content": content, "type": kind},
                             allow_redirects=False, auto_decompress=False,
                             headers=IDENTITY) as resp,
            ):
                if resp.status == 200:
                    return
                try:
                    body = await read_capped(resp, ERROR_BODY_BYTES, truncate=True)
                except (aiohttp.ClientError, OSError, BodyError):
                    body = b""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if written:
                why = (f"no answer within {timeout_s:g}s" if isinstance(exc, TimeoutError)
                       else f"the connection dropped: {neterrors.describe(exc)}")
                raise SendUnconfirmed(why) from exc
            why = (f"connecting timed out after {connect_s:g}s"
                   if isinstance(exc, TimeoutError) else neterrors.describe(exc))
            raise AgentAPIUnavailable(f"agentapi at {self.url} is unreachable: {why}") from exc
        detail = problem_detail(body)
        cls: type[AgentAPIError] = AgentAPIError
        if NOT_STABLE in detail:
            cls = NotStable
        elif TYPED_NOT_SUBMITTED in detail:
            cls = TypedNotSubmitted
        raise cls(f"agentapi refused the input ({resp.status})", resp.status, detail)

    # -- following ---------------------------------------------------------------------

    async def follow(
        self, conversation: Conversation, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Keep `conversation` in step with agentapi until cancelled. Never returns."""
        backoff = Backoff()
        lost = False  # a followed stream ended; the next failed connect means agentapi is gone
        while True:
            started = clock()
            try:
                await self._stream(conversation)
                reason = kind = "stream ended"
                answered = False  # as when agentapi stops: nothing it said was refused
            except _NoEvents as exc:
                self.state.mode = "polling"
                log.warning("agentapi_no_events", detail=f"{exc}; polling /messages, and "
                            f"trying /events again every {EVENTS_RETRY_S:g}s")
                await self._poll(conversation, clock)
                self.state.mode = "events"
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, AgentAPIError,
                    AgentAPIUnavailable) as exc:
                reason, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
                answered = isinstance(exc, AgentAPIError)
                if lost and not conversation.connected:  # the connect after it failed
                    self.state.gone.notify()
            lived = clock() - started
            lost = conversation.connected
            conversation.set_connected(False)
            self.state.last_error, self.state.answered = reason, answered
            if lived >= HEALTHY_CONNECTION_S:
                backoff.reset()
            if lost and lived >= QUICK_RECONNECT_AFTER_S:
                # A stream that ends is normal (agentapi drops slow readers), and so is
                # agentapi stopping at workspace stop: try again at once, so that a vanished
                # agentapi is noticed (state.gone) while the stop script's upload is fresh.
                delay = 0.0
            else:
                delay = backoff.next_delay(self.settings.reconnect_initial_s,
                                           self.settings.reconnect_max_s)
            self.state.reconnects += 1
            self._on_event("reconnect")
            # `error` is the kind, which the repeat limiter keys on; agentapi's words are
            # the detail.
            log.warning("agentapi_disconnected", error=kind, detail=logs.clip(reason, 300),
                        retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _stream(self, conversation: Conversation) -> None:
        async with self._get("/events", wait_s=self.settings.agentapi_timeout_s,
                             headers={"Accept": "text/event-stream"}) as resp:
            if resp.status in (404, 405):
                raise _NoEvents(f"GET /events answered {resp.status}")
            if resp.status != 200:
                # e.g. agentapi's Host allow-list: "Invalid host header. Allowed hosts: ..."
                try:
                    async with asyncio.timeout(self.settings.agentapi_timeout_s):
                        body = await read_capped(resp, ERROR_BODY_BYTES, truncate=True)
                except (TimeoutError, BodyError):
                    body = b""
                detail = problem_detail(body[:2048])
                raise AgentAPIError(f"GET /events answered {resp.status}: {detail}",
                                    resp.status, detail)
            coding = resp.headers.get("Content-Encoding", "").strip().lower()
            if coding not in ("", "identity"):
                # agentapi writes its stream as plain text (huma's sse package) and we ask
                # for identity: a compressed stream is not agentapi's, and inflating it
                # costs up to ~1000 bytes of decoding per byte received.
                shown = logs.clip(coding, 40)
                raise AgentAPIError(
                    f"GET /events answered with Content-Encoding {shown!r}; agentapi never "
                    "compresses its event stream, so it is refused")
            media = resp.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if media and media != "text/event-stream":
                # agentapi always answers text/event-stream here; an HTML page is a front's
                # (a catch-all route, a login page): not a stream to wait on, so poll.
                raise _NoEvents(f"GET /events answered 200 with Content-Type "
                                f"{logs.clip(media, 60)!r}, not text/event-stream")
            follower = _Following(self, conversation)
            follower.start()
            try:
                # Each chunk is what the socket buffered (bounded by aiohttp's read
                # buffer); the loop runs again before the next one arrives.
                async for chunk in resp.content.iter_any():
                    follower.feed(chunk)
            finally:
                await follower.close()

    def _learn(self, info: StatusInfo) -> None:
        """Keep what one /status answer says about the version (absent: None)."""
        if (info.transport, info.agent_type) != (self.state.transport, self.state.agent_type):
            log.info("agentapi_version", transport=info.transport, agent_type=info.agent_type)
        self.state.transport = info.transport
        self.state.agent_type = info.agent_type
        self.state.status_read = True

    async def _read_polled(self, retain_chars: int) -> tuple[Conversation, int | None]:
        """One poll's GET /messages as a model built aside, and the id of the usable
        message before its last dropped element (-1: the drop came first; None: nothing
        was dropped). Raises as read_messages."""
        polled = Conversation(retain_chars)
        newest, drop_after = -1, None

        def keep(message: Message) -> None:
            nonlocal newest
            newest = message.id
            polled.upsert(message)

        def dropped(_reason: str) -> None:
            nonlocal drop_after
            drop_after = newest

        await self.read_messages(retain_chars, keep, dropped)
        return polled, drop_after

    async def _poll(self, conversation: Conversation, clock: Callable[[], float]) -> None:
        """Follow by polling /status then /messages (an agentapi without /events) for
        EVENTS_RETRY_S. Each poll rebuilds the model. A busy agentapi (its lock held by a
        send) keeps the last state and is waited for; it is not disconnected."""
        until = clock() + EVENTS_RETRY_S
        busy_logged = False
        while clock() < until:
            try:
                info = await self.status_info()
                self._learn(info)
                # Built aside and adopted whole (Conversation.adopt): memory stays what the
                # model holds, however long the history, and a failed read changes nothing.
                self.state.polls_started += 1
                number = self.state.polls_started
                polled, drop_after = await self._read_polled(conversation.retain_chars)
                conversation.adopt(polled, info.status)
                self.state.polled = (number, drop_after)
                conversation.set_connected(True)
                self.state.last_error = None
                busy_logged = False
            except AgentAPIBusy as exc:
                if not busy_logged:
                    log.info("agentapi_busy", detail=str(exc), keeping="the last state")
                    busy_logged = True
                continue  # each try already waited agentapi_timeout_s
            except (AgentAPIError, AgentAPIUnavailable) as exc:
                if conversation.connected and isinstance(exc, AgentAPIUnavailable):
                    self.state.gone.notify()  # it answered the last poll and not this one
                conversation.set_connected(False)
                self.state.last_error = str(exc)
                self.state.answered = isinstance(exc, AgentAPIError)
                log.warning("agentapi_poll_failed", error=type(exc).__name__,
                            detail=logs.clip(str(exc), 300))
            await asyncio.sleep(self.settings.poll_interval_s)


class _Following:
    """One /events connection's work: decoding, the replay swap, and beside it the /status
    probe and the ACP reconcile. Owns those two tasks from `start()`; `close()` cancels
    them. `feed()` raises nothing."""

    def __init__(self, client: AgentAPI, live: Conversation) -> None:
        self.client = client
        self.live = live
        self.decoder = Decoder(client.settings.max_event_bytes)
        self.replay: Conversation | None = Conversation(live.retain_chars)
        self.reconcile_due = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._guarded(self._probe), name="agentapi-probe"),
                      asyncio.create_task(self._guarded(self._reconcile),
                                          name="agentapi-reconcile")]

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run one side task; a bug in it is logged and ends it, never the stream."""
        try:
            await work()
        except Exception:
            log.exception("agentapi_side_task_failed", task=getattr(work, "__name__", "?"))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def feed(self, chunk: bytes) -> None:
        # A live setting: a reload applies to the stream already open.
        self.decoder.max_event_bytes = self.client.settings.max_event_bytes
        for event in self.decoder.feed(chunk):
            self._apply(event)

    def _invalid(self, event_type: str, error: str) -> None:
        self.client._on_event("invalid")
        log.warning("agentapi_event_invalid", event_type=event_type, error=error)

    def _apply(self, event: Event | Oversized) -> None:
        client, live = self.client, self.live
        if isinstance(event, Oversized):
            client._on_event("oversized")
            limit = client.settings.max_event_bytes
            # `size` is only what had arrived when the event was dropped: the rest of it
            # is skipped unread, so its whole size is never known.
            log.warning("agentapi_event_too_large", setting="max_event_bytes", limit=limit,
                        size_at_least=event.size,
                        detail=f"an event over max_event_bytes ({limit} bytes) was dropped "
                               f"after {event.size} bytes of it had arrived")
            return
        if event.type not in ("message_update", "status_change"):
            return  # agent_error and whatever a newer agentapi adds
        try:
            data = _loads(event.data)
        except ValueError:
            self._invalid(event.type, "invalid JSON")
            return
        if not isinstance(data, dict):
            self._invalid(event.type, "not an object")
            return
        if event.type == "message_update":
            try:
                message = parse_message(data, "message", live.retain_chars)
            except BadMessage as exc:
                self._invalid(event.type, str(exc))
                return
            if message.time_replaced:
                log.warning("agentapi_time_replaced", id=message.id,
                            error="time is not RFC 3339 as coderd reads it",
                            value=_clipped(data.get("time")))
            (self.replay or live).upsert(message)
            return
        status = parse_status(data.get("status"))
        if "agent_type" in data and (agent_type := _agent_type(data["agent_type"])):
            client.state.agent_type = agent_type
        if self.replay is not None:
            # The replay's closing status_change: the model is now exactly agentapi's,
            # with what the replay pruned on the way (a user message, unsent ids) counted.
            live.adopt(self.replay, status)
            live.set_connected(True)
            client.state.last_error = None
            self.replay = None
            log.info("agentapi_following", messages=live.count, status=status,
                     transport=client.state.transport)
        elif status is not None:
            live.set_status(status)
        if status == "stable" and client.state.transport == "acp":
            self.reconcile_due.set()  # a turn ended: a failed one leaves a silent gap

    async def _probe(self) -> None:
        """Read /status once per connection for the transport and agent type. It may wait
        behind a send (a whole turn under ACP); it gives up on any other failure, which the
        stream itself reports."""
        client = self.client
        while True:
            try:
                info = await client.status_info()
            except AgentAPIBusy:
                continue  # agentapi is alive and holds its lock: ask again
            except (AgentAPIError, AgentAPIUnavailable) as exc:
                log.info("agentapi_status_unread", error=str(exc))
                return
            client._learn(info)
            if info.transport == "acp" and self.live.status == "stable":
                self.reconcile_due.set()
            return

    async def _reconcile(self) -> None:
        """Under ACP, after a turn ends: rebuild the ids /messages covers from it, which
        drops those agentapi no longer has (Conversation.reconcile)."""
        client, live = self.client, self.live
        while True:
            await self.reconcile_due.wait()
            self.reconcile_due.clear()
            # Every id seen so far existed in agentapi before it answers (the stream lags
            # it), so one of them missing from the answer was removed. Newer ids may
            # arrive while it answers; they are left alone.
            covered = live.count
            if not covered:
                continue
            listed = Conversation(live.retain_chars)
            try:
                await client.read_messages(live.retain_chars, _below(covered, listed.upsert))
            except (AgentAPIError, AgentAPIUnavailable) as exc:
                log.info("agentapi_reconcile_failed", error=str(exc))
                continue
            had_user = live.has_user
            gone = live.reconcile(listed, covered)
            if gone is None:
                log.info("agentapi_reconcile_skipped",
                         why="messages newer than the /messages answer were pruned meanwhile")
            elif gone:
                log.info("agentapi_messages_removed", count=len(gone), ids=gone[:20],
                         why="gone from /messages without an event (ACP failed prompt)")
            if had_user and not live.has_user:
                log.warning("agentapi_conversation_restarted",
                            detail="/messages no longer has a user message; nothing is "
                                   "uploaded until it has one again")


class _NoEvents(Exception):
    """This agentapi has no /events endpoint; the message says how that was seen."""
