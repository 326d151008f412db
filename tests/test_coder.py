"""The Coder client: one upload attempt, classified the way coderd's handler answers."""

from __future__ import annotations

import email.utils
import socket
import tracemalloc
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from standins import FakeCoderd, ForwardProxy, hanging
from yarl import URL

from agent_sidecar.coder import (
    FIRST_LINE_CHARS,
    LOCATION_CHARS,
    MAX_REDIRECTS,
    CoderClient,
    Result,
    parse_retry_after,
    plain_http_warning,
    shown_location,
    snapshot_url,
    tasks_hint,
)
from agent_sidecar.proxy import Proxies
from agent_sidecar.simulator import serve_loopback
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
        settings = make_settings(coder_url=BASE, task_id=TASK, upload_timeout_s=0.5,
                                 coder_token=TOKEN)
        yield CoderClient(session, settings, TokenSource(settings), proxies=Proxies(),
                          now=lambda: NOW)


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
     "http: request body too large"), {}, Result.TOO_LARGE, None),
    ("token", 401, coder_body("Workspace agent not authorized.", "The agent cannot "
     "authenticate until the workspace provision job has been completed."), {},
     Result.TOKEN_REJECTED, None),
    ("task not this workspace's", 404, coder_body("Resource not found or you do not have "
     "access to this resource"), {}, Result.TASK_NOT_FOUND, None),
    ("no Tasks on this coderd", 404, coder_body("Route not found."), {},
     Result.TASKS_UNAVAILABLE, None),
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
            settings = make_settings(coder_url=coderd.url, task_id=task_id, coder_token=token)
            return CoderClient(session, settings, TokenSource(settings))

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


# -- redirects: followed only to the same host -------------------------------------------

HTTP_BASE = "http://coder.example.com/"
PATH = f"api/v2/workspaceagents/me/tasks/{TASK}/log-snapshot?format=agentapi"
MOVED = f"https://coder.example.com/new/{PATH}&sig=secret"  # same host, new path and query
UPGRADED = f"https://coder.example.com:8443/{PATH}"  # http -> https, and another port
ELSEWHERE = f"https://other.example.net/{PATH}&sig=secret"


def http_client(session: aiohttp.ClientSession) -> CoderClient:
    settings = make_settings(coder_url=HTTP_BASE, task_id=TASK, coder_token=TOKEN)
    return CoderClient(session, settings, TokenSource(settings), proxies=Proxies())


REDIRECTS: list[tuple[str, str, int, str, bool]] = [
    (kind, base, status, target, status in (307, 308) and kind != "other host")
    for status in (301, 302, 303, 307, 308)
    for kind, base, target in (("same host", BASE, MOVED), ("other host", BASE, ELSEWHERE),
                               ("https upgrade", HTTP_BASE, UPGRADED))
]


@pytest.mark.parametrize(("kind", "base", "status", "target", "followed"), REDIRECTS,
                         ids=[f"{r[2]} {r[0]}" for r in REDIRECTS])
async def test_redirects(kind: str, base: str, status: int, target: str,
                         followed: bool) -> None:
    """307 and 308 are followed with the body and the token to the same host (the port may
    change with an http->https upgrade); 301/302/303 on a POST and any redirect to another
    host are not: `redirected`, naming the Location without its query."""
    first = URL(base).join(URL(PATH))
    async with aiohttp.ClientSession() as session:
        settings = make_settings(coder_url=base, task_id=TASK, coder_token=TOKEN)
        client = CoderClient(session, settings, TokenSource(settings), proxies=Proxies())
        with aioresponses() as mock:
            mock.post(first, response_class=CompatResponse, status=status,
                      headers={"Location": target}, body="moved")
            mock.post(target, response_class=CompatResponse, status=204)
            outcome = await client.upload(BODY)
            requests = {str(url): calls for (_, url), calls in mock.requests.items()}
    if followed:
        assert outcome.result is Result.ACCEPTED
        [call] = requests[str(URL(target))]
        assert call.kwargs["data"] == BODY  # the body goes along, unchanged
        assert call.kwargs["headers"]["Coder-Session-Token"] == TOKEN
    else:
        assert outcome.result is Result.REDIRECTED
        assert outcome.status == status
        assert str(URL(target)) not in requests  # never asked, so the token never went
        shown = str(URL(target).with_query(None))
        assert outcome.location == shown
        assert shown in outcome.describe()
        assert "sig=secret" not in outcome.describe()
        assert "format=agentapi" not in outcome.describe()


@pytest.mark.parametrize(("location", "why"), [
    ("http://coder.example.com/elsewhere", "from https to plain http"),
    ("https://coder.example.com:8443/x", "another port"),
    ("", "without a Location header"),
    ("http://[::1", "which is not a URL"),
    ("ftp://coder.example.com/x", "not an http(s) URL"),
])
async def test_redirects_it_will_not_follow_say_why(client: CoderClient, location: str,
                                                    why: str) -> None:
    """A downgrade to http, another port without the upgrade, and a missing or garbage
    Location are not followed; the outcome says why, and nothing crashes."""
    with aioresponses() as mock:
        headers = {"Location": location} if location else {}
        mock.post(URL_, response_class=CompatResponse, status=307, headers=headers)
        outcome = await client.upload(BODY)
    assert outcome.result is Result.REDIRECTED
    assert why in outcome.message


async def test_a_redirect_loop_ends_after_a_few_hops(client: CoderClient) -> None:
    """Redirects are followed at most MAX_REDIRECTS times, then it is `redirected`."""
    with aioresponses() as mock:
        mock.post(URL_, response_class=CompatResponse, status=308, headers={"Location": URL_},
                  repeat=True)
        outcome = await client.upload(BODY)
        [(_, calls)] = mock.requests.items()
    assert outcome.result is Result.REDIRECTED
    assert f"more than {MAX_REDIRECTS} redirects" in outcome.message
    assert len(calls) == MAX_REDIRECTS + 1


# -- fronts: answers that coderd did not write ---------------------------------------------

NGINX_413 = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
             "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx"
             "</center>\r\n</body>\r\n</html>\r\n")
NGINX_502 = NGINX_413.replace("413 Request Entity Too Large", "502 Bad Gateway")


@pytest.mark.parametrize(("status", "body", "ctype", "result", "described"), [
    (413, NGINX_413, "text/html", Result.TOO_LARGE,
     "HTTP 413 (text/html): 413 Request Entity Too Large"),
    (413, "", "", Result.TOO_LARGE, "HTTP 413 (no content type)"),
    (502, NGINX_502, "text/html", Result.RETRY, "HTTP 502 (text/html): 502 Bad Gateway"),
    (407, "<h1>Proxy Authentication Required</h1>", "text/html", Result.RETRY,
     "HTTP 407 (text/html): Proxy Authentication Required"),
    (404, "<h1>Not Found</h1>", "text/html", Result.TASK_NOT_FOUND,
     "HTTP 404 (text/html): Not Found"),
    (403, "Forbidden by policy " + "x" * 500, "text/plain", Result.PAYLOAD_REJECTED,
     "HTTP 403 (text/plain): Forbidden by policy xxx"),
    (200, "<html><title>Sign in</title></html>", "text/html", Result.RETRY,
     "HTTP 200 (text/html): Sign in"),
    (202, "", "", Result.RETRY, "HTTP 202 (no content type)"),
])
async def test_fronts_are_classified_by_http_meaning(
    client: CoderClient, status: int, body: str, ctype: str, result: Result,
    described: str,
) -> None:
    """A front's answer is read by its status first: any 413 is too large, an HTML 502 is
    retried, and a success other than coderd's 204 (a sign-in page's 200) is not "stored";
    its body is described by status, content type and first line, cut short."""
    with aioresponses() as mock:
        mock.post(URL_, response_class=CompatResponse, status=status, body=body,
                  content_type=ctype)
        outcome = await client.upload(BODY)
    assert outcome.result is result
    assert not outcome.from_coderd
    assert outcome.describe().startswith(described)
    assert len(outcome.describe()) <= 40 + FIRST_LINE_CHARS


def test_garbage_retry_after_is_named_not_fatal(client: CoderClient) -> None:
    """A Retry-After that is neither seconds nor a date is ignored and named in a note; an
    absurd one is capped later, never a crash."""
    odd = client.classify(503, b"", {"Retry-After": "soon\x00" + "x" * 500})
    assert odd.result is Result.RETRY
    assert odd.retry_after_s is None
    [note] = odd.notes
    assert note.startswith("ignored Retry-After 'soon\\x00xxx")
    assert len(note) < 200
    huge = client.classify(429, b"", {"Retry-After": "9" * 400})
    assert huge.retry_after_s == float("inf")
    future = client.classify(429, b"", {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    assert future.retry_after_s is not None


async def test_a_route_not_found_from_a_coder_without_tasks(coderd: FakeCoderd) -> None:
    """A Coder without Tasks answers an authenticated upload 404 "Route not found.": Tasks
    unavailable; a bad token still gets 401 first, so it still means the token."""
    coderd.tasks_served = False
    task = coderd.add_task()
    async with aiohttp.ClientSession() as session:
        for token, result in ((coderd.token, Result.TASKS_UNAVAILABLE),
                              (str(uuid.uuid4()), Result.TOKEN_REJECTED)):
            settings = make_settings(coder_url=coderd.url, task_id=task, coder_token=token)
            outcome = await CoderClient(session, settings, TokenSource(settings)).upload(BODY)
            assert outcome.result is result
            assert outcome.from_coderd


# -- response bodies are capped ------------------------------------------------------------


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server whose error bodies never end, or decompress to gigabytes."""
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        chunk = b"no end to this error " * 3000
        try:
            while True:
                await resp.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zipped = b"".join([bomb.compress(b"first line of a bomb\n" + b"\0" * (1 << 20))]
                      + [bomb.compress(b"\0" * (1 << 20)) for _ in range(200)] + [bomb.flush()])

    async def gzip_bomb(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=502, body=zipped, headers={
            "Content-Encoding": "gzip", "Content-Type": "text/plain"})

    app = web.Application()
    app.router.add_post("/endless/{tail:.*}", endless)
    app.router.add_post("/bomb/{tail:.*}", gzip_bomb)
    runner, port = await serve_loopback(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", sent
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("kind", ["endless", "bomb"])
async def test_response_bodies_are_read_up_to_the_cap_compressed_or_not(
    hostile: tuple[str, list[int]], kind: str,
) -> None:
    """An error body that never ends, or a gzip body of 200 MiB of zeros, costs at most
    max_coderd_response_bytes of memory: the answer is classified, not read whole."""
    base, _sent = hostile
    async with aiohttp.ClientSession() as session:
        settings = make_settings(coder_url=f"{base}/{kind}/", task_id=TASK,
                                 coder_token=TOKEN, upload_timeout_s=5,
                                 max_coderd_response_bytes=4096)
        client = CoderClient(session, settings, TokenSource(settings), proxies=Proxies())
        tracemalloc.start()
        try:
            outcome = await client.upload(BODY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert outcome.status == (400 if kind == "endless" else 502)
    assert peak < 8 << 20, f"peak {peak} bytes"
    assert outcome.message.startswith("no end to this error" if kind == "endless"
                                      else "first line of a bomb")


# -- proxies, for real ---------------------------------------------------------------------


async def test_uploads_go_through_a_forward_proxy_with_its_credentials(
    coderd: FakeCoderd,
) -> None:
    """With HTTP_PROXY set, the upload goes to the proxy in absolute form, with the proxy's
    credentials from its URL and the token as for coderd; the proxy reaches a coderd whose
    name the workspace cannot resolve."""
    task = coderd.add_task()
    name = f"coderd.invalid:{coderd.port}"
    async with ForwardProxy({name: ("127.0.0.1", coderd.port)},
                            credentials=("me", "pw@1")) as proxy:
        proxies = Proxies.from_environ({"HTTP_PROXY": f"http://me:pw%401@127.0.0.1:"
                                        f"{proxy.port}"})
        async with aiohttp.ClientSession() as session:
            settings = make_settings(coder_url=f"http://{name}/", task_id=task,
                                     coder_token=coderd.token)
            client = CoderClient(session, settings, TokenSource(settings), proxies=proxies)
            outcome = await client.upload(b'{"messages":[]}')
    assert outcome.result is Result.ACCEPTED
    [request] = proxy.requests
    assert request.target == str(snapshot_url(f"http://{name}/", task))
    assert request.headers["Coder-Session-Token"] == coderd.token
    assert coderd.snapshots[task] == b'{"messages":[]}'


async def test_a_proxy_that_is_down_is_a_retryable_error_named_as_the_proxy(
    coderd: FakeCoderd,
) -> None:
    """A proxy that refuses connections is a retryable network error that names the proxy
    (without its password) and the variable it came from."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        proxies = Proxies.from_environ({"https_proxy": f"http://u:secret@127.0.0.1:{port}"})
        async with aiohttp.ClientSession() as session:
            settings = make_settings(coder_url="https://coder.invalid/", task_id=TASK,
                                     coder_token=TOKEN)
            client = CoderClient(session, settings, TokenSource(settings), proxies=proxies)
            outcome = await client.upload(BODY)
    assert outcome.result is Result.RETRY
    assert outcome.message.startswith(f"network error: the proxy http://127.0.0.1:{port} "
                                      "(from https_proxy) is unreachable")
    assert "secret" not in outcome.message


# -- coderd's build info and what it words ---------------------------------------------------


async def test_buildinfo_is_read_without_the_token(coderd: FakeCoderd) -> None:
    """GET /api/v2/buildinfo is public: it is read without the token, and its version
    kept."""
    coderd.version = "v2.37.1+abc1234"
    async with aiohttp.ClientSession() as session:
        settings = make_settings(coder_url=coderd.url, task_id=TASK, coder_token=coderd.token)
        client = CoderClient(session, settings, TokenSource(settings))
        assert await client.read_buildinfo() == "v2.37.1+abc1234"
    assert client.coderd_version == "v2.37.1+abc1234"
    [headers] = coderd.buildinfo_requests
    assert "Coder-Session-Token" not in headers
    assert coderd.uploads == []


async def test_buildinfo_that_is_not_there_is_none(client: CoderClient) -> None:
    """A coderd (or front) that does not answer buildinfo leaves the version unknown."""
    with aioresponses() as mock:
        mock.get("https://coder.example.com/api/v2/buildinfo", response_class=CompatResponse,
                 status=404, payload={"message": "Route not found."})
        assert await client.read_buildinfo() is None
    assert client.coderd_version is None


@pytest.mark.parametrize(("version", "words"), [
    ("v2.37.0+abc", ["coderd v2.37.0+abc does not serve Coder Tasks", "removed in v2.37"]),
    ("v2.40.2", ["removed in v2.37"]),
    ("v2.36.1", ["coderd v2.36.1 serves Coder Tasks, and its log-snapshot endpoint, only "
                 "when an admin sets CODER_ENABLE_AI_TASKS=true"]),
    (None, ["this coderd", "v2.28 to v2.35", "v2.34 ESR", "CODER_ENABLE_AI_TASKS=true",
            "removed in v2.37"]),
    ("v2.20.0", ["coderd v2.20.0 does not serve", "CODER_ENABLE_AI_TASKS=true"]),
    ("garbage", ["coderd garbage does not serve"]),
])
def test_the_tasks_hint_is_worded_by_version_and_never_says_upgrade(
    version: str | None, words: list[str],
) -> None:
    """The hint names what this coderd's version does with Tasks and what keeps working;
    no wording ever tells anyone to upgrade."""
    hint = tasks_hint(version, 300)
    for w in words:
        assert w in hint
    assert "CODER_ENABLE_AI_TASKS=true" in hint  # what an admin can do, on any version
    assert "the sink and the relay keep working" in hint
    assert "upgrade" not in hint.lower()


@pytest.mark.parametrize(("url", "warned"), [
    ("http://coder.example.com/", True), ("http://10.0.0.5:3000/", True),
    ("https://coder.example.com/", False), ("http://localhost:3000/", False),
    ("http://127.0.0.1:3000/", False), ("http://[::1]:3000/", False),
])
def test_plain_http_to_another_machine_is_warned_about(url: str, warned: bool) -> None:
    """The token over plain http to a host that is not loopback earns a warning."""
    assert (plain_http_warning(url) is not None) is warned


@pytest.mark.parametrize(("charset", "encoded"), [
    ("iso-8859-1", "Trop grand éè".encode("latin-1")),
    ("utf-16", "Trop grand éè".encode("utf-16")),
    ("", "Trop grand éè".encode()),
])
def test_an_error_page_is_read_in_the_charset_it_names(
    client: CoderClient, charset: str, encoded: bytes,
) -> None:
    """A front's error page in Latin-1 or UTF-16 is described in its own charset (UTF-8 when
    it names none), with no replacement characters or NULs."""
    ctype = "text/plain" + (f"; charset={charset}" if charset else "")
    outcome = client.classify(413, encoded, {"Content-Type": ctype})
    assert outcome.message == "Trop grand éè"


async def test_a_proxy_that_wants_credentials_or_hangs_is_named_as_the_proxy(
    coderd: FakeCoderd,
) -> None:
    """A proxy's 407 says the proxy wants credentials, and an upload that times out through
    a proxy names the proxy and its variable: neither reads as coderd's doing."""
    task = coderd.add_task()
    name = f"coderd.invalid:{coderd.port}"
    async with ForwardProxy({name: ("127.0.0.1", coderd.port)},
                            credentials=("me", "pw")) as proxy:
        proxies = Proxies.from_environ({"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}"})
        async with aiohttp.ClientSession() as session:
            settings = make_settings(coder_url=f"http://{name}/", task_id=task,
                                     coder_token=coderd.token, upload_timeout_s=0.5)
            client = CoderClient(session, settings, TokenSource(settings), proxies=proxies)
            wants = await client.upload(b'{"messages":[]}')
            coderd.hook = hanging()
            proxy.credentials = None
            hung = await client.upload(b'{"messages":[]}')
    assert wants.result is Result.RETRY
    assert wants.message.startswith("the proxy wants credentials (407")
    assert f"through the proxy http://127.0.0.1:{proxy.port}, from HTTP_PROXY" in wants.message
    assert hung.result is Result.RETRY
    assert hung.message == (f"timed out after 0.5s (through the proxy "
                            f"http://127.0.0.1:{proxy.port}, from HTTP_PROXY)")


def test_a_long_location_is_cut_short_where_it_is_named() -> None:
    """A Location of thousands of characters is named by its first LOCATION_CHARS, so a
    front cannot flood a log line, /status or check with it."""
    base = URL("https://coder.example.com/")
    shown = shown_location(base, "https://elsewhere.example.com/" + "a" * 6000 + "?q=1")
    assert len(shown) == LOCATION_CHARS + 3
    assert shown.startswith("https://elsewhere.example.com/aaa")
    assert shown.endswith("...")
