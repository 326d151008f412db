"""The Coder client: one upload attempt, classified the way coderd's handler answers."""

from __future__ import annotations

import email.utils
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from standins import FakeCoderd
from yarl import URL

from agent_sidecar.coder import CoderClient, Result, parse_retry_after, snapshot_url
from agent_sidecar.tokens import TokenSource

from .conftest import CompatResponse, make_settings

TASK = uuid.UUID("0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70")
TOKEN = "4b1c1d7e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
BASE = "https://coder.example.com/"
URL_ = (f"https://coder.example.com/api/v2/workspaceagents/me/tasks/{TASK}/log-snapshot"
        "?format=agentapi")
BODY = b'{"messages":[]}'
NOW = 1_800_000_000.0


@pytest.fixture
async def client() -> AsyncIterator[CoderClient]:
    async with aiohttp.ClientSession() as session:
        settings = make_settings(coder_url=BASE, task_id=TASK, upload_timeout_s=0.5)
        yield CoderClient(session, settings, TokenSource(TOKEN, None), now=lambda: NOW)


def coder_body(message: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, **extra}
    if detail:
        body["detail"] = detail
    return body


CASES: list[tuple[str, int, Any, dict[str, str], Result, float | None]] = [
    ("stored", 204, None, {}, Result.ACCEPTED, None),
    ("request timeout", 408, "", {}, Result.RETRY, None),
    ("rate limited, seconds", 429, coder_body("You've been rate limited for sending more than "
     "512 requests in 1m0s."), {"Retry-After": "60"}, Result.RETRY, 60.0),
    ("rate limited, date", 429, "", {"Retry-After": email.utils.formatdate(NOW + 42,
     usegmt=True)}, Result.RETRY, 42.0),
    ("rate limited, malformed", 429, "", {"Retry-After": "soon"}, Result.RETRY, None),
    ("db error", 500, coder_body("Internal error storing snapshot.", "boom"), {}, Result.RETRY,
     None),
    ("proxy, plain text", 502, "<html>Bad Gateway</html>", {}, Result.RETRY, None),
    ("proxy unavailable", 503, "upstream connect error", {}, Result.RETRY, None),
    ("proxy timeout", 504, "", {}, Result.RETRY, None),
    ("bad payload", 400, coder_body("Failed to decode request payload.", "unexpected EOF"), {},
     Result.PAYLOAD_REJECTED, None),
    ("too large", 400, coder_body("Failed to decode request payload.",
     "http: request body too large"), {}, Result.PAYLOAD_REJECTED, None),
    ("token", 401, coder_body("Workspace agent not authorized.", "The agent cannot "
     "authenticate until the workspace provision job has been completed."), {},
     Result.TOKEN_REJECTED, None),
    ("task not this workspace's", 404, coder_body("Resource not found or you do not have "
     "access to this resource"), {}, Result.TASK_NOT_FOUND, None),
    ("old coderd", 404, coder_body("Route not found."), {}, Result.NOT_SUPPORTED, None),
]


@pytest.mark.parametrize(("status", "body", "headers", "result", "retry_after"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_classification(client: CoderClient, status: int, body: Any,
                              headers: dict[str, str], result: Result,
                              retry_after: float | None) -> None:
    """Each coderd or proxy answer maps to the outcome the retry policy needs."""
    with aioresponses() as mock:
        kwargs: dict[str, Any] = {"status": status, "headers": headers}
        if isinstance(body, dict):
            kwargs["payload"] = body
        elif body:
            kwargs["body"] = body
        mock.post(URL_, response_class=CompatResponse, **kwargs)
        outcome = await client.upload(BODY)
    assert outcome.result is result
    assert outcome.status == status
    if retry_after is None:
        assert outcome.retry_after_s is None
    else:
        assert outcome.retry_after_s == pytest.approx(retry_after, abs=1)
    if isinstance(body, dict):
        assert outcome.message == body["message"]
        assert outcome.detail == body.get("detail", "")


async def test_too_large_is_recognised(client: CoderClient) -> None:
    """A 400 whose detail is 'request body too large' asks for a smaller snapshot."""
    with aioresponses() as mock:
        mock.post(URL_, response_class=CompatResponse, status=400, payload=coder_body(
            "Failed to decode request payload.", "http: request body too large"))
        outcome = await client.upload(BODY)
    assert outcome.too_large


async def test_validations_are_part_of_the_detail(client: CoderClient) -> None:
    """coderd's validations list is folded into the detail a person reads."""
    with aioresponses() as mock:
        mock.post(URL_, response_class=CompatResponse, status=400, payload=coder_body(
            "Invalid query parameters.",
            validations=[{"field": "format", "detail": "Query param \"format\" is required"}]))
        outcome = await client.upload(BODY)
    assert outcome.detail == 'format: Query param "format" is required'


async def test_network_error_and_timeout_are_retryable(client: CoderClient) -> None:
    """No answer at all, from a refused connection or a timeout, is worth retrying."""
    with aioresponses() as mock:
        mock.post(URL_, exception=aiohttp.ClientConnectionError("refused"))
        mock.post(URL_, exception=TimeoutError())
        refused = await client.upload(BODY)
        timed_out = await client.upload(BODY)
    assert (refused.result, refused.status) == (Result.RETRY, None)
    assert "refused" in refused.message
    assert (timed_out.result, timed_out.status) == (Result.RETRY, None)
    assert "timed out" in timed_out.message


async def test_request_shape(client: CoderClient) -> None:
    """The token travels in Coder-Session-Token, never the query; the body is JSON."""
    with aioresponses() as mock:
        mock.post(URL_, response_class=CompatResponse, status=204)
        await client.upload(BODY)
        [(key, calls)] = mock.requests.items()
    method, url = key
    assert method == "POST"
    assert url == URL(URL_)
    assert TOKEN not in str(url)
    call = calls[0]
    assert call.kwargs["headers"]["Coder-Session-Token"] == TOKEN
    assert call.kwargs["headers"]["Content-Type"] == "application/json"
    assert call.kwargs["data"] == BODY


@pytest.mark.parametrize(("base", "expected"), [
    ("https://coder.example.com/", "https://coder.example.com/api/v2/"),
    ("https://coder.example.com", "https://coder.example.com/api/v2/"),
    ("https://example.com/coder/", "https://example.com/coder/api/v2/"),
    ("http://127.0.0.1:3000//", "http://127.0.0.1:3000/api/v2/"),
])
def test_url_is_joined_properly(base: str, expected: str) -> None:
    """A trailing slash (as CODER_AGENT_URL has) or a path prefix never doubles a '/'."""
    url = snapshot_url(base, TASK)
    assert str(url) == (f"{expected}workspaceagents/me/tasks/{TASK}/log-snapshot"
                        "?format=agentapi")


def test_retry_after_parsing() -> None:
    """Retry-After is read as delta-seconds or an HTTP date; anything else is ignored."""
    assert parse_retry_after("120", lambda: NOW) == 120
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True),
                             lambda: NOW) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(NOW - 30, usegmt=True), lambda: NOW) == 0
    for bad in (None, "", "-5", "1.5", "tomorrow", "Mon, 99 Foo 2026"):
        assert parse_retry_after(bad, lambda: NOW) is None


async def test_against_the_coderd_stand_in(coderd: FakeCoderd) -> None:
    """On real sockets: stored with the right token and task; each wrong part gets its code."""
    task = coderd.add_task()
    async with aiohttp.ClientSession() as session:
        def client(token: str, task_id: uuid.UUID = task) -> CoderClient:
            settings = make_settings(coder_url=coderd.url, task_id=task_id)
            return CoderClient(session, settings, TokenSource(token, None))

        ok = await client(coderd.token).upload(b'{"messages":[{"id":1,"content":"hi",'
                                               b'"role":"user","time":"2026-01-01T00:00:00Z"}]}')
        assert ok.result is Result.ACCEPTED
        assert coderd.stored_messages(task) == [
            {"id": 1, "content": "hi", "role": "user", "time": "2026-01-01T00:00:00Z"}]
        bad_token = await client(str(uuid.uuid4())).upload(BODY)
        assert bad_token.result is Result.TOKEN_REJECTED
        other_task = await client(coderd.token, uuid.uuid4()).upload(BODY)
        assert other_task.result is Result.TASK_NOT_FOUND
        too_big = await client(coderd.token).upload(b" " * 65537)
        assert too_big.too_large
        null = await client(coderd.token).upload(b'{"messages":null}')
        assert null.result is Result.PAYLOAD_REJECTED
        assert null.detail == 'Missing required "messages" field.'


@pytest.mark.parametrize(("query", "message", "detail"), [
    ("", "Invalid query parameters.", 'format: Query param "format" is required and cannot '
     "be empty"),
    ("?format=", "Invalid query parameters.", 'format: Query param "format" is required and '
     "cannot be empty"),
    ("?format=agentapi&format=agentapi", "Invalid query parameters.",
     'format: Query param "format" provided more than once'),
    ("?format=agentapi&coder_session_token=x", "Invalid query parameters.",
     'coder_session_token: "coder_session_token" is not a valid query param'),
    ("?format=AgentAPI", "Invalid format parameter.",
     'Only "agentapi" format is currently supported, got "AgentAPI".'),
])
async def test_coderd_stand_in_checks_the_query_like_coderd(
    coderd: FakeCoderd, query: str, message: str, detail: str,
) -> None:
    """The stand-in rejects a missing, empty, repeated or wrong `format` and any other query
    key with coderd's 400 bodies, so the client's URL is held to coderd's rules."""
    task = coderd.add_task()
    url = f"{coderd.url}api/v2/workspaceagents/me/tasks/{task}/log-snapshot{query}"
    async with aiohttp.ClientSession() as session, session.post(
        url, data=BODY, headers={"Coder-Session-Token": coderd.token}
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["message"] == message
    found = body.get("detail") or "; ".join(f"{v['field']}: {v['detail']}"
                                            for v in body["validations"])
    assert detail in found
    assert coderd.snapshots == {}
