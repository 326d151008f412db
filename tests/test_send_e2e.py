"""`agent-sidecar send` end to end: the real command against the real relay and a stand-in
agentapi, for each outcome the exit codes tell apart (issue 11)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standins import FakeAgentAPI, hanging

from .sidecar import clean_env
from .test_client import cli_run
from .test_daemon import serving, settings_for

REPLY = "Here is the plan.\n\n1. Read the code.\n2. Fix the bug."


def env_for(settings: Any) -> dict[str, str]:
    return clean_env(AGENT_SIDECAR_SOCKET=str(settings.socket))


@pytest.fixture
async def agent() -> Any:
    async with FakeAgentAPI(reply=lambda prompt: REPLY, chunks=3, chunk_delay_s=0.01,
                            stable_after_s=0.05) as fake:
        yield fake


async def test_send_reply_prints_exactly_the_agents_answer(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """`send --reply` waits for the turn and prints the agent's reply, as text."""
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        run = await cli_run("send", "--reply", "make a plan", env=env_for(settings))
    assert (run.code, run.err) == (0, "")
    assert run.out == REPLY + "\n"
    assert agent.received == [("user", "make a plan")]


async def test_send_reply_json_is_the_relays_messages(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """`send --reply --json` prints {"messages": [...]} holding just the agent's new message."""
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        run = await cli_run("send", "--reply", "--json", "make a plan",
                            env=env_for(settings))
    assert run.code == 0, run.err
    messages = json.loads(run.out)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("agent", REPLY)]
    assert messages[0]["id"] == agent.messages[-1].id


async def test_a_post_that_never_answers_exits_4_once(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """agentapi takes the POST and never answers: exit 4 ("outcome unknown") within the
    send's own bound, and the input was posted exactly once."""
    entered = asyncio.Event()
    posts = 0
    hang = hanging(entered)

    async def counted(request: web.Request) -> web.StreamResponse | None:
        nonlocal posts
        posts += 1
        return await hang(request)

    agent.message_hook = counted
    settings = settings_for(agent, None, short_dir, send_timeout_s=0.5)
    async with serving(settings):
        run = await cli_run("send", "hello", env=env_for(settings))
    assert run.code == 4, run.err
    assert "check the agent before resending" in run.err
    assert posts == 1


async def test_agentapi_down_exits_5_and_nothing_is_sent(short_dir: Path) -> None:
    """With agentapi gone, a raw send is refused before anything is written: exit 5."""
    agent = await FakeAgentAPI().start()
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        await agent.stop()
        run = await cli_run("send", "--raw", "\x1b", "--wait", "1", env=env_for(settings))
    assert run.code == 5, run.err
    assert agent.received == []


async def test_a_busy_agent_exits_3_and_nothing_is_sent(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """The agent stays busy past --wait: exit 3, and nothing reached agentapi."""
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        agent.set_status("running")
        run = await cli_run("send", "--wait", "0.2", "hello", env=env_for(settings))
    assert run.code == 3, run.err
    assert agent.received == []


async def test_typed_but_not_submitted_exits_1_and_says_so(short_dir: Path) -> None:
    """agentapi's phase 1 failure (v0.10): exit 1, saying the text was typed but not
    submitted, and it was typed exactly once."""
    async with FakeAgentAPI(version="v0.10") as agent:
        agent.stabilize_timeout_s = 0.05
        settings = settings_for(agent, None, short_dir)
        async with serving(settings):
            run = await cli_run("send", "hello", env=env_for(settings))
    assert run.code == 1, run.err
    assert "typed" in run.err
    assert agent.typed == ["hello"]


async def test_timeout_with_a_busy_agent_exits_3_not_4(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """`send --timeout` against an agent that stays busy gets the relay's "busy" answer
    within the timeout: exit 3 (nothing sent), not exit 4 (outcome unknown)."""
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        agent.set_status("running")
        run = await cli_run("send", "--timeout", "1", "hello", env=env_for(settings))
    assert run.code == 3, run.err
    assert agent.received == []
