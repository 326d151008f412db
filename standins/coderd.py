"""A coderd stand-in: the log-snapshot endpoint, checked in coderd's order.

It validates an upload exactly as coder-contract.md §1 orders coderd's checks (token,
task id, query, format, ownership, size, JSON, messages, NUL) and answers with coderd's
bodies. It also serves the public `GET /api/v2/buildinfo`, and can run as a Coder without
Tasks (`tasks_served = False`: v2.36 with CODER_ENABLE_AI_TASKS off, v2.37+), where the
route is not registered and an authenticated upload gets chi's 404 "Route not found."
(field-notes.md §1). Tests script failures, hangs, rate limits and fronts with `hook`
(`front_body_limit`, `redirecting`, `nginx_page` make the usual fronts) and `rate_limit`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent_sidecar.simulator import serve_loopback
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES
from standins.waiting import Hook


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
    """One request the stand-in answered (or was cancelled on: status 0)."""

    at: float  # time.monotonic() when the answer was sent
    wall: float  # time.time() when the request arrived
    status: int
    body: bytes
    headers: dict[str, str]


class FakeCoderd:
    """coderd's log-snapshot endpoint on loopback, checked in coderd's order
    (coder-contract.md §1). Start it with `async with`."""

    LIMIT = CODERD_MAX_BODY_BYTES

    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 version: str = "v2.34.5+c0ffee1") -> None:
        self.token = token or str(uuid.uuid4())
        self.version = version  # what GET /api/v2/buildinfo says
        self.tasks_served = True  # False: a Coder without Tasks (the route is missing)
        self.buildinfo_requests: list[dict[str, str]] = []  # their headers
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
        if request.path == "/api/v2/buildinfo" and request.method == "GET":
            # Public, before any middleware that needs a token; not counted as an upload.
            self.buildinfo_requests.append(dict(request.headers))
            return web.json_response({
                "external_url": self.url.rstrip("/"), "version": self.version,
                "dashboard_url": self.url.rstrip("/"), "workspace_proxy": False,
                "agent_api_version": "2.0", "provisioner_api_version": "1.0",
                "upgrade_message": "", "deployment_id": "00000000-0000-4000-8000-000000000000",
                "webpush_public_key": "", "telemetry": False,
            })
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
        if (len(parts) != 8 or parts[5] != "tasks" or parts[7] != "log-snapshot"
                or not self.tasks_served):
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


def nginx_page(status: int, reason: str) -> web.Response:
    """An error page as nginx writes it: HTML, not coderd's JSON."""
    body = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
            f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n")
    return web.Response(status=status, text=body, content_type="text/html")


def front_body_limit(max_bytes: int) -> Hook:
    """A front (nginx with client_max_body_size) that refuses larger bodies with its own
    HTML 413 before coderd sees them."""
    async def hook(request: web.Request) -> web.StreamResponse | None:
        if len(await request.read()) > max_bytes:
            return nginx_page(413, "Request Entity Too Large")
        return None

    return hook


def redirecting(status: int, location: Callable[[web.Request], str]) -> Hook:
    """A front that answers every request but buildinfo with a redirect to
    `location(request)`."""
    async def hook(request: web.Request) -> web.StreamResponse | None:
        return web.Response(status=status, headers={"Location": location(request)},
                            text=f"{status} redirect", content_type="text/plain")

    return hook
