"""Fault injection: the real `agent-sidecar run` process against misbehaving peers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standins import (
    FakeAgentAPI,
    FakeCoderd,
    coder_error,
    hanging,
    sse_event,
    wait_for_file,
)

from tests.sidecar import Sidecar, clean_env

pytestmark = pytest.mark.faults


def env_for(short_dir: Path, coderd: FakeCoderd | None = None, task: uuid.UUID | None = None,
            **extra: str) -> dict[str, str]:
    values = {"AGENT_SIDECAR_SOCKET": str(short_dir / "s"),
              "AGENT_SIDECAR_RECONNECT_INITIAL_S": "0.05",
              "AGENT_SIDECAR_RECONNECT_MAX_S": "0.2"}
    if coderd is not None:
        values.update(CODER_AGENT_URL=coderd.url, CODER_AGENT_TOKEN=coderd.token,
                      AGENT_SIDECAR_TASK_ID=str(task or coderd.add_task()))
    values.update(extra)
    return clean_env(**values)


def stored(coderd: FakeCoderd) -> bytes | None:
    [task] = coderd.tasks
    return coderd.snapshots.get(task)


async def converged(coderd: FakeCoderd, agent: FakeAgentAPI, timeout_s: float = 15) -> None:
    await coderd.wait_for(lambda: stored(coderd) == agent.packed(), timeout_s)


@contextlib.asynccontextmanager
async def sidecar(agent: FakeAgentAPI, env: dict[str, str], *args: str,
                  **kw: Any) -> AsyncIterator[Sidecar]:
    async with Sidecar("--agentapi-url", agent.url, *args, env=env, **kw) as process:
        await process.wait_log("ready")
        yield process
        assert process.proc is not None
        assert process.proc.returncode is None, "the sidecar exited during the scenario"


async def test_coderd_down_for_30s_then_recovers(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """coderd answers 503 for 30 s: retries follow the back-off schedule, memory stays flat,
    and the latest state arrives within retry_max_s of recovery."""
    outage_s, base, cap = 30.0, 0.1, 2.0
    down = True

    async def unavailable(request: web.Request) -> web.StreamResponse | None:
        return web.Response(status=503, text="no healthy upstream") if down else None

    coderd.hook = unavailable
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_RETRY_INITIAL_S=str(base), AGENT_SIDECAR_RETRY_MAX_S=str(cap))
    async with sidecar(agent, env) as process:
        agent.add_message("user", "start the outage")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await coderd.wait_for(lambda: len(coderd.uploads) >= 6)  # the back-off is at its cap
        rss_early = process.rss_kib()
        while loop.time() - started < outage_s:
            agent.add_message("agent", f"progress at {loop.time() - started:.1f}s " * 50)
            await asyncio.sleep(3)  # the conversation moving on during the outage
        rss_late = process.rss_kib()
        during = len(coderd.uploads)
        down = False
        recovered = time.monotonic()
        await converged(coderd, agent, timeout_s=cap + 5)
        assert coderd.uploads[-1].at - recovered <= cap + 1
    # Full jitter: each wait is uniform in [0, min(cap, base * 2^n)], so about 2 per cap.
    ramp = math.ceil(math.log2(cap / base)) + 1
    assert outage_s / cap - 1 <= during <= ramp + 4 * outage_s / cap
    assert rss_late - rss_early <= 5 * 1024, "memory grew while coderd was down"


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_respected(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, form: str,
) -> None:
    """After a 429 no request comes before the time Retry-After allows, in either form."""
    allowed: list[float] = []

    async def limited(request: web.Request) -> web.StreamResponse | None:
        if allowed:
            return None
        now = time.time()
        if form == "seconds":
            value, at = "2", now + 2
        else:
            at = math.ceil(now) + 3
            value = email.utils.formatdate(at, usegmt=True)
        allowed.append(at)
        return coder_error(429, "You've been rate limited for sending more than 512 requests "
                           "in 1m0s.", headers={"Retry-After": value})

    coderd.hook = limited
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_RETRY_INITIAL_S="0.01", AGENT_SIDECAR_RETRY_MAX_S="10")
    async with sidecar(agent, env):
        agent.add_message("user", "hello")
        await converged(coderd, agent)
    first, second = coderd.uploads[0], coderd.uploads[1]
    assert first.status == 429
    assert second.wall >= allowed[0] - 0.05  # the clocks are the same; allow rounding


async def test_sigterm_while_coderd_hangs_exits_0_by_the_deadline(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """coderd hangs, then SIGTERM: exit 0 within shutdown_timeout_s + 1 s."""
    entered = asyncio.Event()
    coderd.hook = hanging(entered)
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_SHUTDOWN_TIMEOUT_S="2")
    async with Sidecar("--agentapi-url", agent.url, env=env) as process:
        agent.add_message("user", "hello")
        async with asyncio.timeout(10):
            await entered.wait()
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        assert await process.wait(timeout_s=3) == 0
    assert time.monotonic() - started <= 2 + 1
    assert process.events("final_flush_timed_out")


async def test_agentapi_killed_and_restarted_20_times_during_a_streamed_turn(
    coderd: FakeCoderd, short_dir: Path,
) -> None:
    """agentapi dies and comes back (with its saved state) 20 times mid-reply: the sidecar
    never exits, and the final snapshot is the packed final conversation, nothing stale or
    doubled."""
    agent = await FakeAgentAPI().start()
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0.1")
    try:
        async with sidecar(agent, env) as process:
            agent.set_status("running")
            agent.add_message("user", "write a long essay")
            reply = agent.add_message("agent", "")
            kills = 0
            i = 0
            while kills < 20:
                i += 1
                agent.update_message(reply.id, "".join(f"paragraph {n}\n" for n in range(i)))
                if i % 5 == 0 and agent.subscribers:  # kill only while it is being followed
                    await agent.stop(clean=False)  # killed: streams cut mid-way
                    agent.update_message(reply.id, f"while down {i}")  # nobody hears this
                    await agent.start()  # same port, state restored
                    kills += 1
                await asyncio.sleep(0.01)  # the agent's typing pace
            agent.update_message(reply.id, "the final essay\n" * 300)
            agent.set_status("stable")
            await converged(coderd, agent)
            assert len(process.events("agentapi_following")) >= 21
        body = stored(coderd)
        assert body is not None
        ids = [m["id"] for m in json.loads(body)["messages"]]
        assert ids == [0, 1, 2]
    finally:
        await agent.stop()


async def test_a_slow_reader_is_cut_off_and_loses_nothing(
    coderd: FakeCoderd, short_dir: Path,
) -> None:
    """When agentapi drops the sidecar as a slow reader, it reconnects and nothing is lost."""
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0.1")
    async with FakeAgentAPI(buffer=32) as agent, sidecar(agent, env) as process:
        agent.set_status("running")
        agent.add_message("user", "go")
        for i in range(400):  # a burst far beyond the 32-event buffer, without yielding
            agent.add_message("agent" if i % 2 else "user", f"burst {i} " * 20)
        agent.set_status("stable")
        await converged(coderd, agent)
        assert process.events("agentapi_disconnected")


async def test_garbage_from_agentapi_is_survived_and_logged_at_a_bounded_rate(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """Invalid JSON, unknown events, a 10 MB event and a stream cut mid-event: logged at a
    bounded rate, no crash, and the sidecar recovers."""
    # The 10 MB event is one it must keep: above it, the default 2 MiB cap drops it
    # (test_peer_bounds.py pins that).
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0.1",
                  AGENT_SIDECAR_MAX_EVENT_BYTES=str(16 * 1024 * 1024))
    async with sidecar(agent, env) as process:
        agent.add_message("user", "hello")
        await converged(coderd, agent)
        for i in range(500):
            agent.publish(f"event: message_update\ndata: {{broken {i}\n\n".encode())
            agent.publish(sse_event("mystery_event", {"n": i}))
        big = agent.add_message("agent", "tail of a 10 MB output\n" * 450_000)
        assert len(big.content) > 10_000_000
        agent.publish(b'event: message_update\ndata: {"id": 2, "role": "ag')
        agent.drop_subscribers()  # the stream is cut mid-event
        agent.add_message("user", "are you still there?")
        await converged(coderd, agent)
        invalid = process.events("agentapi_event_invalid")
        assert 1 <= len(invalid) <= 2
    body = stored(coderd)
    assert body is not None
    assert len(body) <= 65536


async def test_sigkill_and_restart_converge_without_regressing(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """Killed with SIGKILL and started again, the sidecar converges; no upload is ever empty
    or older than one before it."""
    task = coderd.add_task()
    env = env_for(short_dir, coderd, task, AGENT_SIDECAR_SETTLE_S="0.1")
    agent.add_message("user", "first")
    agent.add_message("agent", "first answer")
    async with Sidecar("--agentapi-url", agent.url, env=env) as first:
        await converged(coderd, agent)
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
    assert (short_dir / "s").exists()  # a stale socket, left behind
    agent.add_message("user", "second")
    agent.add_message("agent", "second answer")
    async with sidecar(agent, env):
        await converged(coderd, agent)
    last_ids = []
    for upload in coderd.uploads:
        messages = json.loads(upload.body)["messages"]
        assert any(m["role"] == "user" for m in messages)
        last_ids.append(messages[-1]["id"])
    assert last_ids == sorted(last_ids)


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A directory nobody can write to: a read-only tmpfs as root, else mode 0500."""
    path.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: use a read-only mount
        mount, umount = shutil.which("mount"), shutil.which("umount")
        if mount is None or umount is None or subprocess.run(
            [mount, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
            capture_output=True, check=False,
        ).returncode != 0:
            pytest.skip("running as root without mount: cannot make a read-only directory")
        try:
            yield path
        finally:
            subprocess.run([umount, str(path)], check=False)
    else:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)


def small_file_limit() -> None:
    """In the child: files stop growing at 1 KiB, as on a full disk (Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


@pytest.mark.parametrize("failure", ["read-only", "full"])
async def test_a_broken_sink_degrades_but_uploads_continue(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, failure: str,
) -> None:
    """With the sink read-only or full, uploads go on and /healthz says degraded."""
    with contextlib.ExitStack() as stack:
        if failure == "read-only":
            sink = stack.enter_context(read_only_dir(short_dir / "sink"))
            preexec = None
        else:
            sink = short_dir / "sink"
            preexec = small_file_limit
        env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                      AGENT_SIDECAR_SINK_DIR=str(sink))
        async with sidecar(agent, env, preexec=preexec) as process:
            agent.add_message("user", "x" * 5000)
            await converged(coderd, agent)
            await process.wait_log("sink_write_failed")
            status, health = await process.get("/healthz")
            agent.add_message("agent", "uploads continue")
            await converged(coderd, agent)
    assert status == 200
    assert health["status"] == "degraded"
    assert health["reasons"][0].startswith("sink: ")


async def test_memory_is_bounded_by_the_snapshot_not_the_history(
    short_dir: Path,
) -> None:
    """Peak RSS after following 100 MB of history is within 10 MB of the peak after 1 MB."""
    sink = short_dir / "sink"
    sink.mkdir()
    env = env_for(short_dir, AGENT_SIDECAR_SINK_DIR=str(sink), AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_LOG_LEVEL="info")
    async with FakeAgentAPI(buffer=20_000) as agent, sidecar(agent, env) as process:
        async def follow(megabytes: int) -> int:
            agent.set_status("running")
            for _ in range(megabytes * 100):  # 10 KB messages
                role = "user" if agent.messages[-1].role == "agent" else "agent"
                agent.add_message(role, f"{len(agent.messages)} " + "m" * 10_000)
            agent.set_status("stable")
            await wait_for_file(sink / "local.json", agent.packed(), 60)
            return process.peak_rss_kib()

        after_1mb = await follow(1)
        after_100mb = await follow(99)
        assert len(agent.messages) > 10_000
    print(f"peak RSS: {after_1mb} KiB after 1 MB, {after_100mb} KiB after 100 MB")
    assert after_100mb - after_1mb <= 10 * 1024, (after_1mb, after_100mb)


def low_fd_limit() -> None:
    """In the child: 128 descriptors, so that 2 000 connections run it out (EMFILE)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_idle(path: str, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte. Blocking connects (on a thread): a Unix
    socket connect waits while the listen backlog is full, up to SO_SNDTIMEO."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
        sock.connect(path)
        held.append(sock)
    return held


async def test_2000_idle_connections_and_slowloris_at_the_fd_limit(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With 128 descriptors, 2 000 idle relay connections and a slowloris client cause no
    accept-error storm: the log and the CPU stay small, /healthz answers, the slow headers
    are cut off, and uploads keep flowing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_RELAY_HEADER_TIMEOUT_S="1")
    async with sidecar(agent, env, preexec=low_fd_limit) as process:
        assert process.proc is not None
        agent.add_message("user", "before the flood")
        await converged(coderd, agent)
        lines_before, cpu_before = len(process.raw), cpu_seconds(process.proc.pid)
        held = await asyncio.to_thread(open_idle, env["AGENT_SIDECAR_SOCKET"], 2000)
        try:
            agent.add_message("user", "during the flood")
            await converged(coderd, agent)
            assert (await process.get("/healthz"))[0] == 200

            loop = asyncio.get_running_loop()
            slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            slow.setblocking(False)
            await loop.sock_connect(slow, env["AGENT_SIDECAR_SOCKET"])
            started = loop.time()
            with contextlib.suppress(OSError):  # until the relay closes it
                await loop.sock_sendall(slow, b"POST /send HTTP/1.1\r\n")
                while loop.time() - started < 10:
                    await loop.sock_sendall(slow, b"X")
                    await asyncio.sleep(0.1)  # the attacker's pace
            cut_after = loop.time() - started
            slow.close()
        finally:
            for sock in held:
                sock.close()
        cpu = cpu_seconds(process.proc.pid) - cpu_before
        new_lines = process.raw[lines_before:]
    print(f"cpu {cpu:.2f}s, {len(new_lines)} log lines, slowloris cut after {cut_after:.2f}s")
    assert cut_after < 3
    assert process.events("relay_accept_failed"), "the scenario did not reach EMFILE"
    assert cpu < 10
    assert len(new_lines) < 100, new_lines[-5:]
    assert not [line for line in process.lines[lines_before:] if line["event"] == "<not json>"]
