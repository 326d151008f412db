"""serve(): the whole pipeline in-process on real sockets, and the real process's signals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from standins import FakeAgentAPI, FakeCoderd, coder_error, hanging, wait_for_file

from agent_sidecar.config import Settings
from agent_sidecar.daemon import Controls, serve

from .conftest import until
from .sidecar import Sidecar, clean_env


def settings_for(agent: FakeAgentAPI, coderd: FakeCoderd | None, short_dir: Path,
                 **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "agentapi_url": agent.url, "coder_url": None, "coder_token": None,
        "coder_token_file": None, "task_id": None, "sink_dir": None,
        "socket": short_dir / "relay.sock", "reconnect_initial_s": 0.05,
    }
    if coderd is not None:
        values.update(coder_url=coderd.url, coder_token=SecretStr(coderd.token),
                      task_id=coderd.add_task())
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serving(settings: Settings, reload_settings: Callable[[], Settings] | None = None,
                  ) -> AsyncIterator[tuple[Controls, asyncio.Task[int]]]:
    controls = Controls()
    task = asyncio.create_task(serve(settings, controls, reload_settings=reload_settings))
    try:
        async with asyncio.timeout(10):
            ready = asyncio.create_task(controls.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()
        yield controls, task
    finally:
        controls.shutdown.set()
        await asyncio.gather(task, return_exceptions=True)


async def test_scripted_turn_is_stored_soon_after_stable_with_few_uploads(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A user turn and a 200-update, 5 s streamed reply: the final state is stored within
    settle_s + 1 s of stable, using at most ceil(5 / max_staleness_s) + 2 uploads."""
    settings = settings_for(agent, coderd, short_dir)
    [task] = coderd.tasks
    async with serving(settings):
        agent.set_status("running")
        agent.add_message("user", "Refactor the parser, please.")
        reply = agent.add_message("agent", "")
        for i in range(200):
            agent.update_message(reply.id, f"Working on it: step {i}\n" * (i // 10 + 1))
            await asyncio.sleep(0.025)  # the agent's typing pace over 5 s
        agent.set_status("stable")
        stable_at = time.monotonic()
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed(), 5)
        stored_at = coderd.uploads[-1].at
    assert stored_at - stable_at <= settings.settle_s + 1
    assert len(coderd.uploads) <= math.ceil(5 / settings.max_staleness_s) + 2
    assert all(u.status == 204 for u in coderd.uploads)


async def test_final_flush_uploads_from_memory_after_agentapi_died(
    coderd: FakeCoderd, short_dir: Path,
) -> None:
    """At shutdown the last state is uploaded even though agentapi is already gone."""
    agent = await FakeAgentAPI().start()
    settings = settings_for(agent, coderd, short_dir, settle_s=60, max_staleness_s=600)
    [task] = coderd.tasks
    async with serving(settings) as (controls, served):
        agent.add_message("user", "last words before the workspace stops")
        final = agent.packed()
        await agent.stop()
        controls.shutdown.set()
        assert await served == 0
    assert coderd.snapshots.get(task) == final


async def test_shutdown_holds_its_deadline_when_coderd_hangs(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With coderd hanging, serve() still returns by shutdown_timeout_s (+1 s)."""
    entered = asyncio.Event()
    coderd.hook = hanging(entered)
    settings = settings_for(agent, coderd, short_dir, settle_s=0, shutdown_timeout_s=1.0)
    async with serving(settings) as (controls, served):
        agent.add_message("user", "hello")
        async with asyncio.timeout(5):
            await entered.wait()
        started = time.monotonic()
        controls.shutdown.set()
        async with asyncio.timeout(settings.shutdown_timeout_s + 1):
            assert await served == 0
    assert time.monotonic() - started <= settings.shutdown_timeout_s + 1


async def test_the_final_upload_survives_an_outside_cancel(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """An application embedding serve() that cancels it during shutdown still gets the final
    upload made (it is shielded); serve() then ends cancelled."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse | None:
        arrived.set()
        await release.wait()  # coderd is slow to answer
        return None

    settings = settings_for(agent, coderd, short_dir, settle_s=60, max_staleness_s=600)
    [task] = coderd.tasks
    agent.add_message("user", "keep me")  # in the replay, so in the model once ready
    async with serving(settings) as (controls, served):
        coderd.hook = slow
        controls.shutdown.set()
        async with asyncio.timeout(5):
            await arrived.wait()
        served.cancel()  # the embedding application's own shutdown
        release.set()  # without the shield the upload would already have been abandoned
        with pytest.raises(asyncio.CancelledError):
            await served
    assert coderd.snapshots.get(task) == agent.packed()
    logged = [json.loads(line) for line in log_output.getvalue().splitlines()]
    [done] = [line for line in logged if line["event"] == "final_flush_done"]
    assert done["delivered"] is True  # the daemon saw coderd's 204, not a cancelled request


def logged(log_output: io.StringIO, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]


async def test_an_acp_reconcile_after_a_restart_never_wipes_the_stored_history(
    coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """Under ACP, when /messages answers [] after a turn (agentapi restarted) while the model
    holds [user 0, agent 1], the reconcile leaves no user message: coderd keeps the two
    messages it stored, through the uploads that follow and the final flush."""
    agent = FakeAgentAPI(version="v0.12-acp", chunks=2, chunk_delay_s=0.01)
    async with agent:
        settings = settings_for(agent, coderd, short_dir, settle_s=0)
        [task] = coderd.tasks
        async with serving(settings) as (controls, served):
            async with aiohttp.ClientSession() as http, http.post(
                    agent.url + "/message", json={"content": "hello", "type": "user"}) as resp:
                assert resp.status == 200
            stored = agent.packed()
            await coderd.wait_for(lambda: coderd.snapshots.get(task) == stored)
            agent.messages = []  # what a restarted agentapi lists, with no event said
            agent.set_status("running")
            agent.set_status("stable")  # a turn ends: the follower reconciles
            await until(lambda: bool(logged(log_output, "agentapi_messages_removed")))
            controls.shutdown.set()
            assert await served == 0
    assert logged(log_output, "agentapi_messages_removed")[0]["ids"] == [0, 1]
    assert coderd.snapshots[task] == stored
    assert all(json.loads(u.body)["messages"] for u in coderd.uploads)


async def test_a_replay_whose_user_message_is_pruned_is_uploaded(
    coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """A history of one user message, 1 200 agent messages and 3 000 `tool` messages that
    arrives as the replay of a connect is uploaded (the newest messages that fit) and again
    at the final flush, and counts every message, as the same history arriving live does."""
    agent = FakeAgentAPI()
    agent.add_message("user", "go through every file")
    for i in range(1200):
        agent.add_message("agent", f"step {i}")
    for i in range(3000):
        agent.add_message("tool", f"tool output {i}")
    async with agent:
        settings = settings_for(agent, coderd, short_dir, settle_s=0)
        [task] = coderd.tasks
        async with serving(settings) as (controls, served):
            await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
            controls.shutdown.set()
            assert await served == 0
    assert [u.body for u in coderd.uploads] == [agent.packed()] * 2  # and the final flush
    assert logged(log_output, "agentapi_following")[0]["messages"] == 4202


async def test_sink_mirrors_what_coderd_accepted(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With both Coder and a sink, the sink holds exactly the last accepted snapshot."""
    sink = short_dir / "sink"
    settings = settings_for(agent, coderd, short_dir, settle_s=0, sink_dir=sink)
    [task] = coderd.tasks
    async with serving(settings):
        agent.add_message("user", "mirror me")
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
    assert (sink / f"{task}.json").read_bytes() == coderd.snapshots[task]


async def test_without_coder_or_sink_it_follows_and_relays(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With nowhere to deliver snapshots, the daemon still follows, relays and shuts down
    cleanly (the relay fuzzer found this configuration crashing on the first user message)."""
    import aiohttp

    settings = settings_for(agent, None, short_dir, settle_s=0)
    async with serving(settings) as (controls, served):
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.post("http://x/send", json={"input": "hello"}) as resp:
            assert resp.status == 204
        await agent.wait_idle()
        controls.shutdown.set()
        assert await served == 0
    assert agent.received == [("user", "hello")]


async def test_uploads_off_is_said_once_with_the_reason(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Without a Coder URL the real process says once that uploads are off, and why."""
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"))
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        assert await sidecar.stop() == 0
    [line] = sidecar.events("uploads_disabled")
    assert line["reason"] == "no Coder URL and no task id configured"


async def test_a_second_sigint_exits_at_once(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """Ctrl+C twice does not wait for the final upload: the process exits 130 at once."""
    coderd.hook = hanging()
    task = coderd.add_task()
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"), CODER_AGENT_URL=coderd.url,
                    CODER_AGENT_TOKEN=coderd.token, AGENT_SIDECAR_TASK_ID=str(task),
                    AGENT_SIDECAR_SETTLE_S="60", AGENT_SIDECAR_SHUTDOWN_TIMEOUT_S="30")
    agent.add_message("user", "hello")
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        sidecar.signal(signal.SIGINT)
        await sidecar.wait_log("final_flush")
        sidecar.signal(signal.SIGINT)
        assert await sidecar.wait(timeout_s=5) == 130


async def test_status_and_health_describe_the_pipeline(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """/status reports agentapi and uploads without the token; /healthz is ok when both work."""
    import aiohttp

    settings = settings_for(agent, coderd, short_dir, settle_s=0)
    [task] = coderd.tasks
    async with serving(settings):
        agent.add_message("user", "hello")
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get("http://x/status") as resp:
                raw = await resp.text()
            async with http.get("http://x/healthz") as health:
                assert health.status == 200
                assert await health.json() == {"status": "ok"}
    status = json.loads(raw)
    assert coderd.token not in raw
    assert status["agentapi"]["connected"] is True
    assert status["agentapi"]["messages"] == 2
    assert status["uploads"]["enabled"] is True
    assert status["uploads"]["last_outcome"] == "accepted"
    assert status["uploads"]["last_success_at"] is not None
    assert status["relay"]["queue_length"] == 0


async def test_status_never_shows_a_url_password(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """A password in agentapi_url's userinfo is masked in /status and in the STATUS= line."""
    import aiohttp

    url = agent.url.replace("http://", "http://user:hunter2secret@")
    settings = settings_for(agent, None, short_dir, agentapi_url=url)
    async with serving(settings):
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.get("http://x/status") as resp:
            raw = await resp.text()
    assert "hunter2secret" not in raw
    assert json.loads(raw)["agentapi"]["url"].startswith("http://**********@127.0.0.1:")


async def test_a_late_second_sigterm_does_not_turn_a_clean_exit_into_killed(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """SIGTERM repeated while the process winds down after its shutdown (as systemd and
    Docker may) still ends in exit 0, never 'killed by SIGTERM'."""
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"))
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        sidecar.signal(signal.SIGTERM)
        await sidecar.wait_log("final_flush_done")
        assert sidecar.proc is not None
        for _ in range(2000):  # every millisecond until it has exited: the window is short
            if sidecar.proc.returncode is not None:
                break
            # os.kill, not send_signal: Popen.send_signal polls, and reaping the child here
            # would race asyncio's child watcher.
            with contextlib.suppress(ProcessLookupError):
                os.kill(sidecar.proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.001)
        code = await sidecar.wait()
        assert code == 0, "\n".join(sidecar.raw[-6:])


@pytest.mark.parametrize("coderd_says", ["tasks_unavailable", "retrying", "token_rejected"])
async def test_the_sink_keeps_the_newest_state_whatever_coderd_answers(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, coderd_says: str,
) -> None:
    """With Coder and a sink, a Coder without Tasks, one that is down or one that rejects
    the token does not stop the sink: it holds the newest conversation while running and
    after the shutdown."""
    sink = short_dir / "sink"
    settings = settings_for(agent, coderd, short_dir, settle_s=0, sink_dir=sink,
                            shutdown_timeout_s=1)
    [task] = coderd.tasks
    if coderd_says == "tasks_unavailable":
        coderd.tasks_served = False
    elif coderd_says == "retrying":
        async def down(request: web.Request) -> web.StreamResponse:
            return coder_error(503, "proxy says no")
        coderd.hook = down
    else:
        coderd.token = "00000000-0000-4000-8000-000000000000"  # not the daemon's token
    path = sink / f"{task}.json"
    sink.mkdir()  # for the file watch; the sidecar would make it
    async with serving(settings) as (controls, served):
        agent.add_message("user", "keep me locally")
        await wait_for_file(path, agent.packed(), 10)
        agent.add_message("agent", "and me, the last word")
        last = agent.packed()
        controls.shutdown.set()
        assert await served == 0
    assert path.read_bytes() == last
    assert task not in coderd.snapshots
