"""The relay's connections: half-close, hang-ups, timeouts, the connection cap, the accept
loop, and errors that never become tracebacks. Raw Unix-socket clients throughout."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from standins import FakeAgentAPI

from agent_sidecar.unix_socket import hung_up

from .conftest import until
from .rawhttp import RawClient, request_bytes, send_bytes
from .test_relay import Env, relay_env


@pytest.fixture
async def env(agent: FakeAgentAPI, short_dir: Path) -> AsyncIterator[Env]:
    async with relay_env(agent, short_dir) as environment:
        yield environment


async def synced_running(env: Env) -> None:
    env.agent.set_status("running")
    await env.synced()


# -- half-close (issue 11, case 2) --------------------------------------------------------


async def test_a_half_closing_client_gets_its_204_and_one_delivery(env: Env) -> None:
    """A client that writes its request and shuts down its write side (nc -N, socat) gets its
    answer on the same connection, and the input is delivered exactly once."""
    with await RawClient.connect(env.socket) as client:
        await client.write(send_bytes({"input": "from nc"}))
        client.half_close()
        answer = await client.answer()
        assert await client.closed_by_server() == b""  # then the relay closes
    assert answer.status == 204
    assert env.users() == ["from nc"]


async def test_a_half_closing_client_waits_for_a_busy_agent_and_gets_its_204(env: Env) -> None:
    """With the agent busy, a half-closed client's input waits for stable, is delivered
    once, and the 204 arrives on the same connection."""
    await synced_running(env)
    with await RawClient.connect(env.socket) as client:
        await client.write(send_bytes({"input": "queued"}))
        client.half_close()
        await until(lambda: env.relay.busy)
        env.agent.set_status("stable")
        answer = await client.answer()
    assert answer.status == 204
    assert env.users() == ["queued"]


async def test_a_client_that_closes_before_delivery_cancels_its_input(env: Env) -> None:
    """A client that writes its request and then closes the socket for good is gone: its
    input is dropped, never delivered late."""
    await synced_running(env)
    with await RawClient.connect(env.socket) as client:
        await client.write(send_bytes({"input": "too late", "wait_s": 60}))
        await until(lambda: env.relay.busy)
    await until(lambda: not env.relay.busy, timeout_s=5)  # well before wait_s runs out
    env.agent.set_status("stable")
    assert (await env.send({"input": "on time"}))[0] == 204
    assert env.users() == ["on time"]


async def test_a_half_closed_client_that_then_hangs_up_cancels_its_input(env: Env) -> None:
    """After a half-close the relay still notices the full hang-up (POLLHUP) while the input
    waits, and drops it."""
    await synced_running(env)
    with await RawClient.connect(env.socket) as client:
        await client.write(send_bytes({"input": "abandoned", "wait_s": 60}))
        client.half_close()
        await until(lambda: env.relay.busy)
    await until(lambda: not env.relay.busy, timeout_s=5)  # well before wait_s runs out
    env.agent.set_status("stable")
    assert (await env.send({"input": "kept"}))[0] == 204
    assert env.users() == ["kept"]


def test_pollhup_tells_a_hang_up_from_a_half_close() -> None:
    """On a Unix stream socket a peer's half-close does not raise POLLHUP and its close does:
    the test the relay makes at a read-side EOF."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, peer:
        assert not hung_up(ours.fileno())
        peer.shutdown(socket.SHUT_WR)
        assert not hung_up(ours.fileno())
        peer.close()
        assert hung_up(ours.fileno())


async def test_a_half_close_mid_body_is_a_400_at_once(env: Env) -> None:
    """A client that half-closes before its body is complete gets a 400 at once, not a wait
    for the body timeout."""
    head = request_bytes("POST", "/send", None, {"Content-Length": "100"})
    with await RawClient.connect(env.socket) as client:
        await client.write(head + b'{"input": "cut')
        client.half_close()
        answer = await client.answer(timeout_s=2)
    assert answer.status == 400
    assert answer.json()["message"] == "The request body was cut short."
    assert env.agent.received == []


async def test_a_half_closed_idle_connection_is_closed(env: Env) -> None:
    """A client that half-closes without a request has nothing to wait for: closed at once."""
    with await RawClient.connect(env.socket) as client:
        client.half_close()
        assert await client.closed_by_server(timeout_s=2) == b""


# -- timeouts (issue 15 item 4) -----------------------------------------------------------


async def test_slowloris_headers_are_cut_off_by_the_header_timeout(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Headers that trickle in a byte at a time are cut off relay_header_timeout_s after the
    request's first byte with a 408, however long the idle timeout."""
    async with relay_env(agent, short_dir, relay_header_timeout_s=0.5,
                         relay_idle_timeout_s=60) as env:
        with await RawClient.connect(env.socket) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await client.write(b"POST /send HTTP/1.1\r\nHost: x\r\n")

            async def trickle() -> None:
                with contextlib.suppress(OSError):  # until the relay closes the connection
                    while True:
                        await client.write(b"X")
                        await asyncio.sleep(0.05)  # the attacker's pace

            trickler = asyncio.create_task(trickle())
            sent = await client.closed_by_server(timeout_s=5)
            took = loop.time() - started
            await trickler
    assert sent.startswith(b"HTTP/1.1 408 ")
    assert json.loads(sent.split(b"\r\n\r\n", 1)[1])["message"] == (
        "The request headers did not arrive in time.")
    assert 0.5 <= took < 2


async def test_a_slow_body_gets_408_after_the_body_timeout(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """A body that does not arrive within relay_body_timeout_s of the headers gets a 408."""
    async with relay_env(agent, short_dir, relay_body_timeout_s=0.3) as env:
        head = request_bytes("POST", "/send", None, {"Content-Length": "100"})
        with await RawClient.connect(env.socket) as client:
            await client.write(head + b'{"input":')
            answer = await client.answer(timeout_s=3)
    assert answer.status == 408
    assert "relay_body_timeout_s (0.3s)" in answer.json()["detail"]
    assert agent.received == []


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """A connection that sends nothing, and one that stays open after its answer, are closed
    after relay_idle_timeout_s."""
    async with relay_env(agent, short_dir, relay_idle_timeout_s=0.3) as env:
        with await RawClient.connect(env.socket) as silent:
            assert await silent.closed_by_server(timeout_s=3) == b""
        with await RawClient.connect(env.socket) as kept:
            await kept.write(request_bytes("GET", "/healthz"))
            assert (await kept.answer()).status == 200
            assert await kept.closed_by_server(timeout_s=3) == b""


# -- the connection cap and the accept loop (issue 15 item 4) ------------------------------


async def test_at_the_cap_the_oldest_idle_connection_makes_room(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With relay_max_connections idle connections open, a new one is still served: the
    oldest idle connection is closed to make room."""
    async with relay_env(agent, short_dir, relay_max_connections=3) as env:
        await env.http.close()  # only raw connections count from here
        idle = [await RawClient.connect(env.socket) for _ in range(3)]
        await until(lambda: env.relay.connections == 3)
        with await RawClient.connect(env.socket) as probe:
            await probe.write(request_bytes("GET", "/healthz"))
            assert (await probe.answer()).status == 200
        assert await idle[0].closed_by_server(timeout_s=2) == b""
        assert env.relay.connections <= 3
        for client in idle:
            client.close()


async def test_when_every_connection_is_busy_sends_get_503_and_probes_still_answer(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """When all relay_max_connections connections are serving requests, a new connection
    may still read (/livez, /healthz: a liveness probe must not fail because senders wait
    on a busy agent) but a send on it is answered 503; the waiting requests are untouched."""
    async with relay_env(agent, short_dir, relay_max_connections=2) as env:
        await env.http.close()
        await synced_running(env)
        busy = [await RawClient.connect(env.socket) for _ in range(2)]
        for i, client in enumerate(busy):
            await client.write(send_bytes({"input": f"waiting {i}"}))
        await until(lambda: env.relay.waiting == 1)
        with await RawClient.connect(env.socket) as probe:
            await probe.write(request_bytes("GET", "/livez"))
            assert (await probe.answer(timeout_s=2)).status == 200
        with await RawClient.connect(env.socket) as sender:
            await sender.write(send_bytes({"input": "one too many"}))
            answer = await sender.answer(timeout_s=2)
        assert answer.status == 503
        assert answer.json()["message"] == "The relay has too many connections."
        env.agent.set_status("stable")
        assert (await busy[0].answer()).status == 204
        for client in busy:
            client.close()


async def test_past_the_probe_reserve_a_client_that_writes_late_still_reads_its_503(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With every connection busy and no reserve left, a new connection is answered 503 at
    once, and a client that writes its request only then still reads that answer rather
    than a reset connection."""
    async with relay_env(agent, short_dir, relay_max_connections=2) as env:
        env.relay.server.probe_reserve = 0
        await env.http.close()
        await synced_running(env)
        busy = [await RawClient.connect(env.socket) for _ in range(2)]
        for i, client in enumerate(busy):
            await client.write(send_bytes({"input": f"waiting {i}"}))
        await until(lambda: env.relay.waiting == 1)
        registry = env.relay.metrics.registry
        with await RawClient.connect(env.socket) as extra:
            # The relay has refused it before the client writes: the write must still land.
            await until(lambda: registry.get_sample_value(
                "agent_sidecar_relay_requests_total", {"path": "other", "code": "503"}) == 1)
            await extra.write(send_bytes({"input": "x" * 100_000}))
            answer = await extra.answer(timeout_s=2)
        assert answer.status == 503
        assert answer.json()["message"] == "The relay has too many connections."
        for client in busy:
            client.close()


async def test_accept_backs_off_when_the_process_is_out_of_descriptors(
    env: Env, monkeypatch: pytest.MonkeyPatch, log_output: io.StringIO,
) -> None:
    """When accept() fails with EMFILE the accept loop backs off instead of spinning: a
    handful of attempts a second, not thousands, and it serves again once it can."""
    loop = asyncio.get_running_loop()
    attempts = 0
    real_accept = loop.sock_accept

    async def out_of_fds(sock: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal attempts
        attempts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(loop, "sock_accept", out_of_fds)
    await env.http.close()
    # Restart the loop so that it picks up the failing accept.
    server = env.relay.server
    [acceptor], [listener] = server._acceptors, server._listeners
    acceptor.cancel()
    await asyncio.gather(acceptor, return_exceptions=True)
    server._acceptors = [loop.create_task(server._accept_loop(listener))]
    started = time.monotonic()
    await asyncio.sleep(1.0)  # a measurement window, not a synchronisation
    elapsed = time.monotonic() - started
    assert 1 <= attempts <= 60 * elapsed, attempts
    failures = [json.loads(line) for line in log_output.getvalue().splitlines()
                if '"relay_accept_failed"' in line]
    assert len(failures) == attempts
    assert failures[0]["error"] == "Too many open files"
    monkeypatch.setattr(loop, "sock_accept", real_accept)
    with await RawClient.connect(env.socket) as client:
        await client.write(request_bytes("GET", "/healthz"))
        assert (await client.answer(timeout_s=5)).status == 200


# -- errors are answered in Coder's shape, never as tracebacks (issue 15 items 11, 15) -----


async def test_a_malformed_http_request_gets_coders_shape_and_one_log_line(
    env: Env, log_output: io.StringIO,
) -> None:
    """A request aiohttp cannot parse is answered 400 in Coder's shape and logged as exactly
    one structured line, with no traceback."""
    before = len(log_output.getvalue().splitlines())
    with await RawClient.connect(env.socket) as client:
        await client.write(b"GET /status HTTP/1.1\r\nBad Header\r\n\r\n")
        answer = await client.answer()
    assert answer.status == 400
    assert answer.json() == {"message": "The request is not valid HTTP.",
                             "detail": "Invalid header token:"}
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()[before:]]
    relay = [line for line in lines if line["event"].startswith("relay_")
             or line.get("logger", "").startswith("aiohttp")]
    assert [line["event"] for line in relay] == ["relay_bad_http"]
    assert "exception" not in relay[0]


async def test_an_unexpected_exception_in_a_handler_is_one_line_and_the_relay_serves_on(
    env: Env, log_output: io.StringIO,
) -> None:
    """A bug in a handler is a 500 in Coder's shape and one structured log line; the relay
    keeps serving."""
    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug")

    env.relay._status = broken
    status, body = await env.get("/status")
    assert status == 500
    assert body == {"message": "The sidecar failed to handle this request.",
                    "detail": "RuntimeError"}
    [line] = [json.loads(line) for line in log_output.getvalue().splitlines()
              if '"relay_handler_failed"' in line]
    assert line["error"] == "RuntimeError"
    assert (await env.get("/healthz"))[0] == 200


async def test_an_input_delivered_after_its_client_left_is_logged_as_delivered(
    env: Env, log_output: io.StringIO,
) -> None:
    """A client that closes right after writing, while its input is being posted, leaves
    a log line saying the input was delivered, not that it was dropped."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow_ok(request: Any) -> None:
        entered.set()
        await release.wait()  # agentapi takes a moment; the client is gone meanwhile
        return

    env.agent.message_hook = slow_ok
    with await RawClient.connect(env.socket) as client:
        await client.write(send_bytes({"input": "fire and forget"}))
        async with asyncio.timeout(5):
            await entered.wait()
        [conn] = list(env.relay.server._connections)
    async with asyncio.timeout(5):
        await conn.gone.wait()  # the relay has seen the hang-up before agentapi answers
    release.set()
    await until(lambda: "relay_sender_gone" in log_output.getvalue(), timeout_s=5)
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    [gone] = [line for line in lines if line["event"] == "relay_sender_gone"]
    assert env.users() == ["fire and forget"]
    assert gone["delivered"] is True


# -- log lines carry peer text in `detail`, never in the limiter's key (`error`) ----------


async def test_distinct_over_long_headers_make_one_log_line_until_the_window_ends(
    env: Env, stream_limited: tuple[io.StringIO, list[float]],
) -> None:
    """300 requests whose over-long headers all differ are one kind of `relay_bad_http`
    (the error's type; the peer's bytes are the redacted, clipped `detail`): one line, and
    the first after the window says how many were suppressed."""
    stream, now = stream_limited

    async def over_long(i: int) -> int:
        with await RawClient.connect(env.socket) as client:
            await client.write(b"GET /status HTTP/1.1\r\nHost: x\r\n"
                               + f"X-Pad: {i:05d}-".encode() + b"a" * 9000 + b"\r\n\r\n")
            return (await client.answer()).status

    assert [await over_long(i) for i in range(300)] == [400] * 300
    now[0] = 61.0
    assert await over_long(300) == 400
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    bad = [line for line in lines if line["event"] == "relay_bad_http"]
    assert [(line["error"], line.get("suppressed")) for line in bad] == [
        ("LineTooLong", None), ("LineTooLong", 299)]
    assert bad[0]["detail"].startswith("Got more than")
    assert "00000" in bad[0]["detail"]
    assert len(bad[0]["detail"]) <= 200
    assert [line for line in lines if line["level"] != "info"] == bad
