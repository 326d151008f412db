"""Stand-ins for agentapi and coderd that follow shared/reference, for tests, demo and bench.

`FakeAgentAPI` speaks agentapi's HTTP and SSE protocol, including its surprises: the replay
on every connect, `message` rather than `content` in SSE, 500 for a user message while the
agent runs, huma's problem+json errors, and slow subscribers cut off without a clean end.
Its simulated agent streams a reply to every prompt and goes running -> stable.

`FakeCoderd` validates a log-snapshot upload in coderd's order of checks and answers with
coderd's error bodies. Tests can script failures, hangs and rate limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import watchfiles
from aiohttp import web

from agent_sidecar.conversation import make_message
from agent_sidecar.snapshot import pack

Hook = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
SUBSCRIBER_BUFFER = 1024  # agentapi's defaultSubscriptionBufSize
MAX_BODY = 1 << 20


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json(data: dict[str, Any], status: int = 200, content_type: str = "application/json",
          schema: str | None = None, request: web.Request | None = None) -> web.Response:
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
    resp = _json(data, status, schema="ErrorModel", request=request)
    resp.content_type = "application/problem+json"
    return resp


@dataclass
class FakeMessage:
    id: int
    role: str
    content: str
    time: str = field(default_factory=now_rfc3339)

    def rest(self) -> dict[str, Any]:
        return {"id": self.id, "content": self.content, "role": self.role, "time": self.time}

    def sse(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "message": self.content, "time": self.time}


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    # Go's json.Encoder escapes <, >, & and U+2028/9 in SSE data; ensure_ascii is close enough.
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def serve_loopback(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); the runner and the port it got."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner, runner.addresses[0][1]


def hanging(entered: asyncio.Event | None = None) -> Hook:
    """A hook that never answers (a hung coderd or agentapi); sets `entered` when called."""
    async def hook(request: web.Request) -> web.StreamResponse | None:
        if entered is not None:
            entered.set()
        await asyncio.Event().wait()
        return None

    return hook


async def wait_for_file(path: Path, content: bytes, timeout_s: float) -> None:
    """Until `path` holds `content`, woken by filesystem events. The watcher also wakes every
    200 ms without one, so a write just before it started watching is not missed."""
    if _holds(path, content):
        return
    stop = asyncio.Event()
    async with asyncio.timeout(timeout_s):
        async for _ in watchfiles.awatch(path.parent, stop_event=stop, debounce=10, step=10,
                                         rust_timeout=200, yield_on_timeout=True):
            if _holds(path, content):
                stop.set()
                return


def _holds(path: Path, content: bytes) -> bool:
    # A read of one small local file: not worth a thread.
    return path.exists() and path.read_bytes() == content


def echo_reply(prompt: str) -> str:
    return f"You said: {prompt}\n\nI looked into it and here is what I found."


class FakeAgentAPI:
    """An agentapi (PTY transport) with a simulated agent. Start with `async with`."""

    def __init__(
        self,
        *,
        reply: Callable[[str], str] = echo_reply,
        chunks: int = 8,
        chunk_delay_s: float = 0.05,
        stable_after_s: float = 0.3,
        events: bool = True,
        buffer: int = SUBSCRIBER_BUFFER,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.reply = reply
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.stable_after_s = stable_after_s
        self.events = events
        self.buffer = buffer
        self.host = host
        self.port = port
        self.messages: list[FakeMessage] = [FakeMessage(0, "agent", "")]
        self.status = "stable"
        self.received: list[tuple[str, str]] = []  # (type, content) of accepted POST /message
        self.errors: list[dict[str, Any]] = []
        # Runs first on POST /message; a response it returns is sent as is.
        self.message_hook: Hook | None = None
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._lock = asyncio.Lock()  # agentapi's s.mu, held exclusively by a user POST
        self._turns: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/status", self._status)
        app.router.add_get("/messages", self._messages)
        if self.events:
            app.router.add_get("/events", self._events)
        app.router.add_post("/message", self._message)
        return app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> FakeAgentAPI:
        """Listen (again, on the same port after a stop: a restart with saved state)."""
        self._runner, self.port = await serve_loopback(self._app(), self.host, self.port)
        return self

    async def stop(self, clean: bool = True) -> None:
        """Stop listening. clean=False cuts every stream mid-way, like a killed process."""
        for task in self._turns:
            task.cancel()
        self.drop_subscribers(clean=clean)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAgentAPI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- controls for tests --------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

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

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.publish(sse_event("status_change", {"status": status, "agent_type": "custom"}))

    def add_message(self, role: str, content: str) -> FakeMessage:
        message = FakeMessage(len(self.messages), role, content)
        self.messages.append(message)
        self.publish(sse_event("message_update", message.sse()))
        return message

    def update_message(self, id_: int, content: str) -> None:
        message = self.messages[id_]
        message.content = content
        message.time = now_rfc3339()
        self.publish(sse_event("message_update", message.sse()))

    def restart(self) -> None:
        """An agentapi restart without saved state: ids start at 0 again."""
        self.drop_subscribers()
        self.messages = [FakeMessage(0, "agent", "")]
        self.status = "stable"

    def packed(self, cap: int = 65536) -> bytes:
        """The snapshot body a faithful sidecar holds for this conversation."""
        messages = [make_message(m.id, m.role, m.content, m.time, 65536) for m in self.messages]
        return pack(messages, cap).body

    def rest_messages(self) -> list[dict[str, Any]]:
        return [m.rest() for m in self.messages]

    async def wait_idle(self) -> None:
        """Wait until every simulated turn has finished."""
        while self._turns:
            await asyncio.gather(*self._turns, return_exceptions=True)

    # -- handlers ------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        async with self._lock:
            data = {"status": self.status, "agent_type": "custom", "transport": "pty"}
        return _json(data, schema="StatusResponseBody", request=request)

    async def _messages(self, request: web.Request) -> web.Response:
        async with self._lock:
            data = {"messages": self.rest_messages()}
        return _json(data, schema="MessagesResponseBody", request=request)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.buffer + 1)
        replay = [sse_event("message_update", m.sse()) for m in self.messages]
        replay.append(sse_event("status_change", {"status": self.status, "agent_type": "custom"}))
        replay += [sse_event("agent_error", e) for e in self.errors[-100:]]
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
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if raw == b"":
                    with contextlib.suppress(ConnectionError):
                        await resp.write_eof()
                    return resp
                await resp.write(raw)
        finally:
            self._subscribers.discard(queue)

    async def _message(self, request: web.Request) -> web.StreamResponse:
        if self.message_hook is not None:
            scripted = await self.message_hook(request)
            if scripted is not None:
                return scripted
        raw = await request.read()
        if not raw:
            return problem(request, 400, "Bad Request", "request body is required")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return problem(request, 400, "Bad Request", "validation failed",
                           [{"message": str(exc), "location": "body", "value": raw.decode()}])
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
        if body["type"] == "raw":
            self.received.append(("raw", content))
            return _json({"ok": True}, schema="MessageResponseBody", request=request)
        async with self._lock:
            text = content.strip(" \t\n\r\f\v")
            if not text:
                return self._send_failed(request, "message must not be empty")
            if self.status != "stable":
                return self._send_failed(
                    request, "message can only be sent when the agent is waiting for user input"
                )
            self.set_status("running")
            await asyncio.sleep(0.01)  # the typed text echoing back before the POST returns
            self.received.append(("user", text))
            self.add_message("user", text)
            task = asyncio.get_running_loop().create_task(self._turn(text))
            self._turns.add(task)
            task.add_done_callback(self._turns.discard)
        return _json({"ok": True}, schema="MessageResponseBody", request=request)

    def _send_failed(self, request: web.Request, why: str) -> web.Response:
        return problem(request, 500, "Internal Server Error", "unexpected error occurred",
                       [{"message": f"failed to send message: {why}"}])

    async def _turn(self, prompt: str) -> None:
        text = self.reply(prompt)
        agent = self.add_message("agent", "")
        for i in range(1, self.chunks + 1):
            await asyncio.sleep(self.chunk_delay_s)
            self.update_message(agent.id, text[: len(text) * i // self.chunks])
        await asyncio.sleep(self.stable_after_s)
        self.set_status("stable")


# ---------------------------------------------------------------------------------------


def coder_error(status: int, message: str, detail: str = "",
                validations: list[dict[str, str]] | None = None,
                headers: dict[str, str] | None = None) -> web.Response:
    """codersdk.Response, HTML-escaped with a trailing newline, as httpapi.Write does."""
    data: dict[str, Any] = {"message": message}
    if detail:
        data["detail"] = detail
    if validations:
        data["validations"] = validations
    body = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e") + "\n"
    return web.Response(status=status, text=body, headers=headers,
                        content_type="application/json", charset="utf-8")


@dataclass
class Upload:
    at: float  # time.monotonic() when the answer was sent
    wall: float  # time.time() when the request arrived
    status: int
    body: bytes
    headers: dict[str, str]




class FakeCoderd:
    """coderd's log-snapshot endpoint, checked in coderd's order (coder-contract.md §1)."""

    LIMIT = 64 * 1024

    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token or str(uuid.uuid4())
        self.tasks: set[uuid.UUID] = set()
        self.snapshots: dict[uuid.UUID, bytes] = {}
        self.uploads: list[Upload] = []
        self.hook: Hook | None = None  # runs first; a response it returns is sent as is
        self.rate_limit: int | None = None
        self._window: list[float] = []
        self.stored = asyncio.Event()
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=16 << 20)
        self.app.router.add_route("*", "/{tail:.*}", self._route)

    def add_task(self) -> uuid.UUID:
        task = uuid.uuid4()
        self.tasks.add(task)
        return task

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"  # with the slash, as CODER_AGENT_URL has

    def stored_messages(self, task: uuid.UUID) -> list[dict[str, Any]] | None:
        raw = self.snapshots.get(task)
        return None if raw is None else list(json.loads(raw)["messages"])

    async def start(self) -> FakeCoderd:
        self._runner, self.port = await serve_loopback(self.app, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeCoderd:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.stored.clear()
                await self.stored.wait()

    async def _route(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        raw = await request.read()
        status = 0  # no answer: the handler was cancelled (a hang the client gave up on)
        try:
            resp = await self._handle(request, raw)
            status = resp.status
            return resp
        finally:
            self.uploads.append(
                Upload(time.monotonic(), arrived, status, raw, dict(request.headers))
            )
            self.stored.set()

    async def _handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if self.hook is not None:
            scripted = await self.hook(request)
            if scripted is not None:
                return scripted
        if self.rate_limit is not None:
            now = time.monotonic()
            self._window = [t for t in self._window if now - t < 60]
            if len(self._window) >= self.rate_limit:
                return coder_error(
                    429,
                    f"You've been rate limited for sending more than {self.rate_limit} "
                    "requests in 1m0s.",
                    headers={"Retry-After": "60"},
                )
            self._window.append(now)
        parts = request.path.split("/")
        # ['', 'api', 'v2', 'workspaceagents', 'me', 'tasks', '{task}', 'log-snapshot']
        if parts[:5] != ["", "api", "v2", "workspaceagents", "me"]:
            return coder_error(404, "Route not found.")
        token = request.headers.get("Coder-Session-Token") or request.cookies.get(
            "coder_session_token"
        )
        if not token:
            return coder_error(401, 'Cookie "coder_session_token" must be provided.')
        try:
            parsed = uuid.UUID(token)
        except ValueError:
            return coder_error(401, "Workspace agent token invalid.",
                               f"An agent token must be a valid UUIDv4. (len {len(token)})")
        if parsed != uuid.UUID(self.token):
            return coder_error(
                401, "Workspace agent not authorized.",
                "The agent cannot authenticate until the workspace provision job has been "
                "completed. If the job is no longer running, this agent is invalid.",
            )
        if len(parts) != 8 or parts[5] != "tasks" or parts[7] != "log-snapshot":
            return coder_error(404, "Route not found.")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        try:
            task = uuid.UUID(parts[6])
        except ValueError:
            return coder_error(400, "Invalid task ID format.", "invalid UUID length: "
                               f"{len(parts[6])}")
        validations = []
        for key in request.query:
            if key != "format":
                validations.append({"field": key, "detail": f'"{key}" is not a valid query param'})
        formats = request.query.getall("format", [])
        if not formats or not formats[0]:
            validations.append({"field": "format", "detail":
                                'Query param "format" is required and cannot be empty'})
        elif len(formats) > 1:
            validations.append({"field": "format", "detail":
                                f'Query param "format" provided more than once, found '
                                f"{len(formats)} times. Only provide 1 instance of this query "
                                "param."})
        if validations:
            return coder_error(400, "Invalid query parameters.", validations=validations)
        if formats[0] != "agentapi":
            return coder_error(400, "Invalid format parameter.",
                               f'Only "agentapi" format is currently supported, got '
                               f'"{formats[0]}".')
        if task not in self.tasks:
            return coder_error(404, "Resource not found or you do not have access to this "
                               "resource")
        if len(raw) > self.LIMIT:
            return coder_error(400, "Failed to decode request payload.",
                               "http: request body too large")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return coder_error(400, "Failed to decode request payload.",
                               "EOF" if not raw.strip() else str(exc))
        if not isinstance(data, dict) or data.get("messages") is None:
            return coder_error(400, "Invalid agentapi payload structure.",
                               'Missing required "messages" field.')
        if "\\u0000" in raw.decode("utf-8", "replace") or "\x00" in raw.decode(
            "utf-8", "replace"
        ):
            return coder_error(500, "Internal error storing snapshot.",
                               "unsupported Unicode escape sequence")
        self.snapshots[task] = raw
        return web.Response(status=204)
