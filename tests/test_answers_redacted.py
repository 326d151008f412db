"""Secrets never reach what the relay answers (/status, /healthz, /livez, /send's errors),
nor what `check`, `status` and `send` print from it: the relay scrubs every answer as the
logs are scrubbed, whichever field a peer's text lands in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd

from agent_sidecar import logs
from agent_sidecar.agentapi import AgentAPI
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import Metrics
from agent_sidecar.redact import Redactor
from agent_sidecar.relay import Health, Relay

from .conftest import make_settings
from .sidecar import Sidecar, clean_env
from .test_client import cli_run

TOKEN = "5b0e7a3c-1f2d-4e6a-9b8c-7d6e5f4a3b2c"
PASSWORD = "S3cr3tPassw0rd"


@pytest.fixture(autouse=True)
def _fresh_redactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own secrets."""
    monkeypatch.setattr(logs, "redactor", Redactor())


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def _get(path: Path, target: str, method: str = "GET",
               body: Any = None) -> tuple[int, str]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.request(method, f"http://sidecar{target}", json=body) as resp:
        return resp.status, await resp.text()


# -- the relay, whatever a field holds --------------------------------------------------------


@contextlib.asynccontextmanager
async def leaky_relay(agent: FakeAgentAPI, short_dir: Path,
                      leak: str) -> AsyncIterator[Path]:
    """A relay whose status, health and liveness reasons all carry `leak`, unscrubbed."""
    settings = make_settings(agentapi_url=agent.url)
    async with aiohttp.ClientSession() as http:
        relay = Relay(
            AgentAPI(http, settings), Conversation(1000), Metrics(), settings,
            status=lambda: {"new_field": {"nested": [f"saw {leak}"]}, f"key {leak}": 1},
            health=lambda: Health([f"critical: {leak}"], [f"degraded: {leak}"]),
            live=lambda: [f"follower: {leak}"])
        path = short_dir / "relay.sock"
        await relay.start(path)
        try:
            yield path
        finally:
            await relay.stop()


@pytest.mark.parametrize("leak", [
    TOKEN, f"{TOKEN[:20]}...", json.dumps({"token": TOKEN}), f"http://u:{PASSWORD}@h/",
    PASSWORD,
])
async def test_every_json_answer_is_scrubbed_whatever_field_holds_the_secret(
    agent: FakeAgentAPI, short_dir: Path, leak: str,
) -> None:
    """A token, a cut piece of it, a JSON-escaped one, URL userinfo or a registered password
    in any field of /status, /healthz or /livez (keys too) is masked in the answer, which
    stays valid JSON."""
    logs.redactor.add(TOKEN)
    logs.redactor.add_url(f"http://u:{PASSWORD}@agentapi/")
    async with leaky_relay(agent, short_dir, leak) as path:
        for target in ("/status", "/healthz", "/livez"):
            status, text = await _get(path, target)
            assert status in (200, 503), text
            assert TOKEN[:8] not in text, (target, text)
            assert TOKEN[-8:] not in text, (target, text)
            assert PASSWORD not in text, (target, text)
            assert logs.REDACTED in json.dumps(json.loads(text)), (target, text)


# -- the real daemon ----------------------------------------------------------------------


async def _outputs(sidecar: Sidecar, env: dict[str, str]) -> dict[str, str]:
    """What the relay answers and what the light commands print, by name."""
    socket_path = Path(env["AGENT_SIDECAR_SOCKET"])
    seen: dict[str, str] = {}
    for target in ("/status", "/healthz", "/livez"):
        seen[target] = repr(await _get(socket_path, target))
    seen["/send"] = repr(await _get(socket_path, "/send", "POST",
                                    {"input": "hello", "wait_s": 0.5}))
    for args in (("check",), ("status",), ("status", "--json"), ("send", "--wait", "0.5", "x")):
        run = await cli_run(*args, env=env)
        seen[" ".join(args)] = run.out + run.err
    seen["log"] = "\n".join(sidecar.raw)
    return seen


def _leaks(seen: dict[str, str], *pieces: str) -> list[str]:
    return [f"{name}: {piece}" for name, text in seen.items() for piece in pieces
            if piece in text]


async def test_a_url_password_reaches_no_answer_and_no_command(
    closed_port: int, short_dir: Path,
) -> None:
    """agentapi_url with a password, agentapi down: /status, /healthz, the 503 of /send,
    `check`, `status` and `send` name agentapi's address without the password."""
    url = f"http://agent:{PASSWORD}@127.0.0.1:{closed_port}"
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"),
                    AGENT_SIDECAR_RECONNECT_INITIAL_S="0.05")
    async with Sidecar("--agentapi-url", url, env=env) as sidecar:
        await sidecar.wait_log("agentapi_disconnected")
        seen = await _outputs(sidecar, env)
        assert await sidecar.stop() == 0
    assert _leaks(seen, PASSWORD) == []
    assert f"127.0.0.1:{closed_port}" in seen["/send"]  # the error still says where
    assert "unreachable" in seen["check"]


@pytest.fixture
async def user_turn() -> AsyncIterator[FakeAgentAPI]:
    """An agent whose conversation has a user message, so the sidecar uploads at once."""
    async with FakeAgentAPI() as agent:
        agent.add_message("user", "hello")
        agent.add_message("agent", "hi")
        yield agent


def _coder_env(coderd: FakeCoderd, short_dir: Path, token: str) -> dict[str, str]:
    return clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"), CODER_AGENT_URL=coderd.url,
                     CODER_AGENT_TOKEN=token, AGENT_SIDECAR_TASK_ID=str(coderd.add_task()),
                     AGENT_SIDECAR_SETTLE_S="0")


async def test_a_token_echoed_by_a_front_reaches_no_answer_and_no_command(
    user_turn: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A front that echoes the token in a short plain-text 401 ("invalid session token
    <token>"): the token is masked in /status, /healthz, `check` and `status --json`."""
    async def echo(request: web.Request) -> web.StreamResponse:
        sent = request.headers.get("Coder-Session-Token", "")
        return web.Response(status=401, text=f"invalid session token {sent}\n")
    coderd.hook = echo
    env = _coder_env(coderd, short_dir, coderd.token)
    async with Sidecar("--agentapi-url", user_turn.url, env=env) as sidecar:
        await sidecar.wait_log("upload_token_rejected")
        seen = await _outputs(sidecar, env)
        assert await sidecar.stop() == 0
    token = coderd.token
    assert _leaks(seen, token, token[:8], token[-8:]) == []
    assert "invalid session token **********" in seen["/status"]
    assert "invalid session token **********" in seen["check"]


async def test_a_huge_token_quoted_by_a_front_reaches_no_answer_and_no_command(
    user_turn: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A 100 000-character token that an aiohttp front refuses by quoting its first 100
    bytes ("Got more than 8190 bytes when reading: b'...'"): no piece of it is shown."""
    token = secrets.token_hex(50_000)
    env = _coder_env(coderd, short_dir, token)
    async with Sidecar("--agentapi-url", user_turn.url, env=env) as sidecar:
        await sidecar.wait_log("upload_payload_rejected")
        seen = await _outputs(sidecar, env)
        assert await sidecar.stop() == 0
    assert _leaks(seen, token[:8], token[8:16], token[90:98]) == []
    assert "Got more than 8190 bytes when reading" in seen["/status"]


async def test_a_delivered_reply_is_the_agents_words_as_they_are(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """The agent's own messages in a /send reply are not scrubbed: they are the
    conversation, as the snapshot carries it."""
    logs.redactor.add(TOKEN)
    settings = make_settings(agentapi_url=agent.url)
    async with aiohttp.ClientSession() as http:
        conversation = Conversation(1000)
        client = AgentAPI(http, settings)
        follower = asyncio.create_task(client.follow(conversation))
        relay = Relay(client, conversation, Metrics(), settings)
        path = short_dir / "relay.sock"
        await relay.start(path)
        try:
            status, text = await _get(path, "/send", "POST",
                                      {"input": f"echo {TOKEN}", "reply": True, "wait_s": 5})
        finally:
            await relay.stop()
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    assert status == 200, text
    assert TOKEN in text


# -- where the texts are made ---------------------------------------------------------------


async def test_agentapi_names_itself_without_its_password(closed_port: int) -> None:
    """AgentAPI.url, and the errors that name agentapi, carry no userinfo; requests still
    would."""
    from agent_sidecar.agentapi import AgentAPIUnavailable

    settings = make_settings(agentapi_url=f"http://agent:{PASSWORD}@127.0.0.1:{closed_port}/")
    async with aiohttp.ClientSession() as http:
        client = AgentAPI(http, settings)
        assert client.url == f"http://127.0.0.1:{closed_port}/"
        with pytest.raises(AgentAPIUnavailable) as err:
            await client.status_info()
        with pytest.raises(AgentAPIUnavailable) as sent:
            await client.send("x", "user")
    assert PASSWORD not in str(err.value)
    assert PASSWORD not in str(sent.value)
    assert f"127.0.0.1:{closed_port}" in str(sent.value)


def test_a_front_s_short_first_line_is_redacted() -> None:
    """A short plain-text answer that quotes the token is masked where it is read, as the
    long ones always were: in the outcome that /status, /healthz and the log show."""
    from agent_sidecar.coder import Outcome, Result, first_line

    logs.redactor.add(TOKEN)
    line = first_line(f"invalid session token {TOKEN}\n".encode(), "text/plain")
    assert line == f"invalid session token {logs.REDACTED}"
    outcome = Outcome(Result.TOKEN_REJECTED, 401, message=f"token {TOKEN}", detail=TOKEN[:9],
                      content_type="text/plain")
    assert TOKEN[:8] not in outcome.describe()


def test_a_huge_token_is_scrubbed_quickly() -> None:
    """With a 100 000-character token registered, a line quoting 100 characters of it is
    scrubbed in about a millisecond, not in time that grows with the token's length (one
    repeated character is the worst case: every position starts a piece of it)."""
    token = "a" * 100_000
    redactor = Redactor()
    redactor.add(token)
    line = f"Got more than 8190 bytes when reading: b'{token[:100]}...'"
    started = time.perf_counter()
    for _ in range(20):
        assert token[:8] not in redactor.scrub(line)
    assert time.perf_counter() - started < 1.0  # 20 scrubs; before, each took ~0.2 s
