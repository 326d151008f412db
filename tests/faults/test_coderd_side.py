"""Fault injection on the coderd side: the real `agent-sidecar run` process against a coderd
that fails for good, a Coder without Tasks, an agentapi that flaps, and tokens that a
header cannot carry or that cannot be read without blocking."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd

from tests.faults.test_faults import converged, env_for, sidecar, stored
from tests.sidecar import Sidecar, clean_env, refusals

pytestmark = pytest.mark.faults


async def test_2000_consecutive_failures_do_not_overflow_the_back_off(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With a shrunken back-off, coderd answers 503 two thousand times in a row (past the
    1 025 failures at which 2**n overflows a float): no component crashes, and the
    snapshot lands once coderd recovers; the shutdown after it is clean."""
    failures = 2000

    async def down(request: web.Request) -> web.StreamResponse | None:
        if len(coderd.uploads) < failures:
            return web.Response(status=503, text="no healthy upstream")
        return None

    coderd.hook = down
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_RETRY_INITIAL_S="0.0001", AGENT_SIDECAR_RETRY_MAX_S="0.001",
                  AGENT_SIDECAR_LOG_LEVEL="info")
    async with Sidecar("--agentapi-url", agent.url, env=env) as process:
        await process.wait_log("ready")
        agent.add_message("user", "keep trying")
        await converged(coderd, agent, timeout_s=60)
        assert len(coderd.uploads) > failures
        process.signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert not process.events("component_crashed")
    assert not process.events("uploader_error")
    assert not [line for line in process.raw if "Traceback" in line]


async def test_a_token_with_surrounding_whitespace_works_and_one_a_header_cannot_carry_is_exit_2(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """CODER_AGENT_TOKEN ending in a newline is the same token and uploads work; one with a
    CR/LF inside stops `run` with exit 2 and one line naming the setting and where it came
    from, never the value, and no traceback."""
    env = env_for(short_dir, coderd, CODER_AGENT_TOKEN=coderd.token + "\n",
                  AGENT_SIDECAR_SETTLE_S="0")
    async with sidecar(agent, env):
        agent.add_message("user", "hello")
        await converged(coderd, agent)
    bad = env_for(short_dir, coderd, CODER_AGENT_TOKEN=coderd.token[:8] + "\r\nX-Evil: 1")
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent_sidecar", "run", "--agentapi-url",
                         agent.url], capture_output=True, text=True, env=bad, timeout=30,
        check=False)
    assert proc.returncode == 2
    [line] = refusals(proc.stderr)
    assert line.startswith("invalid coder_token (from env CODER_AGENT_TOKEN): "
                           "holds a control character (U+000D)")
    assert coderd.token[:8] not in proc.stderr


async def test_a_token_file_rewritten_with_garbage_keeps_the_old_token(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A token file rewritten with CR/LF inside, then with bytes that are not UTF-8, is
    refused on reload: the old token is kept, uploads go on, the shutdown is clean."""
    token_file = short_dir / "token"
    token_file.write_text(coderd.token + "\n")
    env = env_for(short_dir, coderd, CODER_AGENT_TOKEN="", AGENT_SIDECAR_SETTLE_S="0",
                  CODER_AGENT_TOKEN_FILE=str(token_file))
    async with Sidecar("--agentapi-url", agent.url, env=env) as process:
        await process.wait_log("ready")
        for garbage in (b"abc\r\nX-Evil: 1\n", b"\xff\xfe\x00garbage"):
            start = len(process.lines)
            token_file.write_bytes(garbage)
            await process.wait_log("token_reload_failed", start=start)
            agent.add_message("user", f"after {garbage[:3]!r}")
            await converged(coderd, agent)
        process.signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert process.events("final_flush_done")[0]["delivered"] is True
    assert not [line for line in process.raw if "Traceback" in line or "X-Evil" in line]


async def test_a_fifo_as_the_token_file_never_wedges_the_daemon(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A FIFO as the token file is refused at start (exit 2, at once, naming it); swapped
    in for the file while running, it is refused on reload while /healthz keeps answering
    and SIGTERM still ends the process within its deadline."""
    fifo = short_dir / "fifo"
    os.mkfifo(fifo)
    task = coderd.add_task()
    env = env_for(short_dir, coderd, task, CODER_AGENT_TOKEN="",
                  CODER_AGENT_TOKEN_FILE=str(fifo))
    started = time.monotonic()
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent_sidecar", "run", "--agentapi-url",
                         agent.url], capture_output=True, text=True, env=env, timeout=30,
        check=False)
    assert proc.returncode == 2
    assert time.monotonic() - started < 10
    assert f"coder_token_file {fifo} (from env CODER_AGENT_TOKEN_FILE): not a regular file " \
           "(a FIFO)" in proc.stderr

    token_file = short_dir / "token"
    token_file.write_text(coderd.token)
    env = env_for(short_dir, coderd, task, CODER_AGENT_TOKEN="", AGENT_SIDECAR_SETTLE_S="0",
                  CODER_AGENT_TOKEN_FILE=str(token_file), AGENT_SIDECAR_SHUTDOWN_TIMEOUT_S="3")
    async with Sidecar("--agentapi-url", agent.url, env=env) as process:
        await process.wait_log("ready")
        agent.add_message("user", "hello")
        await converged(coderd, agent)
        start = len(process.lines)
        fifo.rename(token_file)  # a FIFO where the token file was
        await process.wait_log("token_reload_failed", start=start)
        status, health = await process.get("/healthz")
        assert status == 200, health
        stopping = time.monotonic()
        process.signal(signal.SIGTERM)
        assert await process.wait(timeout_s=5) == 0
    assert time.monotonic() - stopping < 4


async def test_a_huge_token_file_is_refused_unread(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A 300 MiB token file is refused by its size with exit 2; under a 1 GiB address-space
    limit, which reading and decoding it would exceed, the process never runs out."""
    token_file = short_dir / "token"
    with token_file.open("wb") as fh:
        fh.truncate(300 << 20)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = env_for(short_dir, coderd, CODER_AGENT_TOKEN="", CODER_AGENT_TOKEN_FILE=str(token_file))
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent_sidecar", "run", "--agentapi-url",
                         agent.url], capture_output=True, text=True, env=env, timeout=30,
        check=False, preexec_fn=limit_memory)
    assert proc.returncode == 2, proc.stderr
    assert "over max_token_file_bytes=65536" in proc.stderr
    assert "MemoryError" not in proc.stderr


async def test_tasks_removed_leaves_the_sidecar_alive_healthy_and_relaying(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Against a Coder without Tasks the real process stays up and healthy (`check` exits
    0), relays input, shows tasks_unavailable and coderd's version, says so once without
    the word "upgrade", re-checks every rejected_backoff_s, and stores the snapshot once an
    admin turns Tasks on."""
    async with FakeCoderd(version="v2.37.0+deadbee") as coderd:
        coderd.tasks_served = False
        env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                      AGENT_SIDECAR_REJECTED_BACKOFF_S="0.3")
        async with sidecar(agent, env) as process:
            agent.add_message("user", "is anyone storing this?")
            await coderd.wait_for(lambda: len(coderd.uploads) >= 4)  # re-checked, again
            status, health = await process.get("/healthz")
            assert (status, health) == (200, {"status": "ok"})
            _, state = await process.get("/status")
            assert state["uploads"]["state"] == "tasks_unavailable"
            assert state["coderd"]["version"] == "v2.37.0+deadbee"
            cli = {"AGENT_SIDECAR_SOCKET": env["AGENT_SIDECAR_SOCKET"]}
            checked, shown, sent = await asyncio.gather(*(
                asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent_sidecar",
                                                   *args], capture_output=True, text=True,
                                  env=clean_env(**cli), timeout=60, check=False)
                for args in (["check"], ["status"], ["send", "still relaying?"])))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "tasks_unavailable" in shown.stdout
            assert sent.returncode == 0, sent.stderr
            await agent.wait_idle()
            assert ("user", "still relaying?") in agent.received
            coderd.tasks_served = True  # the admin sets CODER_ENABLE_AI_TASKS=true
            await converged(coderd, agent)
        said = process.events("upload_tasks_unavailable")
        assert len(said) == 1
        for words in ("coderd v2.37.0+deadbee", "removed in v2.37", "CODER_ENABLE_AI_TASKS",
                      "the sink and the relay keep working"):
            assert words in said[0]["hint"]
        assert "upgrade" not in "\n".join(process.raw).lower()


async def test_a_flapping_agentapi_causes_no_upload_storm(
    coderd: FakeCoderd, short_dir: Path,
) -> None:
    """agentapi stopping and starting again every 0.1 s for 3 s, with the reupload interval
    scaled as 60 s is to 30 s (1.5 s here), costs at most 3 extra uploads, and at least one
    is made; the real process stays up."""
    agent = await FakeAgentAPI().start()
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_REUPLOAD_SETTLE_S="0.025",
                  AGENT_SIDECAR_REUPLOAD_MIN_INTERVAL_S="1.5")
    try:
        async with sidecar(agent, env) as process:
            agent.add_message("user", "steady")
            await converged(coderd, agent)
            before = len(coderd.uploads)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < 3:
                await agent.stop(clean=False)
                await asyncio.sleep(0.05)  # agentapi's flapping pace
                await agent.start()
                await asyncio.sleep(0.05)
            end = time.monotonic()
            extra = [u for u in coderd.uploads[before:] if u.at <= end]
            assert 1 <= len(extra) <= 3
            assert all(u.body == stored(coderd) for u in extra)
            assert len(process.events("reupload_after_agentapi_gone")) == len(extra)
    finally:
        await agent.stop()
