"""Follow and pack against every agentapi version in the field (field-notes.md §3, §4):
v0.10 (`status` only), v0.11 (`agent_type`), v0.12 PTY and v0.12 ACP."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from standins import VERSIONS, FakeAgentAPI, Version

from agent_sidecar.agentapi import AgentAPI
from agent_sidecar.conversation import Conversation
from agent_sidecar.pipeline import Pipeline
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack

from .conftest import make_settings, until

# What /status says of the version, as (transport, agent_type).
SAYS: dict[str, tuple[str | None, str | None]] = {
    "v0.10": (None, None),
    "v0.11": (None, "custom"),
    "v0.12-pty": ("pty", "custom"),
    "v0.12-acp": ("acp", "custom"),
}


@dataclass
class Followed:
    client: AgentAPI
    conv: Conversation
    gets: list[str] = field(default_factory=list)  # paths of every GET, in order
    connected: list[bool] = field(default_factory=list)  # `connected` after every change


@asynccontextmanager
async def following(agent: FakeAgentAPI, **kw: Any) -> AsyncIterator[Followed]:
    """The follower against `agent`, with every GET it makes and every `connected` value
    it shows recorded."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    settings = make_settings(**{"agentapi_url": agent.url, "poll_interval_s": 0.02, **kw})
    gets: list[str] = []

    async def on_start(_: object, __: SimpleNamespace,
                       params: aiohttp.TraceRequestStartParams) -> None:
        gets.append(params.url.path)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        seen = Followed(AgentAPI(session, settings), conv, gets)

        async def watch() -> None:
            while True:
                await conv.wait_changed(conv.version)
                seen.connected.append(conv.connected)

        tasks = [asyncio.create_task(seen.client.follow(conv)), asyncio.create_task(watch())]
        try:
            yield seen
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def ids(conv: Conversation) -> list[int]:
    return [m.id for m in conv.messages()]


async def send(agent: FakeAgentAPI, text: str) -> int:
    """POST /message as a user would; the status agentapi answered."""
    async with aiohttp.ClientSession() as session, session.post(
            agent.url + "/message", json={"content": text, "type": "user"}) as resp:
        return resp.status


async def in_step(seen: Followed, agent: FakeAgentAPI) -> None:
    """Until the follower holds exactly the stand-in's conversation, stable."""
    def same() -> bool:
        return (seen.conv.connected and seen.conv.status == "stable"
                and pack(seen.conv.messages(), CODERD_MAX_BODY_BYTES).body == agent.packed())

    await until(same, wake=seen.conv.changed.wait)


@pytest.mark.parametrize("version", VERSIONS)
async def test_follow_and_pack_a_whole_turn(version: Version) -> None:
    """Each version is followed through a user turn and packs to exactly its conversation;
    the follower keeps what /status says of the transport and the agent type (None where
    the version does not say)."""
    agent = FakeAgentAPI(version=version, chunks=3, chunk_delay_s=0.01, stable_after_s=0.05)
    async with agent, following(agent) as seen:
        await until(lambda: seen.conv.connected, wake=seen.conv.changed.wait)
        assert await send(agent, "list the files") == 200
        await agent.wait_idle()
        await in_step(seen, agent)
        await until(lambda: "/status" in seen.gets, wake=seen.conv.changed.wait)
        await until(lambda: (seen.client.state.transport,
                             seen.client.state.agent_type) == SAYS[version])
    roles = [m.role for m in seen.conv.messages()]
    assert roles == (["user", "agent"] if version == "v0.12-acp" else ["agent", "user", "agent"])


@pytest.mark.parametrize("version", VERSIONS)
async def test_status_shows_the_transport_and_agent_type(version: Version) -> None:
    """The sidecar's /status carries agentapi.transport and agentapi.agent_type, null when
    the version does not say."""
    async with FakeAgentAPI(version=version) as agent, \
            Pipeline(make_settings(agentapi_url=agent.url)) as pipeline:
        follow = asyncio.create_task(pipeline.agentapi.follow(pipeline.conversation))
        try:
            transport, agent_type = SAYS[version]
            status = pipeline.status
            await until(lambda: pipeline.conversation.connected
                        and status()["agentapi"]["transport"] == transport
                        and status()["agentapi"]["agent_type"] == agent_type)
            shown = json.loads(json.dumps(status()))["agentapi"]
            assert (shown["transport"], shown["agent_type"]) == (transport, agent_type)
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)


async def test_acp_first_message_is_the_users_and_is_uploadable_at_once() -> None:
    """Under ACP there is no greeting: the first message is the user's, id 0, so the very
    first snapshot already holds a user message and starts with it."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=2, chunk_delay_s=0.01)
    async with agent, following(agent) as seen:
        await until(lambda: seen.conv.connected, wake=seen.conv.changed.wait)
        assert seen.conv.messages() == []
        assert not seen.conv.has_user
        assert await send(agent, "hello") == 200
        await in_step(seen, agent)
    body = json.loads(pack(seen.conv.messages(), CODERD_MAX_BODY_BYTES).body)
    assert [(m["id"], m["role"]) for m in body["messages"]] == [(0, "user"), (1, "agent")]
    assert seen.conv.has_user


async def test_acp_failed_prompt_gap_is_reconciled_when_the_turn_ends(
    log_output: io.StringIO,
) -> None:
    """ACP removes a failed prompt's placeholder with no event; the follower notices at the
    status_change that ends the turn (it reads /messages once) and drops it, so the
    snapshot never shows an empty reply agentapi no longer has."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=2, chunk_delay_s=0.01)
    async with agent, following(agent) as seen:
        await until(lambda: seen.client.state.transport == "acp")
        agent.fail_next_prompt = True
        assert await send(agent, "this one fails") == 500
        await until(lambda: ids(seen.conv) == [0], wake=seen.conv.changed.wait)
        assert await send(agent, "this one works") == 200
        await in_step(seen, agent)
        assert ids(seen.conv) == [0, 2, 3] == [m.id for m in agent.messages]
        assert seen.client.state.reconnects == 0  # no replay did it
    removed = [json.loads(x) for x in log_output.getvalue().splitlines()
               if "agentapi_messages_removed" in x]
    assert removed[0]["ids"] == [1]


async def test_acp_polling_waits_out_a_turn_without_disconnecting_or_spinning(
    log_output: io.StringIO,
) -> None:
    """Polling an ACP agentapi (no /events) while a turn holds /status and /messages for
    ten times agentapi_timeout_s: the follower stays connected with the last state, asks
    at most twice per path meanwhile, and catches up when the turn ends."""
    agent = FakeAgentAPI(version="v0.12-acp", events=False, chunks=10, chunk_delay_s=0.1)
    async with agent, following(agent, agentapi_timeout_s=0.1) as seen:
        await until(lambda: seen.conv.connected and seen.client.state.transport == "acp",
                    wake=seen.conv.changed.wait)
        before = len(seen.gets)
        turn = asyncio.create_task(send(agent, "a long turn"))
        await until(lambda: agent.status == "running")
        assert await turn == 200
        during = seen.gets[before:]
        await in_step(seen, agent)
    assert all(seen.connected)
    assert during.count("/status") <= 2
    assert during.count("/messages") <= 2
    assert "agentapi_poll_failed" not in log_output.getvalue()


async def test_polling_a_turn_already_running_waits_without_disconnecting(
    log_output: io.StringIO,
) -> None:
    """When polling starts in the middle of an ACP turn, before the transport is known,
    each /status that is not answered within agentapi_timeout_s is "busy": logged once,
    asked again, never a failure; the gap of a failed prompt is gone at the next poll."""
    agent = FakeAgentAPI(version="v0.12-acp", events=False, chunks=5, chunk_delay_s=0.1)
    async with agent:
        agent.fail_next_prompt = True
        failed = await send(agent, "fails")
        turn = asyncio.create_task(send(agent, "a long turn"))
        await until(lambda: agent.status == "running")
        async with following(agent, agentapi_timeout_s=0.1) as seen:
            assert await turn == 200
            await in_step(seen, agent)
            assert seen.client.state.transport == "acp"
            assert ids(seen.conv) == [0, 2, 3]
    assert failed == 500
    assert seen.connected == sorted(seen.connected)  # never True, then False
    assert seen.connected[-1]
    lines = [json.loads(x) for x in log_output.getvalue().splitlines()]
    assert [x["event"] for x in lines].count("agentapi_busy") == 1
    assert not [x for x in lines if x["event"] == "agentapi_poll_failed"]
    # One /status per agentapi_timeout_s at most while the 0.5 s turn ran.
    assert seen.gets.count("/status") <= 0.5 / 0.1 + 4


async def test_a_bug_in_the_status_probe_is_logged_and_following_goes_on(
    monkeypatch: pytest.MonkeyPatch, log_output: io.StringIO,
) -> None:
    """An unexpected exception in the /status probe beside the stream is logged once and
    ends only the probe: the stream is followed as before."""
    async def broken(self: AgentAPI) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(AgentAPI, "status_info", broken)
    agent = FakeAgentAPI(chunks=2, chunk_delay_s=0.01, stable_after_s=0.01)
    async with agent, following(agent) as seen:
        await until(lambda: "agentapi_side_task_failed" in log_output.getvalue())
        assert await send(agent, "still followed") == 200
        await agent.wait_idle()
        await in_step(seen, agent)
        assert seen.client.state.reconnects == 0
