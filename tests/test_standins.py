"""The agentapi stand-in's version modes say what field-notes.md says each version says."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from standins import STABILIZE_FAILURE, FakeAgentAPI

from .conftest import until


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def first_events(session: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    """The first `count` events of /events, as `type data` strings."""
    out: list[str] = []
    async with session.get(url + "/events") as resp:
        kind = ""
        async for line in resp.content:
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                out.append(f"{kind} {text[6:]}")
                if len(out) == count:
                    return out
    return out


@pytest.mark.parametrize(("version", "status"), [
    ("v0.10", {"status": "stable"}),
    ("v0.11", {"status": "stable", "agent_type": "custom"}),
    ("v0.12-pty", {"status": "stable", "agent_type": "custom", "transport": "pty"}),
    ("v0.12-acp", {"status": "stable", "agent_type": "custom", "transport": "acp"}),
])
async def test_status_shape_by_version(version: Any, status: dict[str, str]) -> None:
    """/status carries `status` only in v0.10, adds agent_type in v0.11, transport in v0.12."""
    async with FakeAgentAPI(version=version) as agent, aiohttp.ClientSession() as session:
        body = await get(session, agent.url + "/status")
    body.pop("$schema")
    assert body == status


async def test_v010_streams_status_only_and_no_agent_error() -> None:
    """v0.10's status_change has no agent_type and its replay has no agent_error."""
    async with FakeAgentAPI(version="v0.10") as agent, aiohttp.ClientSession() as session:
        agent.errors.append({"message": "x", "level": "warning", "time": "t"})
        events = await first_events(session, agent.url, 2)
    assert events[1] == 'status_change {"status":"stable"}'


async def test_acp_has_no_greeting_and_a_user_post_holds_status_for_the_turn() -> None:
    """ACP: the first message is the user's (id 0), and /status waits for the turn to end."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=4, chunk_delay_s=0.05)
    async with agent, aiohttp.ClientSession() as session:
        assert (await get(session, agent.url + "/messages"))["messages"] == []
        post = asyncio.create_task(session.post(agent.url + "/message",
                                                json={"content": "hi", "type": "user"}))
        await until(lambda: agent.status == "running")
        # Asked while the turn runs, /status answers only once it has ended.
        assert (await get(session, agent.url + "/status"))["status"] == "stable"
        resp = await post
        assert resp.status == 200
        messages = (await get(session, agent.url + "/messages"))["messages"]
    assert [(m["id"], m["role"]) for m in messages] == [(0, "user"), (1, "agent")]


async def test_acp_failed_prompt_leaves_an_id_gap_without_an_event() -> None:
    """ACP: a failed prompt's placeholder is removed silently and its id is not reused."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=1, chunk_delay_s=0)
    async with agent, aiohttp.ClientSession() as session:
        agent.fail_next_prompt = True
        async with session.post(agent.url + "/message",
                                json={"content": "a", "type": "user"}) as resp:
            assert resp.status == 500
        async with session.post(agent.url + "/message",
                                json={"content": "b", "type": "user"}) as resp:
            assert resp.status == 200
        messages = (await get(session, agent.url + "/messages"))["messages"]
    assert [m["id"] for m in messages] == [0, 2, 3]


async def test_phase1_failure_types_the_text_and_fails_without_submitting() -> None:
    """With stabilize_timeout_s set, the text is typed, nothing is recorded, and the POST
    fails with agentapi's 'failed to wait for screen to stabilize'."""
    agent = FakeAgentAPI(version="v0.10")
    agent.stabilize_timeout_s = 0.05
    async with agent, aiohttp.ClientSession() as session, session.post(agent.url + "/message",
                            json={"content": " run it ", "type": "user"}) as resp:
        assert resp.status == 500
        body = json.loads(await resp.text())
    assert body["errors"][0]["message"] == STABILIZE_FAILURE
    assert agent.typed == ["run it"]
    assert [m.role for m in agent.messages] == ["agent"]
