"""Following agentapi over real loopback sockets: replay, live updates, reconnects, restarts."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from standins import FakeAgentAPI, sse_event

from agent_sidecar.agentapi import AgentAPI, AgentAPIError, AgentAPIUnavailable, NotStable
from agent_sidecar.conversation import Conversation
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES

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
    assert line["error"] == ("AgentAPIError: GET /events answered 400: Invalid host header. "
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
