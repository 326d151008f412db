"""Following agentapi over real loopback sockets: replay, live updates, reconnects, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standins import FakeAgentAPI, sse_event

from agent_sidecar.agentapi import AgentAPI, AgentAPIError, AgentAPIUnavailable, NotStable
from agent_sidecar.conversation import Conversation, go_time
from agent_sidecar.simulator import serve_loopback
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack

from .conftest import make_settings, until


@asynccontextmanager
async def following(
    url: str, on_event: Callable[[str], None] | None = None, **kw: float
) -> AsyncIterator[tuple[AgentAPI, Conversation]]:
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    settings = make_settings(**{"agentapi_url": url, "poll_interval_s": 0.02, **kw})
    async with aiohttp.ClientSession() as session:
        client = AgentAPI(session, settings, on_event=on_event)
        task = asyncio.create_task(client.follow(conv))
        try:
            yield client, conv
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def state(conv: Conversation) -> list[tuple[int, str, str]]:
    return [(m.id, m.role, m.content) for m in conv.messages()]


def status(conv: Conversation) -> str | None:
    return conv.status  # a call, so that the type checker does not pin it between awaits


def fake_state(agent: FakeAgentAPI) -> list[tuple[int, str, str]]:
    return [(m.id, m.role, m.content) for m in agent.messages]


async def test_replay_then_live_updates(agent: FakeAgentAPI) -> None:
    """The replay builds the model, then live message_update events upsert into it."""
    agent.add_message("user", "hello")
    agent.add_message("agent", "Echo")
    async with following(agent.url) as (_, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        assert state(conv) == fake_state(agent)
        assert status(conv) == "stable"
        agent.set_status("running")
        agent.update_message(2, "Echo: hello, longer now")
        await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
        assert status(conv) == "running"


async def test_a_whole_turn_through_post_message(agent: FakeAgentAPI) -> None:
    """A user turn sent to agentapi shows up as user + streamed agent message, then stable."""
    async with following(agent.url) as (client, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        await client.send("hi there", "user")
        await agent.wait_idle()
        await until(lambda: state(conv) == fake_state(agent) and conv.status == "stable",
                    wake=conv.changed.wait)
        assert [r for _, r, _ in state(conv)] == ["agent", "user", "agent"]


async def test_reconnect_after_a_dropped_stream_neither_duplicates_nor_loses(
    agent: FakeAgentAPI,
) -> None:
    """A stream cut like a slow reader's reconnects and rebuilds from the replay exactly."""
    async with following(agent.url) as (client, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        for round_ in range(5):
            agent.drop_subscribers()
            agent.add_message("user", f"while away {round_}")  # missed by the dead stream
            await until(lambda: state(conv) == fake_state(agent) and conv.connected,
                        wake=conv.changed.wait)
        assert client.state.reconnects >= 5
        assert len(conv.messages()) == len({m.id for m in conv.messages()}) == 6


async def test_agentapi_restart_leaves_no_stale_messages(agent: FakeAgentAPI) -> None:
    """When agentapi restarts and ids start again at 0, the old conversation is gone."""
    for i in range(4):
        agent.add_message("user" if i % 2 == 0 else "agent", f"old {i}")
    async with following(agent.url) as (_, conv):
        await until(lambda: conv.count == 5, wake=conv.changed.wait)
        agent.restart()
        agent.add_message("user", "new life")
        await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
        assert conv.count == 2


async def test_unknown_events_and_garbage_are_ignored(
    agent: FakeAgentAPI, log_output: io.StringIO
) -> None:
    """agent_error, unknown event types, bad JSON and bad fields are skipped, not fatal."""
    async with following(agent.url) as (client, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        agent.publish(sse_event("agent_error", {"message": "x", "level": "warning", "time": "t"}))
        agent.publish(sse_event("brand_new_event", {"whatever": 1}))
        agent.publish(b"event: message_update\ndata: {not json\n\n")
        agent.publish(b"event: message_update\ndata: [1,2]\n\n")
        agent.publish(sse_event("message_update", {"id": "7", "role": "agent", "message": "x"}))
        agent.add_message("user", "still alive")
        await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
        assert client.state.reconnects == 0
    events = [json.loads(line)["event"] for line in log_output.getvalue().splitlines()]
    assert events.count("agentapi_event_invalid") == 3


async def test_polling_fallback_without_events() -> None:
    """An agentapi without /events is followed by polling /messages and /status."""
    async with FakeAgentAPI(events=False) as agent:
        agent.add_message("user", "polled")
        async with following(agent.url) as (client, conv):
            await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
            assert client.state.mode == "polling"
            agent.status = "running"
            agent.add_message("agent", "reply")
            await until(lambda: state(conv) == fake_state(agent) and conv.status == "running",
                        wake=conv.changed.wait)


class _HtmlFront(FakeAgentAPI):
    """An agentapi behind a front whose catch-all answers GET /events with a 200 HTML page."""

    def routes(self) -> list[web.RouteDef]:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<html><body>Sign in</body></html>",
                                content_type="text/html")

        return [web.get("/events", page)] + [
            r for r in super().routes() if getattr(r, "path", "") != "/events"]


async def test_an_events_answer_that_is_not_a_stream_falls_back_to_polling(
    log_output: io.StringIO,
) -> None:
    """A 200 on /events whose Content-Type is not text/event-stream (a front's HTML page) is
    named in one warning and followed by polling, not retried as a stream that ended."""
    async with _HtmlFront() as agent:
        agent.add_message("user", "polled behind a front")
        async with following(agent.url) as (client, conv):
            await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
            assert client.state.mode == "polling"
            assert client.state.reconnects == 0
    [warning] = [json.loads(line) for line in log_output.getvalue().splitlines()
                 if '"agentapi_no_events"' in line]
    assert "'text/html', not text/event-stream" in warning["detail"]


async def test_follower_waits_for_agentapi_to_come_up() -> None:
    """If agentapi is not up yet, the follower keeps retrying and connects once it is."""
    agent = FakeAgentAPI()
    await agent.start()
    port = agent.port
    await agent.stop()
    retried = asyncio.Event()
    reconnects = []

    def on_event(kind: str) -> None:
        reconnects.append(kind)
        if len(reconnects) >= 2:
            retried.set()

    async with following(f"http://127.0.0.1:{port}", on_event) as (_, conv):
        async with asyncio.timeout(5):
            await retried.wait()
        assert not conv.connected
        async with FakeAgentAPI(port=port) as revived:
            revived.add_message("user", "up")
            await until(lambda: state(conv) == fake_state(revived), timeout_s=5,
                        wake=conv.changed.wait)


async def test_a_refused_stream_says_why(log_output: io.StringIO) -> None:
    """A non-200 answer on /events (agentapi's Host allow-list) is logged with its body."""
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=400, text="Invalid host header. Allowed hosts: localhost\n")

    app = web.Application()
    app.router.add_get("/events", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    retried = asyncio.Event()
    try:
        async with following(f"http://127.0.0.1:{port}", lambda kind: retried.set()):
            async with asyncio.timeout(5):
                await retried.wait()
    finally:
        await runner.cleanup()
    [line] = [json.loads(x) for x in log_output.getvalue().splitlines()
              if "agentapi_disconnected" in x][:1]
    assert line["error"] == "AgentAPIError"
    assert line["detail"] == ("AgentAPIError: GET /events answered 400: Invalid host header. "
                              "Allowed hosts: localhost")


async def test_one_shot_calls(agent: FakeAgentAPI) -> None:
    """messages(), status() and send() map agentapi's answers to values and typed errors."""
    async with aiohttp.ClientSession() as session:
        client = AgentAPI(session, make_settings(agentapi_url=agent.url + "/"))
        agent.add_message("user", "a")
        assert [m.content for m in await client.messages(65536)] == ["", "a"]
        assert await client.status() == "stable"
        agent.status = "running"
        with pytest.raises(NotStable, match="refused"):
            await client.send("hello", "user")
        with pytest.raises(AgentAPIError) as err:
            await client.send("x", "bogus")
        assert err.value.status == 422
        await agent.stop()
        with pytest.raises(AgentAPIUnavailable):
            await client.status()


# -- what agentapi sends is bounded (issue 15, items 7 and 8) ------------------------------


@asynccontextmanager
async def serving(*routes: web.RouteDef, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A small misbehaving HTTP server on loopback; its base URL."""
    app = web.Application()
    app.add_routes(routes)
    runner, port = await serve_loopback(app, host, 0)
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def client_for(session: aiohttp.ClientSession, url: str, **kw: Any) -> AgentAPI:
    return AgentAPI(session, make_settings(agentapi_url=url, **kw))


@functools.cache
def gzip_of_zeros(size: int) -> bytes:
    """A gzip body that inflates to `size` zero bytes (about 1000:1)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [out.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + out.flush()


def peak_during() -> Callable[[], int]:
    """Start tracing allocations; the returned function stops and gives the peak, bytes."""
    tracemalloc.start()
    tracemalloc.reset_peak()

    def stop() -> int:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    return stop


async def test_a_messages_body_over_the_cap_is_refused_without_reading_it_all() -> None:
    """A 256 MiB /messages answer, with max_agentapi_response_bytes at 1 MiB, is refused after about
    1 MiB: the rest is never read."""
    written = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        block = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError):
            await resp.write(b'{"messages":[')
            for _ in range(256):
                await resp.write(block)
                written += len(block)
        return resp

    async with serving(web.get("/messages", huge)) as url, aiohttp.ClientSession() as session:
        client = client_for(session, url, max_agentapi_response_bytes=1 << 20)
        stop = peak_during()
        try:
            with pytest.raises(AgentAPIError, match="more than 1048576 bytes"):
                await client.messages(65536)
        finally:
            peak = stop()
    assert written < 64 << 20
    assert peak < 16 << 20


@pytest.mark.parametrize("answer", ["messages", "status", "error"])
async def test_a_compressed_bomb_expands_no_further_than_the_cap(answer: str) -> None:
    """A gzip body that inflates to 256 MiB, as /messages, as /status or as an error
    answer, costs at most about its cap in memory: it is inflated step by step and read no
    further."""
    bomb = gzip_of_zeros(256 << 20)

    async def bombed(request: web.Request) -> web.Response:
        return web.Response(status=500 if answer == "error" else 200, body=bomb, headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json"})

    routes = [web.get(p, bombed) for p in ("/messages", "/status")]
    async with serving(*routes) as url, aiohttp.ClientSession() as session:
        client = client_for(session, url, max_agentapi_response_bytes=1 << 20)
        stop = peak_during()
        try:
            with pytest.raises(AgentAPIError) as err:
                await (client.status() if answer == "status" else client.messages(65536))
        finally:
            peak = stop()
    assert peak < 16 << 20
    if answer == "error":
        assert err.value.status == 500
        assert len(err.value.detail) <= 500
    else:
        assert "more than" in str(err.value)


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "raw-deflate", "identity"])
async def test_compressed_answers_within_the_cap_are_read(encoding: str) -> None:
    """/messages compressed with gzip or deflate (zlib-wrapped or raw) reads like a plain one."""
    body = json.dumps({"messages": [{"id": 0, "content": "hi", "role": "user",
                                      "time": "2026-04-10T12:34:56Z"}]}).encode()
    if encoding in ("gzip", "x-gzip"):
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    elif encoding == "raw-deflate":
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = packer.compress(body) + packer.flush()
    header = "deflate" if encoding == "raw-deflate" else encoding

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Encoding": header})

    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        messages = await client_for(session, url).messages(65536)
    assert [(m.id, m.content) for m in messages] == [(0, "hi")]


async def test_an_encoding_it_cannot_inflate_is_an_error_not_a_crash() -> None:
    """A body in an encoding the sidecar does not decode (br) is refused by name."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"\x1b\x00\x00", headers={"Content-Encoding": "br"})

    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        with pytest.raises(AgentAPIError, match="'br' is not supported"):
            await client_for(session, url).messages(65536)


@functools.cache
def compressed_stream(coding: str) -> bytes:
    """An SSE replay (a user message, then stable) followed by 50 MiB of blank lines,
    compressed as `coding` says: 51 KB of gzip, like the one QA met."""
    plain = (sse_event("message_update", {"id": 0, "role": "user", "message": "hi",
                                          "time": "2026-04-10T12:34:56Z"})
             + sse_event("status_change", {"status": "stable"}) + b"\n" * (50 << 20))
    if coding == "br":
        return b"\x1b\xff\xff" + plain[:1000]  # not inflatable here, and not needed
    wbits = 15 if coding == "deflate" else 31
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(plain) + packer.flush()


@asynccontextmanager
async def loop_lag() -> AsyncIterator[Callable[[], float]]:
    """Measures how late the event loop runs a callback due every 10 ms; yields a function
    that gives the worst lateness so far, in seconds."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    handle: asyncio.TimerHandle | None = None

    def tick(due: float) -> None:
        nonlocal worst, handle
        worst = max(worst, loop.time() - due)
        handle = loop.call_at(loop.time() + 0.01, tick, loop.time() + 0.01)

    handle = loop.call_at(loop.time() + 0.01, tick, loop.time() + 0.01)
    try:
        yield lambda: worst
    finally:
        handle.cancel()


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "br"])
async def test_a_compressed_event_stream_is_refused_and_the_loop_never_stalls(
    coding: str,
) -> None:
    """An /events answer with Content-Encoding (a gzip that inflates to 50 MiB of blank
    lines) is refused by name without inflating it, then retried with the normal back-off;
    the event loop is never held up for long and nothing of the stream reaches the model."""
    body = compressed_stream(coding)

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Content-Encoding": coding})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(body)
            await asyncio.Event().wait()  # the stream stays open, as agentapi's does
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "stable", "transport": "pty"})

    async with serving(web.get("/events", events), web.get("/status", status)) as url, \
            loop_lag() as worst_lag, following(url) as (client, conv):
        await until(lambda: client.state.reconnects >= 3)
        assert worst_lag() < 0.5, worst_lag()
    assert f"Content-Encoding {coding!r}" in (client.state.last_error or "")
    assert "never compresses" in (client.state.last_error or "")
    assert client.state.mode == "events"
    assert not conv.connected
    assert conv.messages() == []


@pytest.mark.parametrize("body", ["plain", "gzip"])
async def test_a_refused_stream_body_is_read_with_a_cap(body: str) -> None:
    """A non-200 /events answer with a 256 MiB body, plain or a gzip bomb, is reported with
    a short detail read from its first bytes, and the follower carries on retrying."""
    refused = asyncio.Event()

    async def refuse(request: web.Request) -> web.StreamResponse:
        refused.set()
        if body == "gzip":
            return web.Response(status=503, body=gzip_of_zeros(256 << 20),
                                headers={"Content-Encoding": "gzip"})
        resp = web.StreamResponse(status=503)
        await resp.prepare(request)
        block = b"upstream is down " * (1 << 16)
        with contextlib.suppress(ConnectionError):
            for _ in range(256):
                await resp.write(block)
        return resp

    gzip_of_zeros(256 << 20)  # made before measuring
    async with serving(web.get("/events", refuse)) as url:
        stop = peak_during()
        try:
            async with following(url) as (client, _):
                async with asyncio.timeout(10):
                    await refused.wait()
                await until(lambda: client.state.reconnects >= 2)
        finally:
            peak = stop()
    assert peak < 16 << 20
    assert (client.state.last_error or "").startswith("AgentAPIError: GET /events answered 503")


async def test_json_nested_too_deeply_is_invalid_not_a_crash(
    agent: FakeAgentAPI, log_output: io.StringIO,
) -> None:
    """An event, or an element of /messages, nested 100 000 deep is invalid JSON to the
    follower: it is dropped; the follower neither dies of RecursionError nor reconnects."""
    deep = "[" * 100_000 + "]" * 100_000
    async with following(agent.url) as (client, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        agent.publish(f"event: message_update\ndata: {deep}\n\n".encode())
        agent.add_message("user", "still alive")
        await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
        assert client.state.reconnects == 0

    async def nested(request: web.Request) -> web.Response:
        return web.Response(text='{"messages":' + deep + "}")

    async with serving(web.get("/messages", nested)) as url, \
            aiohttp.ClientSession() as session:
        assert await client_for(session, url).messages(65536) == []
    [dropped] = [json.loads(x) for x in log_output.getvalue().splitlines()
                 if "agentapi_messages_dropped" in x]
    assert dropped["reasons"] == {"invalid JSON": 1}


MESSAGE_TIME = "2026-04-10T12:34:56Z"
POISONS: dict[str, str] = {
    "id of 5 000 digits": '{"id":' + "7" * 5000 + ',"content":"p","role":"user","time":"t"}',
    "an extra int of 5 000 digits": ('{"id":50,"content":"p","role":"user","time":"t","n":'
                                     + "7" * 5000 + "}"),
    "an extra field nested 100 000 deep": ('{"id":51,"content":"p","role":"user","x":'
                                           + "[" * 100_000 + "]" * 100_000 + "}"),
    "id as a string": '{"id":"52","content":"p","role":"user","time":"t"}',
    "id NaN": '{"id":NaN,"content":"p","role":"user","time":"t"}',
    "content a number": '{"id":53,"content":5,"role":"user","time":"t"}',
    "an array": "[1,2,3]",
    "a string with brackets": '"]}{[,"',
    "broken JSON": '{"id":54,"content":"p",,}',
    "larger than max_event_bytes": ('{"id":55,"content":"' + "x" * 70_000
                                    + '","role":"agent","time":"t"}'),
}


def messages_body(*elements: str) -> str:
    return '{"$schema":"http://localhost/schemas/M.json","messages":[' + ",".join(elements) + "]}"


def good_message(id_: int, role: str = "agent") -> str:
    return json.dumps({"id": id_, "content": f"m{id_}", "role": role, "time": MESSAGE_TIME})


@pytest.mark.parametrize("poison", list(POISONS))
async def test_one_bad_element_of_messages_is_dropped_alone(
    poison: str, log_output: io.StringIO,
) -> None:
    """An element of /messages that cannot be used, whatever is wrong with it (a huge int,
    deep nesting, a wrong type, not an object, broken, too large), is dropped with a
    warning naming why; the messages before and after it are kept."""
    body = messages_body(good_message(0, "user"), good_message(1), POISONS[poison],
                         good_message(2))

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        client = client_for(session, url, max_event_bytes=65536)
        assert [m.id for m in await client.messages(65536)] == [0, 1, 2]
    [dropped] = [json.loads(x) for x in log_output.getvalue().splitlines()
                 if "agentapi_messages_dropped" in x]
    assert dropped["count"] == 1


async def test_read_messages_tells_its_caller_what_it_dropped_and_where() -> None:
    """read_messages returns its drop counts by reason, and `on_drop` gets each drop in its
    place among the messages, so a caller can tell which part of the history lost one."""
    body = messages_body(good_message(0, "user"), POISONS["larger than max_event_bytes"],
                         good_message(1), POISONS["broken JSON"])

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    seen: list[int | str] = []
    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        client = client_for(session, url, max_event_bytes=65536)
        dropped = await client.read_messages(65536, lambda m: seen.append(m.id), seen.append)
    assert dropped == {"larger than max_event_bytes": 1, "invalid JSON": 1}
    assert seen == [0, "larger than max_event_bytes", 1, "invalid JSON"]


async def test_an_oversized_event_is_logged_naming_the_setting_and_limit(
    agent: FakeAgentAPI, log_output: io.StringIO,
) -> None:
    """An SSE event over max_event_bytes is logged with the setting, its limit, and the
    bytes that had arrived when it was dropped, named as a lower bound."""
    async with following(agent.url, max_event_bytes=65536) as (_, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        agent.add_message("agent", "x" * 100_000)
        await until(lambda: "agentapi_event_too_large" in log_output.getvalue())
    [line] = [json.loads(x) for x in log_output.getvalue().splitlines()
              if "agentapi_event_too_large" in x]
    assert line["setting"] == "max_event_bytes"
    assert line["limit"] == 65536
    assert line["size_at_least"] > 65536
    assert "max_event_bytes (65536 bytes)" in line["detail"]
    assert "size" not in line


async def test_polling_follows_the_good_messages_around_poison_ones(
    log_output: io.StringIO,
) -> None:
    """In the polling fallback, five valid messages among every kind of poison element are
    followed: the model holds the five, and stays connected."""
    body = messages_body(good_message(0, "user"), *POISONS.values(),
                         *(good_message(i) for i in range(1, 5)))

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "stable"})

    routes = [web.get("/messages", answer), web.get("/status", status)]
    async with serving(*routes) as url, \
            following(url, max_event_bytes=65536) as (client, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        assert client.state.mode == "polling"
        assert [m.id for m in conv.messages()] == [0, 1, 2, 3, 4]
        assert conv.has_user
    dropped = [json.loads(x) for x in log_output.getvalue().splitlines()
               if "agentapi_messages_dropped" in x]
    assert dropped[0]["count"] == len(POISONS)


@pytest.mark.parametrize("body", [
    '{"messages":[{"id":0,"content":"a","role":"user","time":"t"}',
    '{"messages":{"id":0}}',
    "[]",
    "null",
])
async def test_a_body_without_a_whole_messages_list_is_an_error(body: str) -> None:
    """A /messages body that is cut inside the list, has no list, or is not an object is
    an AgentAPIError saying so: nothing of it is used."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        with pytest.raises(AgentAPIError, match="without a messages list"):
            await client_for(session, url).messages(65536)


@pytest.mark.parametrize(("field", "value"), [
    ("id", 2**63),
    ("id", -1),
    ("id", 1.0),
    ("id", True),
    ("role", None),
    ("content", 5),
])
async def test_a_message_coderd_would_refuse_is_dropped_the_others_kept(
    field: str, value: Any, log_output: io.StringIO,
) -> None:
    """One message from /messages with an id outside int64 (or not an integer), or a role or
    content that is not a string, is dropped with a warning; the others are kept."""
    poison = {"id": 1, "content": "p", "role": "agent", "time": "2026-04-10T12:34:56Z",
              field: value}
    good = [{"id": i, "content": f"m{i}", "role": "user", "time": "2026-04-10T12:34:56Z"}
            for i in (0, 2)]

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"messages": [good[0], poison, good[1]]})

    async with serving(web.get("/messages", answer)) as url, \
            aiohttp.ClientSession() as session:
        messages = await client_for(session, url).messages(65536)
    assert [m.id for m in messages] == [0, 2]
    assert "agentapi_messages_dropped" in log_output.getvalue()


async def test_a_poison_event_never_reaches_the_snapshot(
    agent: FakeAgentAPI, log_output: io.StringIO,
) -> None:
    """Over SSE, an id of 2**63 is dropped and a time of month 13 or with full-width digits
    is replaced: the packed body holds only what coderd's Go decoder accepts, and every
    good message."""
    bad_times = ["2025-13-45T10:00:00Z", "2025-01-01T10:00:00+99:99",
                 "\uff12\uff10\uff12\uff15-01-01T10:00:00Z"]
    async with following(agent.url) as (_, conv):
        await until(lambda: conv.connected, wake=conv.changed.wait)
        agent.publish(sse_event("message_update", {"id": 2**63, "role": "agent",
                                                   "message": "big", "time": "t"}))
        agent.add_message("user", "kept")
        for id_, time_ in enumerate(bad_times, start=2):
            agent.publish(sse_event("message_update", {"id": id_, "role": "agent",
                                                       "message": "m", "time": time_}))
        await until(lambda: conv.count == 5, wake=conv.changed.wait)
    body = json.loads(pack(conv.messages(), 65536).body)["messages"]
    assert [m["id"] for m in body] == [0, 1, 2, 3, 4]
    assert all(go_time(m["time"]) == m["time"] for m in body)
    events = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert "agentapi_time_replaced" in events
    assert "agentapi_event_invalid" in events


# -- redirects (issue 10): never to another host ------------------------------------------


async def test_a_redirect_to_another_host_is_not_followed(log_output: io.StringIO) -> None:
    """/events, /messages and /status redirected to another host are refused, naming the
    Location without its query; the other host never sees a request."""
    async with FakeAgentAPI(host="127.0.0.2") as elsewhere:
        elsewhere.add_message("user", "a conversation that is not ours")

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{elsewhere.url}{request.path}?token=secret")

        routes = [web.get(p, moved) for p in ("/events", "/messages", "/status")]
        async with serving(*routes) as url:
            async with aiohttp.ClientSession() as session:
                client = client_for(session, url)
                for call in (client.messages(65536), client.status()):
                    with pytest.raises(AgentAPIError, match="another host; not followed"):
                        await call
            async with following(url) as (follower, conv):
                await until(lambda: follower.state.reconnects >= 2)
                assert not conv.connected
                assert conv.messages() == []
        assert elsewhere.subscribers == 0
        error = follower.state.last_error or ""
        assert f"redirecting to {elsewhere.url}/events, another host" in error
        assert "secret" not in error
        assert "secret" not in log_output.getvalue()


async def test_a_redirect_within_agentapi_is_followed_a_few_times() -> None:
    """A redirect that stays on agentapi's own scheme, host and port is followed (here an
    old path prefix), up to three hops; a loop is an error, not a hang."""
    class Prefixed(FakeAgentAPI):
        def routes(self) -> list[web.RouteDef]:
            async def moved(request: web.Request) -> web.Response:
                raise web.HTTPPermanentRedirect("/" + request.match_info["tail"])

            async def loop(request: web.Request) -> web.Response:
                raise web.HTTPFound(request.path)

            return [*super().routes(), web.get("/old/{tail:.*}", moved),
                    web.get("/loop/{tail:.*}", loop)]

    async with Prefixed() as agent:
        agent.add_message("user", "through the redirect")
        async with following(agent.url + "/old") as (_, conv):
            await until(lambda: state(conv) == fake_state(agent), wake=conv.changed.wait)
        async with aiohttp.ClientSession() as session:
            client = client_for(session, agent.url + "/old")
            assert [m.content for m in await client.messages(65536)] == ["", "through the redirect"]
            with pytest.raises(AgentAPIError, match="redirected more than 3 times"):
                await client_for(session, agent.url + "/loop").status()


async def test_a_body_cut_short_is_unavailable_not_a_crash() -> None:
    """A /messages answer whose connection drops mid-body is "unavailable", the error the
    callers handle, not a raw aiohttp error."""
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"messages":[')
        assert request.transport is not None
        request.transport.abort()
        return resp

    async with serving(web.get("/messages", cut)) as url, aiohttp.ClientSession() as session:
        with pytest.raises(AgentAPIUnavailable, match="cut the body"):
            await client_for(session, url).messages(65536)


async def test_a_vanished_agentapi_is_noticed_at_once_after_a_followed_stream(
    agent: FakeAgentAPI, log_output: io.StringIO,
) -> None:
    """When a stream that was followed for a while ends, the first reconnect is immediate,
    so agentapi stopping is known (state.gone) within a second even with a long back-off;
    the failed connect after it backs off as usual."""
    now = [0.0]
    settings = make_settings(agentapi_url=agent.url, reconnect_initial_s=5, reconnect_max_s=10)
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    async with aiohttp.ClientSession() as session:
        client = AgentAPI(session, settings)
        task = asyncio.create_task(client.follow(conv, clock=lambda: now[0]))
        try:
            await until(lambda: conv.connected, wake=conv.changed.wait)
            now[0] += 2  # the stream has been followed for two seconds
            seen = client.state.gone.version
            await agent.stop()
            async with asyncio.timeout(1):
                await client.state.gone.wait(seen)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    retries = [json.loads(line)["retry_in_s"] for line in log_output.getvalue().splitlines()
               if json.loads(line)["event"] == "agentapi_disconnected"]
    assert retries[0] == 0
    assert retries[1] > 0


async def test_an_unreachable_agentapi_is_named_by_the_os_reason_not_a_repr(
    agent: FakeAgentAPI,
) -> None:
    """agentapi gone: the error says where and why (`Connection refused`), not aiohttp's
    repr with its connection key."""
    settings = make_settings(agentapi_url=agent.url)
    await agent.stop()
    async with aiohttp.ClientSession() as session:
        client = AgentAPI(session, settings)
        with pytest.raises(AgentAPIUnavailable) as err:
            await client.status()
        with pytest.raises(AgentAPIUnavailable) as sent:
            await client.send("hello", "user", timeout_s=1, connect_timeout_s=1)
    for exc in (err.value, sent.value):
        assert f"cannot connect to 127.0.0.1:{agent.port}: Connection refused" in str(exc)
        assert "ConnectionKey" not in str(exc)


async def test_a_vanished_agentapi_is_noticed_when_polling_too() -> None:
    """Without /events, agentapi stopping is noticed at the first poll it does not answer
    after one it did (state.gone), so the upload after it is made in polling mode too."""
    agent = await FakeAgentAPI(events=False).start()
    try:
        async with following(agent.url, poll_interval_s=0.02) as (client, conv):
            await until(lambda: conv.connected, wake=conv.changed.wait)
            seen = client.state.gone.version
            await agent.stop()
            async with asyncio.timeout(5):
                await client.state.gone.wait(seen)
            assert not conv.connected
    finally:
        await agent.stop()
