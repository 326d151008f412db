"""A simulated agent behind a small agentapi server (PTY transport), for `agent-sidecar demo`.

It speaks the parts of agentapi's protocol that the sidecar uses, as agentapi-protocol.md
describes them: `/status`, `/messages`, the `/events` stream with its replay on every
connect and `message` (not `content`) in SSE, and `POST /message` with huma's problem+json
errors and its 500 for a user message while the agent runs. A slow subscriber is cut off
without a clean end, as agentapi does. Its agent answers every prompt with a streamed reply
and goes running -> stable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from aiohttp import web

SUBSCRIBER_BUFFER = 1024  # agentapi's defaultSubscriptionBufSize (lib/httpapi/events.go)
MAX_BODY = 1 << 20  # huma's request body limit (agentapi-protocol.md §3)
TRIMMED = " \t\n\r\f\v"  # what agentapi strips from a user message (lib/msgfmt/msgfmt.go)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_response(data: dict[str, Any], status: int = 200, *, schema: str | None = None,
                  request: web.Request | None = None,
                  content_type: str = "application/json") -> web.Response:
    """A huma success body: `$schema` first, compact, with a trailing newline."""
    if schema and request is not None:
        data = {"$schema": f"http://{request.host}/schemas/{schema}.json", **data}
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
    return web.Response(status=status, body=body.encode(), content_type=content_type)


def problem(request: web.Request, status: int, title: str, detail: str,
            errors: list[dict[str, Any]] | None = None) -> web.Response:
    """huma's RFC 9457 error, as agentapi answers."""
    data: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        data["errors"] = errors
    return json_response(data, status, schema="ErrorModel", request=request,
                         content_type="application/problem+json")


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    # Go's json.Encoder escapes <, >, & and U+2028/9 in SSE data; ensure_ascii is close enough.
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def serve_loopback(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); the runner and the port it got."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner, runner.addresses[0][1]


def echo_reply(prompt: str) -> str:
    return f"You said: {prompt}\n\nI looked into it and here is what I found."


@dataclass
class SimMessage:
    """One message of the simulated conversation, in agentapi's two spellings."""

    id: int
    role: str
    content: str
    time: str = field(default_factory=now_rfc3339)

    def rest(self) -> dict[str, Any]:
        return {"id": self.id, "content": self.content, "role": self.role, "time": self.time}

    def sse(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "message": self.content, "time": self.time}


class SimulatedAgentAPI:
    """An agentapi with a simulated agent, on loopback. Use `async with`.

    Owns its aiohttp server and one task per simulated turn; `stop()` cancels the turns and
    ends every stream. Its handlers never raise to aiohttp: a subscriber that leaves simply
    ends its stream.
    """

    transport = "pty"
    agent_type = "custom"

    def __init__(
        self,
        *,
        reply: Callable[[str], str] = echo_reply,
        chunks: int = 8,
        chunk_delay_s: float = 0.05,
        stable_after_s: float = 0.3,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.reply = reply
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.stable_after_s = stable_after_s
        self.host = host
        self.port = port
        self.buffer = SUBSCRIBER_BUFFER
        # PTY: message 0 is the agent's start-up screen (agentapi-protocol.md §11).
        self.messages: list[SimMessage] = [SimMessage(0, "agent", "")]
        self._next_id = 1  # ids are never reused, even after a message is removed
        self.status = "stable"
        self.received: list[tuple[str, str]] = []  # (type, content) of accepted POST /message
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._lock = asyncio.Lock()  # agentapi's s.mu, held exclusively by a user POST
        self._turns: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/status", self._status), web.get("/messages", self._messages),
                web.get("/events", self._events), web.post("/message", self._message)]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(self.routes())
        return app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        """Listen (again, on the same port after a stop: a restart with saved state)."""
        self._runner, self.port = await serve_loopback(self.app(), self.host, self.port)
        return self

    async def stop(self, clean: bool = True) -> None:
        """Stop listening. clean=False cuts every stream mid-way, like a killed process."""
        for task in self._turns:
            task.cancel()
        self.drop_subscribers(clean=clean)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the conversation ----------------------------------------------------------------

    def publish(self, raw: bytes) -> None:
        """Send raw bytes to every /events subscriber; a full one is cut off, as agentapi does."""
        for queue in list(self._subscribers):
            if queue.qsize() >= self.buffer:
                # agentapi closes the subscriber's channel: what is buffered is still
                # written, then the connection drops. The queue keeps one slot for that.
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(raw)

    def drop_subscribers(self, clean: bool = False) -> None:
        """End every stream: clean=False cuts the connection mid-stream like a slow reader."""
        for queue in list(self._subscribers):
            self._subscribers.discard(queue)
            queue.put_nowait(b"" if clean else None)

    def status_event(self) -> dict[str, Any]:
        return {"status": self.status, "agent_type": self.agent_type}

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.publish(sse_event("status_change", self.status_event()))

    def add_message(self, role: str, content: str) -> SimMessage:
        message = SimMessage(self._next_id, role, content)
        self._next_id += 1
        self.messages.append(message)
        self.publish(sse_event("message_update", message.sse()))
        return message

    def update_message(self, id_: int, content: str) -> None:
        message = next(m for m in self.messages if m.id == id_)
        message.content = content
        message.time = now_rfc3339()
        self.publish(sse_event("message_update", message.sse()))

    def replay(self) -> list[bytes]:
        """What a new /events subscriber gets first (agentapi-protocol.md §7)."""
        events = [sse_event("message_update", m.sse()) for m in self.messages]
        events.append(sse_event("status_change", self.status_event()))
        return events

    async def wait_idle(self) -> None:
        """Wait until every simulated turn has finished."""
        while self._turns:
            await asyncio.gather(*self._turns, return_exceptions=True)

    # -- handlers ------------------------------------------------------------------------

    def status_body(self) -> dict[str, Any]:
        return {"status": self.status, "agent_type": self.agent_type,
                "transport": self.transport}

    async def _status(self, request: web.Request) -> web.Response:
        async with self._lock:
            data = self.status_body()
        return json_response(data, schema="StatusResponseBody", request=request)

    async def _messages(self, request: web.Request) -> web.Response:
        async with self._lock:
            data = {"messages": [m.rest() for m in self.messages]}
        return json_response(data, schema="MessagesResponseBody", request=request)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.buffer + 1)
        replay = self.replay()
        self._subscribers.add(queue)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-store, must-revalidate",
            "X-Accel-Buffering": "no",
        })
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for event in replay:
                await resp.write(event)
            while True:
                raw = await queue.get()
                if raw is None:
                    # agentapi's double close panics; net/http drops the connection
                    # without the terminating chunk.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if raw == b"":
                    await resp.write_eof()
                    return resp
                await resp.write(raw)
        except ConnectionError:
            return resp  # the subscriber left: that ends its stream, it is not an error
        finally:
            self._subscribers.discard(queue)

    async def _message(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        parsed = parse_message_request(request, raw)
        if isinstance(parsed, web.Response):
            return parsed
        content, kind = parsed
        if kind == "raw":
            self.received.append(("raw", content))
            return json_response({"ok": True}, schema="MessageResponseBody", request=request)
        async with self._lock:
            text = content.strip(TRIMMED)
            if not text:
                return send_failed(request, "message must not be empty")
            if self.status != "stable":
                return send_failed(
                    request, "message can only be sent when the agent is waiting for user input"
                )
            self.set_status("running")
            await asyncio.sleep(0.01)  # the typed text echoing back before the POST returns
            self.received.append(("user", text))
            self.add_message("user", text)
            self.start_turn(text)
        return json_response({"ok": True}, schema="MessageResponseBody", request=request)

    def start_turn(self, prompt: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self.turn(prompt))
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)
        return task

    async def turn(self, prompt: str) -> None:
        """The agent's reply: streamed in `chunks`, then stable after `stable_after_s`."""
        agent = self.add_message("agent", "")
        await self.stream(agent.id, self.reply(prompt))
        await asyncio.sleep(self.stable_after_s)
        self.set_status("stable")

    async def stream(self, id_: int, text: str) -> None:
        """Rewrite message `id_` with ever longer prefixes of `text`, as a screen fills."""
        for i in range(1, self.chunks + 1):
            await asyncio.sleep(self.chunk_delay_s)
            self.update_message(id_, text[: len(text) * i // self.chunks])


def send_failed(request: web.Request, why: str) -> web.Response:
    """agentapi's answer to a POST /message its handler failed: always 500 (huma)."""
    return problem(request, 500, "Internal Server Error", "unexpected error occurred",
                   [{"message": f"failed to send message: {why}"}])


def parse_message_request(request: web.Request, raw: bytes) -> tuple[str, str] | web.Response:
    """huma's validation of a POST /message body: (content, type) or the error it answers."""
    if not raw:
        return problem(request, 400, "Bad Request", "request body is required")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return problem(request, 400, "Bad Request", "validation failed",
                       [{"message": str(exc), "location": "body",
                         "value": raw.decode("utf-8", "replace")}])
    if not isinstance(body, dict):
        return problem(request, 422, "Unprocessable Entity", "validation failed",
                       [{"message": "expected object", "location": "body", "value": body}])
    for key in body:
        if key not in ("content", "type", "$schema"):
            return problem(request, 422, "Unprocessable Entity", "validation failed",
                           [{"message": "unexpected property", "location": f"body.{key}",
                             "value": body}])
    for key in ("content", "type"):
        if key not in body:
            return problem(request, 422, "Unprocessable Entity", "validation failed",
                           [{"message": f"expected required property {key} to be present",
                             "location": "body", "value": body}])
    if body["type"] not in ("user", "raw"):
        return problem(request, 422, "Unprocessable Entity", "validation failed",
                       [{"location": "body.type", "value": body["type"]}])
    content = body["content"]
    if not isinstance(content, str):
        return problem(request, 422, "Unprocessable Entity", "validation failed",
                       [{"message": "expected string", "location": "body.content",
                         "value": content}])
    return content, body["type"]
