"""agentapi.send(): "never sent" told from "sent and refused" and from "sent, no answer",
against a real stand-in on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from standins import FakeAgentAPI, drop_after_reading, problem

from agent_sidecar.agentapi import (
    AgentAPI,
    AgentAPIError,
    AgentAPIUnavailable,
    NotStable,
    SendUnconfirmed,
    TypedNotSubmitted,
)

from .conftest import make_settings


@pytest.fixture
async def client(agent: FakeAgentAPI) -> AsyncIterator[AgentAPI]:
    async with aiohttp.ClientSession() as session:
        yield AgentAPI(session, make_settings(agentapi_url=agent.url))


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listen backlog is full: a connect there hangs (SYN dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_refused_connection_is_never_sent() -> None:
    """Connection refused: AgentAPIUnavailable, the request was never written."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        async with aiohttp.ClientSession() as session:
            api = AgentAPI(session, make_settings(agentapi_url=url))
            with pytest.raises(AgentAPIUnavailable, match="unreachable"):
                await api.send("hello", "user")


async def test_a_connect_that_times_out_is_never_sent(unanswered_port: int) -> None:
    """A connect that does not complete within connect_timeout_s is 'never sent', however
    long send_timeout_s is."""
    url = f"http://127.0.0.1:{unanswered_port}"
    async with aiohttp.ClientSession() as session:
        api = AgentAPI(session, make_settings(agentapi_url=url, send_timeout_s=600))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AgentAPIUnavailable, match=r"connecting timed out after 0\.3s"):
            await api.send("hello", "user", connect_timeout_s=0.3)
        assert loop.time() - started < 2


async def test_a_post_without_an_answer_is_unconfirmed_after_timeout_s(
    agent: FakeAgentAPI, client: AgentAPI,
) -> None:
    """Written, then no answer: SendUnconfirmed once timeout_s has passed since the write,
    even with a short connect bound."""
    calls = 0

    async def hang(request: web.Request) -> web.StreamResponse | None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()
        return None

    agent.message_hook = hang
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SendUnconfirmed, match=r"no answer within 0\.4s"):
        await client.send("hello", "user", timeout_s=0.4, connect_timeout_s=0.05)
    assert 0.4 <= loop.time() - started < 1.5
    assert calls == 1


async def test_a_connection_dropped_after_the_write_is_unconfirmed(
    agent: FakeAgentAPI, client: AgentAPI,
) -> None:
    """agentapi reads the request and drops the connection: SendUnconfirmed, not
    'unreachable'."""
    agent.message_hook = drop_after_reading
    with pytest.raises(SendUnconfirmed, match="the connection dropped"):
        await client.send("hello", "user")


@pytest.mark.parametrize(("why", "cls"), [
    ("failed to send message: message can only be sent when the agent is waiting for user "
     "input", NotStable),
    ("failed to send message: failed to wait for screen to stabilize: timeout waiting for "
     "condition", TypedNotSubmitted),
    ("failed to send message: failed to wait for processing to start", AgentAPIError),
])
async def test_refusals_are_classified_by_agentapis_detail(
    agent: FakeAgentAPI, client: AgentAPI, why: str, cls: type[AgentAPIError],
) -> None:
    """A refusal keeps agentapi's detail and says which kind it is."""
    async def refuse(request: web.Request) -> web.StreamResponse | None:
        return problem(request, 500, "Internal Server Error", "unexpected error occurred",
                       [{"message": why}])

    agent.message_hook = refuse
    with pytest.raises(AgentAPIError) as caught:
        await client.send("hello", "user")
    assert type(caught.value) is cls
    assert caught.value.detail == f"unexpected error occurred: {why}"


async def test_each_send_uses_a_fresh_connection(agent: FakeAgentAPI, client: AgentAPI) -> None:
    """Two sends arrive on two connections: a POST never rides a kept-alive connection that
    agentapi may have closed meanwhile."""
    peers: list[object] = []

    async def note(request: web.Request) -> web.StreamResponse | None:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return None

    agent.message_hook = note
    await client.send("\x1b", "raw")
    await client.send("\x1b", "raw")
    assert len(peers) == 2
    assert peers[0] != peers[1]
