"""An agentapi stand-in: the simulated agent plus the knobs tests turn.

It follows agentapi-protocol.md like the simulator it extends, and adds: no `/events`
(an agentapi too old to stream), a hook that answers `POST /message` instead, stored
`agent_error`s replayed to new subscribers, a restart that forgets the conversation, and
the snapshot body a faithful sidecar would hold.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent_sidecar.conversation import make_message
from agent_sidecar.simulator import (
    SimMessage,
    SimulatedAgentAPI,
    now_rfc3339,
    problem,
    sse_event,
)
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack
from standins.waiting import Hook

FakeMessage = SimMessage

__all__ = ["FakeAgentAPI", "FakeMessage", "now_rfc3339", "problem", "sse_event"]


class FakeAgentAPI(SimulatedAgentAPI):
    """The simulated agentapi with fault knobs. Start it with `async with`."""

    def __init__(self, *, events: bool = True, buffer: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events = events
        if buffer is not None:
            self.buffer = buffer
        self.errors: list[dict[str, Any]] = []
        # Runs first on POST /message; a response it returns is sent as is.
        self.message_hook: Hook | None = None

    def routes(self) -> list[web.RouteDef]:
        return [r for r in super().routes() if self.events or r.path != "/events"]

    async def _message(self, request: web.Request) -> web.StreamResponse:
        if self.message_hook is not None:
            scripted = await self.message_hook(request)
            if scripted is not None:
                return scripted
        return await super()._message(request)

    def replay(self) -> list[bytes]:
        return super().replay() + [sse_event("agent_error", e) for e in self.errors[-100:]]

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def restart(self) -> None:
        """An agentapi restart without saved state: ids start at 0 again."""
        self.drop_subscribers()
        self.messages = [SimMessage(0, "agent", "")]
        self.status = "stable"

    def packed(self, cap: int = CODERD_MAX_BODY_BYTES) -> bytes:
        """The snapshot body a faithful sidecar holds for this conversation."""
        messages = [make_message(m.id, m.role, m.content, m.time, CODERD_MAX_BODY_BYTES)
                    for m in self.messages]
        return pack(messages, cap).body

    def rest_messages(self) -> list[dict[str, Any]]:
        return [m.rest() for m in self.messages]
