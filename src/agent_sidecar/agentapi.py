"""The agentapi client: a reconnecting follower of /events, and the one-shot calls.

Every connect to /events replays the whole conversation, then one status_change, then live
deltas (agentapi-protocol.md §7). The follower collects the replay aside and swaps it in
when that status_change arrives, so a reconnect or an agentapi restart rebuilds the model
instead of merging into it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from agent_sidecar import logs
from agent_sidecar.aio import Backoff, Pulse
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation, Message, Status, make_message
from agent_sidecar.sse import Decoder, Event, Oversized

log = logs.get("agentapi")

HEALTHY_CONNECTION_S = 60.0  # a stream that lived this long resets the reconnect back-off
EVENTS_RETRY_S = 60.0  # while polling, how often to try /events again
NOT_STABLE = "agent is waiting for user input"  # the text of agentapi's "not stable" 500


class AgentAPIError(Exception):
    """agentapi answered, but not with what was asked for."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class AgentAPIUnavailable(Exception):
    """agentapi could not be reached."""


class NotStable(AgentAPIError):
    """agentapi refused a user message because the agent is not waiting for input."""


@dataclass
class FollowState:
    """What /status and /healthz report about the follower."""

    mode: str = "events"  # or "polling"
    reconnects: int = 0
    last_error: str | None = None
    # Notified once per disappearance of agentapi: a stream it had been following ended,
    # and the next connect failed. The uploader then writes the last word (uploader.py).
    gone: Pulse = field(default_factory=Pulse)


def parse_message(data: dict[str, Any], text_field: str, retain_chars: int) -> Message | None:
    """A message from /messages (`content`) or from message_update (`message`); None if bad."""
    id_ = data.get("id")
    role = data.get("role")
    text = data.get(text_field)
    if type(id_) is not int or id_ < 0 or not isinstance(role, str) or not isinstance(text, str):
        return None
    return make_message(id_, role, text, data.get("time"), retain_chars)


def parse_status(value: object) -> Status | None:
    if value == "running" or value == "stable":
        return value
    return None


def problem_detail(body: bytes) -> str:
    """A person-readable text from agentapi's problem+json, or the raw text of anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    if not isinstance(data, dict):
        return str(data)[:500]
    parts = [str(data.get("detail") or data.get("title") or "")]
    errors = data.get("errors")
    if isinstance(errors, list):
        parts += [str(e.get("message")) for e in errors if isinstance(e, dict) and e.get("message")]
    return ": ".join(p for p in parts if p)[:500]


class AgentAPI:
    """The client of one agentapi (agentapi-protocol.md).

    `follow()` keeps a Conversation in step until cancelled and never raises otherwise; the
    one-shot calls raise AgentAPIUnavailable (no answer) or AgentAPIError (a wrong answer).
    It reads its timeouts and back-off from `settings` at each use, so a reload that replaces
    `settings` takes effect at the next request or reconnect; `agentapi_url` needs a restart.
    It owns no task and no session: the caller's session is used and left open.
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
        return str(self._base)

    # -- one-shot calls ----------------------------------------------------------------

    async def _get_json(self, path: str, timeout_s: float) -> Any:
        try:
            async with self._session.get(
                self._url(path), timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise AgentAPIError(
                        f"GET {path} answered {resp.status}", resp.status, problem_detail(body)
                    )
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentAPIUnavailable(f"agentapi at {self.url} is unreachable: {exc!r}") from exc
        except ValueError as exc:
            raise AgentAPIError(f"GET {path} answered with invalid JSON") from exc

    async def messages(self, retain_chars: int) -> list[Message]:
        """GET /messages, each content cut to its last `retain_chars` characters."""
        data = await self._get_json("/messages", self.settings.agentapi_timeout_s)
        raw = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise AgentAPIError("GET /messages answered without a messages list")
        parsed = [parse_message(m, "content", retain_chars) for m in raw if isinstance(m, dict)]
        return [m for m in parsed if m is not None]

    async def status(self) -> Status | None:
        """GET /status: "running", "stable", or None for a value this client does not know."""
        data = await self._get_json("/status", self.settings.agentapi_timeout_s)
        return parse_status(data.get("status") if isinstance(data, dict) else None)

    async def send(self, content: str, kind: str) -> None:
        """POST /message, bounded by send_timeout_s. Raises NotStable, AgentAPIError or
        AgentAPIUnavailable."""
        try:
            async with self._session.post(
                self._url("/message"),
                json={"content": content, "type": kind},
                timeout=aiohttp.ClientTimeout(total=self.settings.send_timeout_s),
            ) as resp:
                body = await resp.read()
                if resp.status == 200:
                    return
                detail = problem_detail(body)
                cls = NotStable if NOT_STABLE in detail else AgentAPIError
                raise cls(f"agentapi refused the input ({resp.status})", resp.status, detail)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentAPIUnavailable(f"agentapi at {self.url} is unreachable: {exc!r}") from exc

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
                reason = "stream ended"
            except _NoEvents:
                self.state.mode = "polling"
                log.warning("agentapi_no_events", detail="falling back to polling /messages")
                await self._poll(conversation, clock)
                self.state.mode = "events"
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, AgentAPIError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if lost and not conversation.connected:  # the connect after it failed
                    self.state.gone.notify()
            lost = conversation.connected
            conversation.set_connected(False)
            self.state.last_error = reason
            if clock() - started >= HEALTHY_CONNECTION_S:
                backoff.reset()
            delay = backoff.next_delay(self.settings.reconnect_initial_s,
                                       self.settings.reconnect_max_s)
            self.state.reconnects += 1
            self._on_event("reconnect")
            log.warning("agentapi_disconnected", error=reason, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _stream(self, conversation: Conversation) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with self._session.get(
            self._url("/events"), timeout=timeout, headers={"Accept": "text/event-stream"}
        ) as resp:
            if resp.status in (404, 405):
                raise _NoEvents
            if resp.status != 200:
                # e.g. agentapi's Host allow-list: "Invalid host header. Allowed hosts: ..."
                detail = problem_detail(await resp.content.read(2048))
                raise AgentAPIError(f"GET /events answered {resp.status}: {detail}",
                                    resp.status, detail)
            decoder = Decoder(self.settings.max_event_bytes)
            replay: Conversation | None = Conversation(conversation.retain_chars)
            async for chunk in resp.content.iter_any():
                for event in decoder.feed(chunk):
                    replay = self._apply(event, conversation, replay)

    def _apply(
        self, event: Event | Oversized, live: Conversation, replay: Conversation | None
    ) -> Conversation | None:
        if isinstance(event, Oversized):
            self._on_event("oversized")
            log.warning("agentapi_event_too_large", size=event.size)
            return replay
        if event.type not in ("message_update", "status_change"):
            return replay  # agent_error and whatever a newer agentapi adds
        try:
            data = json.loads(event.data)
        except ValueError:
            self._on_event("invalid")
            log.warning("agentapi_event_invalid", event_type=event.type, error="invalid JSON")
            return replay
        if not isinstance(data, dict):
            self._on_event("invalid")
            log.warning("agentapi_event_invalid", event_type=event.type, error="not an object")
            return replay
        target = replay if replay is not None else live
        if event.type == "message_update":
            message = parse_message(data, "message", live.retain_chars)
            if message is None:
                self._on_event("invalid")
                log.warning("agentapi_event_invalid", event_type=event.type, error="bad fields")
                return replay
            target.upsert(message)
            return replay
        status = parse_status(data.get("status"))
        if replay is not None:
            # The replay's closing status_change: the model is now exactly agentapi's.
            live.replace(replay.messages(), status)
            live.set_connected(True)
            self.state.last_error = None
            log.info("agentapi_following", messages=live.count, status=status)
            return None
        if status is not None:
            live.set_status(status)
        return None

    async def _poll(self, conversation: Conversation, clock: Callable[[], float]) -> None:
        until = clock() + EVENTS_RETRY_S
        while clock() < until:
            try:
                messages = await self.messages(conversation.retain_chars)
                status = await self.status()
                conversation.replace(messages, status)
                conversation.set_connected(True)
            except (AgentAPIError, AgentAPIUnavailable) as exc:
                conversation.set_connected(False)
                self.state.last_error = str(exc)
                log.warning("agentapi_poll_failed", error=str(exc))
            await asyncio.sleep(self.settings.poll_interval_s)


class _NoEvents(Exception):
    """This agentapi has no /events endpoint."""
