"""The relay socket: POST /send semantics, status codes, security, draining, and the clients."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standins import VERSIONS, FakeAgentAPI, FakeMessage, Version, drop_after_reading, problem

from agent_sidecar.agentapi import AgentAPI
from agent_sidecar.conversation import Conversation, Message
from agent_sidecar.metrics import Metrics
from agent_sidecar.relay import (
    ANSWER_MARGIN_S,
    Health,
    Relay,
    RelayError,
    bind_unix,
    reply_to,
)
from agent_sidecar.simulator import echo_reply
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES

from .conftest import make_settings, until
from .sidecar import clean_env


@dataclass
class Env:
    agent: FakeAgentAPI
    conv: Conversation
    relay: Relay
    socket: Path
    http: aiohttp.ClientSession

    async def send(self, body: Any, *, raw: bytes | io.BytesIO | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.http.post("http://sidecar/send", headers=headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def get(self, path: str, method: str = "GET") -> tuple[int, Any]:
        async with self.http.request(method, f"http://sidecar{path}") as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def synced(self) -> None:
        """Until the follower mirrors the stand-in's status."""
        await until(lambda: self.conv.connected and self.conv.status == self.agent.status,
                    wake=self.conv.changed.wait)

    def users(self) -> list[str]:
        return [text for kind, text in self.agent.received if kind == "user"]


@contextlib.asynccontextmanager
async def relay_env(agent: FakeAgentAPI, short_dir: Path, **overrides: Any) -> AsyncIterator[Env]:
    """A relay on a real Unix socket in front of `agent`, followed by a real follower."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    settings = make_settings(**{"agentapi_url": agent.url, "send_wait_s": 5, **overrides})
    async with aiohttp.ClientSession() as agent_http:
        client = AgentAPI(agent_http, settings)
        follower = asyncio.create_task(client.follow(conv))
        relay = Relay(client, conv, Metrics(), settings,
                      health=lambda: Health([] if conv.connected else ["agentapi: not connected"]))
        path = short_dir / "run" / "relay.sock"
        await relay.start(path)
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as http:
            environment = Env(agent, conv, relay, path, http)
            try:
                await environment.synced()
                yield environment
            finally:
                await relay.stop()
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)


@pytest.fixture
async def env(agent: FakeAgentAPI, short_dir: Path) -> AsyncIterator[Env]:
    async with relay_env(agent, short_dir) as environment:
        yield environment


async def test_user_input_waits_for_stable_then_is_delivered(env: Env) -> None:
    """While the agent runs, a send waits; once stable it is delivered exactly once."""
    env.agent.set_status("running")
    await env.synced()
    send = asyncio.create_task(env.send({"input": "  hello \n"}))
    await until(lambda: env.relay.busy)
    assert not send.done()
    assert env.users() == []
    env.agent.set_status("stable")
    assert await send == (204, None)
    assert env.users() == ["hello"]  # stripped, as agentapi requires


async def test_raw_input_bypasses_the_wait_and_is_not_stripped(env: Env) -> None:
    """raw keystrokes go through at once, even while the agent runs, byte for byte."""
    env.agent.set_status("running")
    await env.synced()
    assert await env.send({"input": " \x1b", "type": "raw"}) == (204, None)
    assert env.agent.received == [("raw", " \x1b")]


async def test_concurrent_senders_are_delivered_in_arrival_order(env: Env) -> None:
    """Requests are served one at a time, first come first served."""
    env.agent.set_status("running")
    await env.synced()
    first = asyncio.create_task(env.send({"input": "first"}))
    await until(lambda: env.relay.busy)
    second = asyncio.create_task(env.send({"input": "second"}))
    await until(lambda: env.relay.waiting == 1)
    env.agent.set_status("stable")
    assert (await first)[0] == 204
    # The simulated agent works on "first"; "second" waits for the next stable.
    await env.agent.wait_idle()
    assert (await second)[0] == 204
    assert env.users() == ["first", "second"]


async def test_a_sender_that_hangs_up_is_never_delivered(env: Env) -> None:
    """An input whose client disconnected while waiting is dropped, not sent later."""
    env.agent.set_status("running")
    await env.synced()
    gone = asyncio.create_task(env.send({"input": "too late"}))
    await until(lambda: env.relay.busy)
    gone.cancel()  # the client hangs up
    await asyncio.gather(gone, return_exceptions=True)
    await until(lambda: not env.relay.busy)
    env.agent.set_status("stable")
    assert (await env.send({"input": "on time"}))[0] == 204
    assert env.users() == ["on time"]


async def test_agentapi_not_stable_race_is_waited_out(env: Env) -> None:
    """If agentapi answers 'not stable' although our view said stable, the send waits again."""
    refused = asyncio.Event()

    async def observe(request: web.Request) -> web.StreamResponse | None:
        if env.agent.status != "stable":
            refused.set()  # this POST is about to get agentapi's 500
        return None

    env.agent.message_hook = observe
    env.agent.status = "running"  # agentapi knows; the SSE event has not been sent yet
    send = asyncio.create_task(env.send({"input": "racy"}))
    async with asyncio.timeout(5):
        await refused.wait()
    assert not send.done()
    env.agent.status = "stable"
    env.agent.set_status("running")
    env.agent.set_status("stable")
    assert (await send)[0] == 204
    assert env.users() == ["racy"]


async def test_busy_past_wait_s_is_409(env: Env) -> None:
    """An agent still busy when wait_s runs out gets 409 and nothing is sent."""
    env.agent.set_status("running")
    await env.synced()
    status, body = await env.send({"input": "hello", "wait_s": 0.2})
    assert status == 409
    assert body["message"] == "The agent is still busy."
    assert "0.2s" in body["detail"]
    assert env.users() == []


async def test_agentapi_rejection_is_502_with_its_detail(env: Env) -> None:
    """When agentapi refuses the input the relay answers 502 and passes its detail on."""
    async def reject(request: web.Request) -> web.StreamResponse | None:
        return problem(request, 422, "Unprocessable Entity", "validation failed",
                       [{"message": "expected string", "location": "body.content"}])

    env.agent.message_hook = reject
    status, body = await env.send({"input": "hello"})
    assert status == 502
    assert body == {"message": "agentapi rejected the input.",
                    "detail": "validation failed: expected string"}


async def test_agentapi_unreachable_is_503(env: Env) -> None:
    """With agentapi gone the relay answers 503 rather than hanging."""
    await env.agent.stop()
    await until(lambda: not env.conv.connected, wake=env.conv.changed.wait)
    status, body = await env.send({"input": "hello", "wait_s": 0.3})
    assert status == 503
    assert body["message"] == "agentapi cannot be reached."


@pytest.mark.parametrize(("body", "raw", "message"), [
    (None, b"{not json", "The request body is not valid JSON."),
    (None, b"[1]", "The request body must be a JSON object."),
    ({"input": "x", "extra": 1}, None, "Unknown field 'extra'."),
    ({}, None, "Field 'input' is required and must be a string."),
    ({"input": 5}, None, "Field 'input' is required and must be a string."),
    ({"input": " \n\t "}, None, "Field 'input' must not be empty."),
    ({"input": ""}, None, "Field 'input' must not be empty."),
    ({"input": "x", "type": "system"}, None, "Field 'type' must be \"user\" or \"raw\"."),
    ({"input": "x", "wait_s": -1}, None, "Field 'wait_s' must be a number from 0 to 3600."),
    ({"input": "x", "wait_s": 3601}, None, "Field 'wait_s' must be a number from 0 to 3600."),
    ({"input": "x", "wait_s": True}, None, "Field 'wait_s' must be a number from 0 to 3600."),
    ({"input": "x", "wait_s": "5"}, None, "Field 'wait_s' must be a number from 0 to 3600."),
])
async def test_bad_requests_are_400_in_coders_error_shape(
    env: Env, body: Any, raw: bytes | None, message: str,
) -> None:
    """Each malformed request gets 400 with a message a person can act on."""
    status, answer = await env.send(body, raw=raw)
    assert status == 400
    assert set(answer) == {"message", "detail"}
    assert answer["message"] == message
    assert env.agent.received == []


async def test_a_body_over_one_mebibyte_is_413(env: Env) -> None:
    """A body over 1 MiB is refused with 413 in the same error shape, and the relay serves on."""
    status, body = await env.send(None, raw=io.BytesIO(b'{"input":"' + b"x" * (1 << 20) + b'"}'))
    assert status == 413
    assert body["message"] == "The request body is over 1048576 bytes."
    assert (await env.send({"input": "small"}))[0] == 204


async def test_unknown_paths_and_methods(env: Env) -> None:
    """Unknown paths get 404 and wrong methods 405, both as JSON errors."""
    status, body = await env.get("/nope")
    assert status == 404
    assert "POST /send" in body["message"]
    status, body = await env.get("/send")
    assert status == 405
    assert body["message"] == "Method not allowed on this endpoint."


async def test_requests_with_an_origin_are_refused(env: Env) -> None:
    """A request carrying Origin (a web page) gets 403."""
    status, body = await env.send({"input": "x"}, headers={"Origin": "http://evil.example"})
    assert status == 403
    assert body["message"] == "Requests from web pages are refused."
    assert env.agent.received == []


async def test_a_foreign_uid_is_refused(env: Env) -> None:
    """A peer whose SO_PEERCRED uid is neither ours nor root gets 403."""
    env.relay._uid_of = lambda request: 4242  # what the kernel would say for another user
    status, body = await env.send({"input": "x"})
    assert status == 403
    assert body["detail"] == "peer uid 4242 is not allowed"


async def test_a_peer_whose_uid_cannot_be_read_is_refused(env: Env) -> None:
    """No SO_PEERCRED answer is no proof of identity: the request gets 403, not a pass."""
    env.relay._uid_of = lambda request: None
    status, body = await env.send({"input": "x"})
    assert status == 403
    assert body["detail"] == "the peer's uid cannot be read"
    assert env.agent.received == []


async def test_peer_credentials_are_read_from_the_socket(env: Env) -> None:
    """On a real Unix socket the peer uid is ours, so our own requests pass."""
    status, body = await env.get("/status")
    assert status == 200
    assert body["relay"]["queue_length"] == 0


def test_socket_and_directory_modes(short_dir: Path) -> None:
    """The socket is 0600 and the directory the relay creates is 0700, whatever the umask."""
    old = os.umask(0)
    try:
        sock = bind_unix(short_dir / "new" / "r.sock")
    finally:
        os.umask(old)
    sock.close()
    assert stat.S_IMODE((short_dir / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((short_dir / "new" / "r.sock").stat().st_mode) == 0o600


def test_a_stale_socket_is_replaced(short_dir: Path) -> None:
    """A socket file nobody listens on is removed and bound afresh."""
    path = short_dir / "r.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    sock = bind_unix(path)
    sock.close()
    assert stat.S_ISSOCK(path.stat().st_mode)


@contextlib.contextmanager
def listening(path: Path) -> Iterator[None]:
    """Another process's live socket at `path`."""
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        yield


def test_a_live_socket_is_never_unlinked(short_dir: Path) -> None:
    """A socket another process serves is left alone, with a clear error."""
    path = short_dir / "r.sock"
    with listening(path):
        with pytest.raises(RelayError, match="another process is serving"):
            bind_unix(path)
        assert path.exists()


def test_a_regular_file_is_never_replaced(short_dir: Path) -> None:
    """A path that holds something other than a socket is refused."""
    path = short_dir / "r.sock"
    path.write_text("precious")
    with pytest.raises(RelayError, match="not a socket"):
        bind_unix(path)
    assert path.read_text() == "precious"


def test_live_socket_makes_run_exit_2(short_dir: Path) -> None:
    """`agent-sidecar run` on a socket in use exits 2 with one clear line."""
    path = short_dir / "r.sock"
    with listening(path):
        proc = subprocess.run(
            [sys.executable, "-m", "agent_sidecar", "run", "--socket", str(path),
             "--agentapi-url", "http://127.0.0.1:9"],
            capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    assert proc.returncode == 2
    assert f"cannot start: another process is serving {path}" in proc.stderr


async def test_shutdown_drains_waiting_senders_with_503(env: Env) -> None:
    """At shutdown a waiting send is answered 503, new sends too, and the socket file goes."""
    env.agent.set_status("running")
    await env.synced()
    waiting = asyncio.create_task(env.send({"input": "pending"}))
    await until(lambda: env.relay.busy)
    env.relay.close()
    status, body = await waiting
    assert status == 503
    assert body["message"] == "The sidecar is shutting down."
    assert (await env.send({"input": "new"}))[0] == 503
    assert (await env.get("/healthz"))[0] == 503
    await env.relay.stop()
    assert not env.socket.exists()
    assert env.users() == []


async def test_healthz_reports_reasons(env: Env) -> None:
    """/healthz is 200 ok while following, and 503 with reasons when agentapi is gone."""
    assert await env.get("/healthz") == (200, {"status": "ok"})
    await env.agent.stop()
    await until(lambda: not env.conv.connected, wake=env.conv.changed.wait)
    assert await env.get("/healthz") == (503, {"status": "unhealthy",
                                               "reasons": ["agentapi: not connected"]})


async def test_livez_asks_only_whether_the_daemon_runs(env: Env) -> None:
    """/livez is 200 alive with agentapi gone (while /healthz is 503) and while shutting down."""
    assert await env.get("/livez") == (200, {"status": "alive"})
    await env.agent.stop()
    await until(lambda: not env.conv.connected, wake=env.conv.changed.wait)
    assert (await env.get("/healthz"))[0] == 503
    assert await env.get("/livez") == (200, {"status": "alive"})
    env.relay.close()
    assert await env.get("/livez") == (200, {"status": "alive"})


async def test_livez_reports_stopped_tasks(env: Env) -> None:
    """When the daemon says one of its tasks stopped, /livez is 503 naming it."""
    env.relay._live = lambda: ["follower: stopped"]
    assert await env.get("/livez") == (503, {"status": "stalled",
                                             "reasons": ["follower: stopped"]})


async def test_healthz_degraded_is_still_200(env: Env) -> None:
    """A degraded part (the sink) is reported with 200, so orchestrators do not restart us."""
    env.relay._health = lambda: Health([], ["sink: /x: Read-only file system"])
    assert await env.get("/healthz") == (200, {"status": "degraded",
                                               "reasons": ["sink: /x: Read-only file system"]})


async def test_metrics_endpoint_counts_relay_requests(env: Env) -> None:
    """/metrics serves the Prometheus text format with per-code relay counts."""
    from prometheus_client.parser import text_string_to_metric_families

    await env.send({"input": "x", "type": "bogus"})
    status, text = await env.get("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.labels["path"], s.labels["code"]): s.value
               for s in families["agent_sidecar_relay_requests"].samples
               if s.name.endswith("_total")}
    assert samples[("/send", "400")] == 1


# -- the CLI clients, against the real daemon ---------------------------------------------


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent_sidecar", *args], input=stdin,
                          capture_output=True, text=True, env=clean_env(), timeout=60,
                          check=False)


async def test_cli_send_waits_then_delivers_exactly_once(env: Env) -> None:
    """`agent-sidecar send hello` while the agent runs waits, then delivers one message."""
    env.agent.set_status("running")
    await env.synced()
    proc = asyncio.create_task(asyncio.to_thread(cli, "send", "--socket", str(env.socket),
                                                 "hello"))
    await until(lambda: env.relay.busy)
    env.agent.set_status("stable")
    done = await proc
    assert done.returncode == 0, done.stderr
    assert env.users() == ["hello"]


async def test_cli_send_reads_stdin_and_reports_errors(env: Env) -> None:
    """TEXT '-' reads stdin; a busy agent exits 3 with the server's message on stderr."""
    ok = await asyncio.to_thread(cli, "send", "--socket", str(env.socket), "-",
                                 stdin="from stdin\n")
    assert ok.returncode == 0, ok.stderr
    assert env.users() == ["from stdin"]
    await env.agent.wait_idle()  # the simulated agent's reply to it has finished
    env.agent.set_status("running")
    await env.synced()
    busy = await asyncio.to_thread(cli, "send", "--socket", str(env.socket), "--wait", "0.1",
                                   "x")
    assert busy.returncode == 3
    assert busy.stderr.startswith("agent-sidecar: The agent is still busy.")


def test_cli_clients_without_a_daemon(short_dir: Path) -> None:
    """With no daemon, send exits 5 and status 1, with a hint; check prints 'unhealthy'."""
    path = str(short_dir / "none.sock")
    send = cli("send", "--socket", path, "x")
    assert send.returncode == 5
    assert "is `agent-sidecar run` running" in send.stderr
    check = cli("check", "--socket", path)
    assert check.returncode == 1
    assert check.stdout.startswith("unhealthy: cannot reach the sidecar")
    assert cli("status", "--socket", path).returncode == 1


async def test_cli_status_and_check(env: Env) -> None:
    """status prints a summary or JSON; check prints one line and exits 0 when healthy."""
    text = await asyncio.to_thread(cli, "status", "--socket", str(env.socket))
    assert text.returncode == 0
    assert "relay" in text.stdout
    raw = await asyncio.to_thread(cli, "status", "--json", "--socket", str(env.socket))
    assert json.loads(raw.stdout)["relay"]["queue_length"] == 0
    check = await asyncio.to_thread(cli, "check", "--socket", str(env.socket))
    assert (check.returncode, check.stdout) == (0, "healthy\n")
    await env.agent.stop()
    await until(lambda: not env.conv.connected, wake=env.conv.changed.wait)
    sick = await asyncio.to_thread(cli, "check", "--socket", str(env.socket))
    assert (sick.returncode, sick.stdout) == (1, "unhealthy: agentapi: not connected\n")


# -- ordering (issue 11) ------------------------------------------------------------------


async def test_raw_escape_reaches_agentapi_at_once_while_a_user_input_waits(env: Env) -> None:
    """A raw Escape sent while a user input waits for stable reaches agentapi within 1 s,
    and the user input is still delivered once the agent is stable."""
    env.agent.set_status("running")
    await env.synced()
    queued = asyncio.create_task(env.send({"input": "next task", "wait_s": 8}))
    await until(lambda: env.relay.busy)
    async with asyncio.timeout(1):
        assert await env.send({"input": "\x1b", "type": "raw"}) == (204, None)
    assert env.agent.received == [("raw", "\x1b")]
    assert not queued.done()
    env.agent.set_status("stable")
    assert (await queued)[0] == 204
    assert env.users() == ["next task"]


async def test_two_posts_never_interleave(env: Env) -> None:
    """A raw input that arrives while a user POST /message is in flight waits for it: agentapi
    never has two of the relay's POSTs at once."""
    in_flight = 0
    most = 0
    entered = asyncio.Event()
    release = asyncio.Event()

    async def track(request: web.Request) -> web.StreamResponse | None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if (await request.json())["type"] == "user":
                entered.set()
                await release.wait()
        finally:
            in_flight -= 1
        return None

    env.agent.message_hook = track
    user = asyncio.create_task(env.send({"input": "long"}))
    async with asyncio.timeout(5):
        await entered.wait()
    raw = asyncio.create_task(env.send({"input": "\x1b", "type": "raw"}))
    await until(lambda: env.relay.raw_waiting == 1)
    release.set()
    assert (await user)[0] == 204
    assert (await raw)[0] == 204
    assert most == 1
    assert [kind for kind, _ in env.agent.received] == ["user", "raw"]


async def test_raw_input_behind_a_post_that_outlasts_its_wait_is_409(env: Env) -> None:
    """A raw input whose wait_s runs out while another POST is still in flight is not sent:
    409, saying so."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse | None:
        entered.set()
        await release.wait()
        return None

    env.agent.message_hook = slow
    user = asyncio.create_task(env.send({"input": "long"}))
    async with asyncio.timeout(5):
        await entered.wait()
    status, body = await env.send({"input": "\x1b", "type": "raw", "wait_s": 0.2})
    release.set()
    assert (await user)[0] == 204
    assert status == 409
    assert body["message"] == "agentapi is still busy with the input before this one."
    assert [kind for kind, _ in env.agent.received] == ["user"]


# -- outcomes: never sent, refused, sent without an answer (issue 11, issue 9) -------------


async def test_connect_failure_is_503_and_says_the_input_was_not_sent(
    short_dir: Path,
) -> None:
    """When agentapi refuses the connection the input was never written: 503, 'not sent'."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening
        settings = make_settings(agentapi_url=dead)
        conv = Conversation(CODERD_MAX_BODY_BYTES)
        conv.set_connected(True)  # the follower's view lags: it still says stable
        conv.set_status("stable")
        async with aiohttp.ClientSession() as agent_http:
            client = AgentAPI(agent_http, settings)
            client.state.transport = "pty"
            relay = Relay(client, conv, Metrics(), settings)
            await relay.start(short_dir / "r.sock")
            try:
                connector = aiohttp.UnixConnector(path=str(short_dir / "r.sock"))
                async with aiohttp.ClientSession(connector=connector) as http, http.post(
                        "http://sidecar/send", json={"input": "hello"}) as resp:
                    status, body = resp.status, await resp.json()
            finally:
                await relay.stop()
    assert status == 503
    assert body["message"] == "agentapi cannot be reached."
    assert body["detail"].endswith("the input was not sent")


async def test_a_hanging_post_is_504_within_its_bound_and_never_retried(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """agentapi takes the POST and never answers while /status says stable: the answer is
    504 'outcome unknown' within send_timeout_s (plus the margin), after exactly one POST."""
    calls = 0
    entered = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse | None:
        nonlocal calls
        calls += 1
        entered.set()
        await asyncio.Event().wait()
        return None

    agent.message_hook = hang
    async with relay_env(agent, short_dir, send_timeout_s=0.5) as env:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await env.send({"input": "hello", "wait_s": 1})
        took = loop.time() - started
    assert status == 504
    assert body["message"] == "The input was sent, but agentapi did not answer."
    assert "may have been typed" in body["detail"]
    assert "within 0.5s" in body["detail"]
    assert calls == 1
    assert 0.5 <= took <= 0.5 + ANSWER_MARGIN_S


async def test_a_connection_dropped_after_the_request_is_504(env: Env) -> None:
    """agentapi drops the connection after reading the POST: sent, outcome unknown (504),
    not 'unreachable'."""
    env.agent.message_hook = drop_after_reading
    status, body = await env.send({"input": "hello"})
    assert status == 504
    assert "the connection dropped" in body["detail"]


@pytest.mark.parametrize("version", ["v0.10", "v0.12-pty"])
async def test_phase1_failure_is_typed_but_not_submitted_and_never_retried(
    short_dir: Path, version: Version,
) -> None:
    """agentapi's 'failed to wait for screen to stabilize' (v0.10, released v0.12.1) is a 502
    that says the text was typed but not submitted and that resending types it twice; the
    relay types it exactly once."""
    async with FakeAgentAPI(version=version, chunk_delay_s=0.01, stable_after_s=0.05) as agent:
        agent.stabilize_timeout_s = 0.05
        async with relay_env(agent, short_dir) as env:
            status, body = await env.send({"input": "run the tests"})
    assert status == 502
    assert body["message"] == ("The input was typed into the agent's input box but not "
                               "submitted.")
    assert "failed to wait for screen to stabilize" in body["detail"]
    assert "would type it a second time" in body["detail"]
    assert agent.typed == ["run the tests"]


# -- versions and ACP (issue 9 part 3) ----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_user_input_is_delivered_once_by_every_version(
    short_dir: Path, version: Version,
) -> None:
    """Each agentapi version gets a user input exactly once, with a 204."""
    async with FakeAgentAPI(version=version, chunk_delay_s=0.01, stable_after_s=0.05) as agent, \
            relay_env(agent, short_dir) as env:
        assert await env.send({"input": "hello"}) == (204, None)
    assert agent.typed == ["hello"]


async def test_raw_input_under_acp_is_refused_with_409_saying_why(short_dir: Path) -> None:
    """Under ACP a raw input would be a whole prompt, not keystrokes: 409, nothing sent."""
    async with FakeAgentAPI(version="v0.12-acp") as agent, relay_env(agent, short_dir) as env:
        status, body = await env.send({"input": "\x1b", "type": "raw"})
    assert status == 409
    assert body["message"] == "Raw input is refused: this agentapi uses the ACP transport."
    assert "whole prompt, not as keystrokes" in body["detail"]
    assert agent.received == []


async def test_an_acp_send_waits_for_the_whole_turn_not_the_pty_bound(short_dir: Path) -> None:
    """Under ACP the POST lasts the whole turn: it is bounded by acp_turn_timeout_s, so a
    turn longer than send_timeout_s is still a 204."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=6, chunk_delay_s=0.1)
    async with agent, relay_env(agent, short_dir, send_timeout_s=0.2,
                                acp_turn_timeout_s=30) as env:
        assert await env.send({"input": "long turn"}) == (204, None)
        _, body = await env.get("/status")
    assert agent.typed == ["long turn"]
    assert body["relay"]["send_timeout_s"] == 30


async def test_an_acp_turn_past_acp_turn_timeout_is_504(short_dir: Path) -> None:
    """An ACP turn that outlasts acp_turn_timeout_s is 'sent, outcome unknown' (504)."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=50, chunk_delay_s=0.1)
    async with agent, relay_env(agent, short_dir, acp_turn_timeout_s=0.3) as env:
        status, body = await env.send({"input": "endless"})
    assert status == 504
    assert "within 0.3s" in body["detail"]


async def test_status_reports_the_bound_a_client_must_wait(env: Env) -> None:
    """/status gives send_wait_s, the send timeout (send_timeout_s over a PTY,
    acp_turn_timeout_s under ACP, the larger while the transport is unknown) and the answer
    margin."""
    state = env.relay.agentapi.state
    await until(lambda: state.transport == "pty")  # the follower's /status probe
    _, body = await env.get("/status")
    assert body["relay"]["send_wait_s"] == 5
    assert body["relay"]["send_timeout_s"] == 60
    assert body["relay"]["answer_margin_s"] == ANSWER_MARGIN_S
    state.transport = "acp"
    assert (await env.get("/status"))[1]["relay"]["send_timeout_s"] == 3600
    state.transport, state.status_read = None, False  # not known yet: the larger bound
    assert (await env.get("/status"))[1]["relay"]["send_timeout_s"] == 3600
    assert (await env.send({"input": "x"}))[0] == 204  # the relay asks /status itself
    assert (await env.get("/status"))[1]["relay"]["send_timeout_s"] == 60


# -- reply (issue 11) ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_reply_is_exactly_the_agents_answer(short_dir: Path, version: Version) -> None:
    """With reply, the answer is 200 with the agent's message(s) after the delivered user
    message, once the agent is stable again: exactly the stand-in's reply."""
    agent = FakeAgentAPI(version=version, chunks=4, chunk_delay_s=0.02, stable_after_s=0.1)
    async with agent, relay_env(agent, short_dir) as env:
        agent.add_message("user", "an earlier question")
        agent.add_message("agent", "an earlier answer")
        await until(lambda: env.conv.count == len(agent.messages), wake=env.conv.changed.wait)
        status, body = await env.send({"input": " what is 2+2? ", "reply": True})
        assert env.conv.status == "stable"
    assert status == 200
    [user] = [m for m in agent.messages if m.content == "what is 2+2?"]
    replies = [m.rest() for m in agent.messages if m.id > user.id]
    assert len(replies) == 1
    assert replies[0]["content"] == echo_reply("what is 2+2?")
    assert body == {"messages": [{k: replies[0][k] for k in ("id", "role", "content", "time")}]}


async def test_a_reply_that_does_not_finish_in_time_is_504(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """If the agent is not stable again within the send timeout, the answer is 504 saying the
    input was delivered and must not be resent."""
    agent.stable_after_s = 30
    async with relay_env(agent, short_dir, send_timeout_s=0.5) as env:
        status, body = await env.send({"input": "think hard", "reply": True})
    assert status == 504
    assert body["message"] == ("The input was delivered, but the agent's reply did not "
                               "finish in time.")
    assert "do not resend" in body["detail"]
    assert agent.typed == ["think hard"]


def test_reply_to_takes_the_messages_after_the_delivered_input_up_to_the_next() -> None:
    """reply_to picks the delivered user message by its text among the new ones, and
    returns what follows it up to the next user message."""
    def m(id_: int, role: str, text: str) -> Message:
        return Message(id_, role, text, "2026-01-01T00:00:00Z")

    messages = [m(0, "agent", "hi"), m(1, "user", "old"), m(2, "agent", "old answer"),
                m(3, "user", "other client"), m(4, "agent", "to the other"),
                m(5, "user", "mine"), m(6, "agent", "part 1"), m(7, "agent", "part 2"),
                m(8, "user", "later")]
    assert [x.id for x in reply_to(messages, 3, "mine")] == [6, 7]
    assert [x.id for x in reply_to(messages, 3, "not there")] == [4]
    assert reply_to(messages, 9, "mine") == []


def test_reply_to_takes_the_last_input_with_its_text() -> None:
    """When another client's identical input is also at or after `before`, reply_to answers
    with what follows the last one, the relay's (another after it would have waited for
    the relay's turn to end)."""
    def m(id_: int, role: str, text: str) -> Message:
        return Message(id_, role, text, "2026-01-01T00:00:00Z")

    messages = [m(0, "agent", "hi"), m(1, "user", "yes"), m(2, "agent", "to the other"),
                m(3, "user", "yes"), m(4, "agent", "to us")]
    assert [x.id for x in reply_to(messages, 1, "yes")] == [4]


def hide(agent: FakeAgentAPI, role: str, content: str) -> None:
    """A message agentapi has and the follower has not seen yet: as a poll interval's lag
    in polling mode, or another client's input just before ours."""
    agent.messages.append(FakeMessage(agent._next_id, role, content))
    agent._next_id += 1


async def test_a_reply_is_not_anothers_answer_to_the_same_text_the_view_lacks(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Another client's identical input and its answer, in agentapi but not yet in the
    sidecar's view, do not become the reply: where the input lands is asked of agentapi
    just before posting."""
    async with relay_env(agent, short_dir) as env:
        hide(agent, "user", "yes")
        hide(agent, "agent", "the OLD answer")
        status, body = await env.send({"input": "yes", "reply": True})
    assert status == 200, body
    assert [m["content"] for m in body["messages"]] == [echo_reply("yes")]
    assert body["messages"][0]["id"] == agent.messages[-1].id
    assert "incomplete" not in body


async def test_a_reply_after_agentapi_restarted_unseen_is_its_new_answer(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """After agentapi's history shrank (a restart, ids from 0) and before the sidecar saw
    it, a reply still finds its answer under the new, lower ids."""
    async with relay_env(agent, short_dir) as env:
        for i in range(3):
            agent.add_message("user", f"q{i}")
            agent.add_message("agent", f"a{i}")
        await until(lambda: env.conv.count == 7, wake=env.conv.changed.wait)
        agent.messages = [FakeMessage(0, "agent", "")]  # restarted, the stream not dropped
        agent._next_id = 1
        status, body = await env.send({"input": "hi again", "reply": True})
    assert status == 200, body
    assert [(m["id"], m["content"]) for m in body["messages"]] == [(2, echo_reply("hi again"))]
    assert "incomplete" not in body


async def test_a_reply_after_an_unseen_restart_is_not_the_old_answer_to_the_same_text(
    short_dir: Path,
) -> None:
    """After an agentapi restart the sidecar has not seen, the view still holds the old
    answer to the same text at the id the new answer takes: the reply waits for the new
    turn and is its whole answer, not the stale one nor a half-written one."""
    agent = FakeAgentAPI(chunks=4, chunk_delay_s=0.05, stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir) as env:
        agent.add_message("user", "one")  # after agentapi's greeting, id 0
        agent.add_message("agent", echo_reply("one"))
        await until(lambda: env.conv.count == 3, wake=env.conv.changed.wait)
        agent.messages = [FakeMessage(0, "agent", "")]  # restarted, the stream not dropped
        agent._next_id = 1
        status, body = await env.send({"input": "one", "reply": True})
    assert status == 200, body
    assert [(m["id"], m["content"]) for m in body["messages"]] == [(2, echo_reply("one"))]
    assert "incomplete" not in body


async def test_a_drop_before_the_input_does_not_make_the_next_reply_incomplete(
    short_dir: Path,
) -> None:
    """An earlier answer over max_event_bytes, dropped from /messages just before the next
    input, is not counted against that input's reply, which is whole."""
    agent = FakeAgentAPI(reply=lambda prompt: "x" * 70_000 if prompt == "big" else "small",
                         chunks=1, chunk_delay_s=0.01, stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir, max_event_bytes=65536) as env:
        status, body = await env.send({"input": "big", "reply": True})
        assert (status, body["messages"]) == (200, [])
        assert "1 larger than max_event_bytes" in body["incomplete"]
        status, body = await env.send({"input": "second", "reply": True})
    assert status == 200, body
    assert [m["content"] for m in body["messages"]] == ["small"]
    assert "incomplete" not in body


async def test_a_dropped_reply_is_seen_when_polling_misses_the_turn(short_dir: Path) -> None:
    """Polling (no /events) that never sees the agent running still ends a reply whose
    answer is over max_event_bytes at the first poll after the post, saying it is
    incomplete, instead of waiting out send_timeout_s."""
    agent = FakeAgentAPI(events=False, reply=lambda prompt: "x" * 70_000, chunks=1,
                         chunk_delay_s=0.0, stable_after_s=0.01)
    async with agent, relay_env(agent, short_dir, max_event_bytes=65536,
                                poll_interval_s=0.5, send_timeout_s=4) as env:
        status, body = await env.send({"input": "a long one", "reply": True})
    assert status == 200, body
    assert body["messages"] == []
    assert "1 larger than max_event_bytes (65536 bytes)" in body["incomplete"]


async def test_a_reply_larger_than_max_event_bytes_is_said_incomplete(
    short_dir: Path,
) -> None:
    """An answer larger than max_event_bytes is dropped from /messages: the reply says it
    is incomplete, naming the setting and its limit, instead of a bare empty answer."""
    agent = FakeAgentAPI(reply=lambda prompt: "x" * 70_000, chunks=1, chunk_delay_s=0.01,
                         stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir, max_event_bytes=65536) as env:
        status, body = await env.send({"input": "a long one", "reply": True})
    assert status == 200, body
    assert body["messages"] == []
    assert "1 larger than max_event_bytes (65536 bytes)" in body["incomplete"]


async def test_a_reply_from_the_sidecars_view_is_said_incomplete(short_dir: Path) -> None:
    """When /messages cannot be read for the reply (over max_agentapi_response_bytes), the
    answer from the sidecar's own view says it is incomplete and why, and keeps what the
    view has (a message's last 64 KiB characters)."""
    agent = FakeAgentAPI(reply=lambda prompt: "y" * 70_000, chunks=1, chunk_delay_s=0.01,
                         stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir, max_agentapi_response_bytes=65536,
                                max_event_bytes=1 << 20) as env:
        status, body = await env.send({"input": "a long one", "reply": True})
    assert status == 200, body
    assert [len(m["content"]) for m in body["messages"]] == [CODERD_MAX_BODY_BYTES]
    assert "max_agentapi_response_bytes" in body["incomplete"]
    assert "the sidecar's own view" in body["incomplete"]


async def test_not_connected_names_the_followers_last_error(short_dir: Path) -> None:
    """When the follower cannot read /messages (over max_agentapi_response_bytes while
    polling), the 503 says so, not only that agentapi was not connected."""
    agent = FakeAgentAPI(events=False)
    async with agent, relay_env(agent, short_dir, max_agentapi_response_bytes=65536,
                                poll_interval_s=0.02) as env:
        agent.add_message("agent", "z" * 70_000)
        await until(lambda: not env.conv.connected, wake=env.conv.changed.wait)
        status, body = await env.send({"input": "hello", "wait_s": 0.2})
    assert status == 503, body
    assert body["message"] == "agentapi answers, but the sidecar cannot follow it."
    assert "the follower's last error: GET /messages answered more than 65536 bytes " \
           "(max_agentapi_response_bytes)" in body["detail"]
    assert agent.received == []


async def test_a_reply_that_cannot_be_followed_names_the_followers_last_error(
    short_dir: Path,
) -> None:
    """A reply whose answer makes /messages too large to poll ends in a 504 naming the
    follower's last error, not only that the agent was not stable again."""
    agent = FakeAgentAPI(events=False, reply=lambda prompt: "z" * 70_000, chunks=1,
                         chunk_delay_s=0.01, stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir, max_agentapi_response_bytes=65536,
                                poll_interval_s=0.02, send_timeout_s=1) as env:
        status, body = await env.send({"input": "a long one", "reply": True})
    assert status == 504, body
    assert "max_agentapi_response_bytes" in body["detail"]
    assert "do not resend" in body["detail"]


# -- bad input is a 400, whatever it is (issue 15 item 12) --------------------------------


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "The request body is nested too deeply."),
    (b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     "The request body is nested too deeply."),
    (b'{"input": "x", "wait_s": ' + b"9" * 400 + b"}",
     "Field 'wait_s' must be a number from 0 to 3600."),
    (b'{"input": "x", "wait_s": -' + b"9" * 400 + b"}",
     "Field 'wait_s' must be a number from 0 to 3600."),
    (b'{"input": "x", "wait_s": ' + b"9" * 5000 + b"}", "The request body is not valid JSON."),
    (b'{"input": "x", "wait_s": 1e999}', "Field 'wait_s' must be a number from 0 to 3600."),
    (b'{"input": "x", "wait_s": NaN}', "The request body is not valid JSON."),
    (b'{"input": "x", "wait_s": Infinity}', "The request body is not valid JSON."),
    (b'{"input": "\\ud800"}', "Field 'input' must be valid Unicode text."),
    (b'{"input": "\xff\xfe"}', "The request body is not valid JSON."),
    (b'{"input": "x", "reply": "yes"}', "Field 'reply' must be true or false."),
    (b'{"input": "x", "type": "raw", "reply": true}',
     "Field 'reply' is only for \"user\" input."),
    (b'{"input": "x", "type": ' + b"[" * 500 + b"]" * 500 + b"}",
     "Field 'type' must be \"user\" or \"raw\"."),
    (b'{"' + b"k" * 100_000 + b'": 1}', "Unknown field '" + "k" * 56 + "...."),
])
async def test_any_malformed_body_is_a_400_never_a_500(
    env: Env, raw: bytes, message: str,
) -> None:
    """Deep nesting, huge or non-finite numbers, bad text and wrong types in any field are a
    400 with a short detail that names the valid form, never a 500."""
    status, answer = await env.send(None, raw=raw)
    assert status == 400
    assert answer["message"] == message
    assert len(answer["detail"]) <= 400
    assert env.agent.received == []


async def test_raw_input_is_not_sent_when_the_transport_cannot_be_told(
    short_dir: Path,
) -> None:
    """While an ACP turn holds agentapi's lock, its /status does not answer, so the relay
    cannot tell the transport: raw keystrokes are not sent blindly (503, 'not sent')."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=100, chunk_delay_s=0.1)
    async with agent, relay_env(agent, short_dir) as env, aiohttp.ClientSession() as direct:
        turn = asyncio.create_task(direct.post(agent.url + "/message",
                                               json={"content": "from the web UI",
                                                     "type": "user"}))
        await until(lambda: env.conv.status == "running", wake=env.conv.changed.wait)
        # As for a follower that connected mid-turn: its own /status probe still waits.
        env.relay.agentapi.state.transport = None
        env.relay.agentapi.state.status_read = False  # as if the follower had not asked yet
        status, body = await env.send({"input": "\x1b", "type": "raw", "wait_s": 0.3})
        turn.cancel()
        await asyncio.gather(turn, return_exceptions=True)
    assert status == 503
    assert "did not say which transport it uses within 0.3s" in body["detail"]
    assert agent.received == [("user", "from the web UI")]


async def test_a_reply_over_polling_sees_a_turn_too_short_to_be_seen_running(
    short_dir: Path,
) -> None:
    """Polling an agentapi without /events can miss the `running` of a short turn; the
    reply still ends once the agent is stable with its answer after the input."""
    agent = FakeAgentAPI(events=False, chunks=1, chunk_delay_s=0.01, stable_after_s=0.05)
    async with agent, relay_env(agent, short_dir, poll_interval_s=1.0,
                                send_timeout_s=5) as env:
        status, body = await env.send({"input": "quick one", "reply": True})
    assert status == 200, body
    assert [m["content"] for m in body["messages"]] == [echo_reply("quick one")]


@pytest.mark.parametrize("version", ["v0.10", "v0.11"])
async def test_a_version_that_names_no_transport_is_bounded_as_a_pty(
    short_dir: Path, version: Version,
) -> None:
    """v0.10 and v0.11 have no ACP: once the follower has read their /status, the relay's
    bound (in /status) is send_timeout_s before any send, not the ACP turn bound."""
    agent = FakeAgentAPI(version=version)
    async with agent, relay_env(agent, short_dir, send_timeout_s=60,
                                acp_turn_timeout_s=3600) as env:
        await until(lambda: env.relay.agentapi.state.status_read)
        assert env.relay.status_fields()["send_timeout_s"] == 60
