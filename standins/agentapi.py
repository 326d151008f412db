"""An agentapi stand-in: the simulated agent plus the knobs tests turn, in the versions the
field runs (shared/reference/field-notes.md §3, §4).

Versions (`version=`):
- "v0.10": `/status` and `status_change` carry `status` only; no `agent_error` events.
- "v0.11": adds `agent_type`; still no `transport` and no `agent_error`.
- "v0.12-pty": `transport: "pty"` in `/status`, `agent_error` events (the default).
- "v0.12-acp": the experimental ACP transport: no greeting message (the user's first
  message is id 0); a user `POST /message` holds the server lock for the whole turn, so
  `/status` and `/messages` hang until it ends (`/events` keeps flowing); `raw` is not
  keystrokes but a whole prompt whose reply is thrown away; a failed prompt's placeholder
  agent message is removed with no event, leaving a gap in the ids.

Fault knobs: no `/events` (an agentapi too old to stream), a hook that answers
`POST /message` instead, `stabilize_timeout_s` (the released phase 1 failure of v0.10 -
v0.12.1: the text is typed, no Enter is sent, and after the timeout the POST fails with
`failed to wait for screen to stabilize`), `fail_next_prompt` (ACP), stored `agent_error`s
replayed to new subscribers, and a restart that forgets the conversation.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from aiohttp import web

from agent_sidecar.conversation import make_message
from agent_sidecar.simulator import (
    TRIMMED,
    SimMessage,
    SimulatedAgentAPI,
    json_response,
    now_rfc3339,
    parse_message_request,
    problem,
    send_failed,
    sse_event,
)
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack
from standins.waiting import Hook

FakeMessage = SimMessage
Version = Literal["v0.10", "v0.11", "v0.12-pty", "v0.12-acp"]
VERSIONS: tuple[Version, ...] = ("v0.10", "v0.11", "v0.12-pty", "v0.12-acp")
# The released phase 1 failure, as agentapi's POST /message reports it (field-notes.md §3).
STABILIZE_FAILURE = ("failed to send message: failed to wait for screen to stabilize: "
                     "timeout waiting for condition")

__all__ = ["STABILIZE_FAILURE", "VERSIONS", "FakeAgentAPI", "FakeMessage", "Version",
           "now_rfc3339", "problem", "sse_event"]


class FakeAgentAPI(SimulatedAgentAPI):
    """The simulated agentapi in one of the field's versions, with fault knobs. Start it
    with `async with`; see the module docstring for the versions and knobs."""

    def __init__(self, *, version: Version = "v0.12-pty", events: bool = True,
                 buffer: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = version
        self.events = events
        if buffer is not None:
            self.buffer = buffer
        self.errors: list[dict[str, Any]] = []
        # Runs first on POST /message; a response it returns is sent as is.
        self.message_hook: Hook | None = None
        # PTY phase 1: type the text, then fail after this long without submitting it.
        self.stabilize_timeout_s: float | None = None
        self.typed: list[str] = []  # text typed into the agent's input box, submitted or not
        self.fail_next_prompt = False  # ACP: the next prompt fails and its reply is removed
        if self.acp:
            self.transport = "acp"
            self.messages = []
            self._next_id = 0

    @property
    def acp(self) -> bool:
        return self.version == "v0.12-acp"

    # -- the shapes of each version ------------------------------------------------------

    def status_body(self) -> dict[str, Any]:
        body = super().status_body()
        if self.version == "v0.10":
            return {"status": body["status"]}
        if self.version == "v0.11":
            return {"status": body["status"], "agent_type": body["agent_type"]}
        return body

    def status_event(self) -> dict[str, Any]:
        event = super().status_event()
        return {"status": event["status"]} if self.version == "v0.10" else event

    def replay(self) -> list[bytes]:
        errors = [] if self.version in ("v0.10", "v0.11") else self.errors[-100:]
        return super().replay() + [sse_event("agent_error", e) for e in errors]

    def routes(self) -> list[web.RouteDef]:
        return [r for r in super().routes() if self.events or r.path != "/events"]

    # -- POST /message ---------------------------------------------------------------------

    async def _message(self, request: web.Request) -> web.StreamResponse:
        if self.message_hook is not None:
            scripted = await self.message_hook(request)
            if scripted is not None:
                return scripted
        if self.acp:
            return await self._acp_message(request)
        if self.stabilize_timeout_s is not None:
            return await self._phase1_failure(request)
        response = await super()._message(request)
        if response.status == 200 and self.received and self.received[-1][0] == "user":
            self.typed.append(self.received[-1][1])
        return response

    async def _phase1_failure(self, request: web.Request) -> web.StreamResponse:
        """v0.10 - v0.12.1: the text is typed, the screen never settles, nothing is
        submitted, and the POST fails after the timeout (field-notes.md §3)."""
        parsed = parse_message_request(request, await request.read())
        if isinstance(parsed, web.Response):
            return parsed
        content, kind = parsed
        if kind == "raw":
            self.received.append(("raw", content))
            return json_response({"ok": True}, schema="MessageResponseBody", request=request)
        async with self._lock:
            if self.status != "stable":
                return send_failed(
                    request, "message can only be sent when the agent is waiting for user input"
                )
            self.typed.append(content.strip(TRIMMED))
            assert self.stabilize_timeout_s is not None
            await asyncio.sleep(self.stabilize_timeout_s)
            return problem(request, 500, "Internal Server Error", "unexpected error occurred",
                           [{"message": STABILIZE_FAILURE}])

    async def _acp_message(self, request: web.Request) -> web.StreamResponse:
        """ACP: the POST lasts the whole turn and holds the lock that /status and
        /messages take; raw input is a whole prompt whose reply is thrown away."""
        parsed = parse_message_request(request, await request.read())
        if isinstance(parsed, web.Response):
            return parsed
        content, kind = parsed
        text = content.strip(TRIMMED)
        async with self._lock:
            self.received.append((kind, text))
            if kind == "raw":
                self.set_status("running")
                await asyncio.sleep(self.chunk_delay_s * self.chunks)
                self.set_status("stable")
                return json_response({"ok": True}, schema="MessageResponseBody",
                                     request=request)
            if not text:
                return send_failed(request, "message must not be empty")
            self.typed.append(text)
            self.add_message("user", text)
            self.set_status("running")
            placeholder = self.add_message("agent", "")
            if self.fail_next_prompt:
                self.fail_next_prompt = False
                # The placeholder goes without an event: followers learn it at a replay.
                self.messages.remove(placeholder)
                self.set_status("stable")
                return send_failed(request, "prompt failed")
            await self.stream(placeholder.id, self.reply(text))
            self.set_status("stable")
        return json_response({"ok": True}, schema="MessageResponseBody", request=request)

    # -- controls for tests ----------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def restart(self) -> None:
        """An agentapi restart without saved state: ids start at 0 again."""
        self.drop_subscribers()
        self.messages = [] if self.acp else [SimMessage(0, "agent", "")]
        self._next_id = len(self.messages)
        self.status = "stable"

    def packed(self, cap: int = CODERD_MAX_BODY_BYTES) -> bytes:
        """The snapshot body a faithful sidecar holds for this conversation."""
        messages = [make_message(m.id, m.role, m.content, m.time, CODERD_MAX_BODY_BYTES)
                    for m in self.messages]
        return pack(messages, cap).body

    def rest_messages(self) -> list[dict[str, Any]]:
        return [m.rest() for m in self.messages]
