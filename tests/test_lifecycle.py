"""serve()'s lifecycle and the pipeline it runs: cancel, force, reload, supervision, STATUS=."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd, coder_error, hanging

from agent_sidecar.config import Settings
from agent_sidecar.daemon import Controls, serve
from agent_sidecar.pipeline import LIVE_SETTINGS, PROCESS_SETTINGS, Pipeline
from agent_sidecar.sdnotify import Notifier
from agent_sidecar.uploader import Uploader

from .conftest import Datagrams, until
from .test_daemon import serving, settings_for

SRC = Path(__file__).resolve().parent.parent / "src" / "agent_sidecar"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refuses(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


async def test_cancelling_serve_makes_the_final_upload_and_closes_every_listener(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """Cancelling the task that runs serve() is a graceful shutdown: the final upload is
    made, the relay socket and the metrics listener are closed, then the cancel propagates."""
    port = free_port()
    settings = settings_for(agent, coderd, short_dir, settle_s=60, max_staleness_s=600,
                            metrics_addr=f"127.0.0.1:{port}")
    [task] = coderd.tasks
    agent.add_message("user", "keep me when the embedding program stops")
    async with serving(settings) as (_, served):
        assert not refuses("127.0.0.1", port)
        served.cancel()  # how an embedding program stops it: no event is set
        with pytest.raises(asyncio.CancelledError):
            await served
    assert coderd.snapshots.get(task) == agent.packed()
    assert [u.status for u in coderd.uploads] == [204]
    assert not settings.socket.exists()
    assert refuses("127.0.0.1", port)


async def test_force_cuts_the_final_upload_short_and_returns_130(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """With coderd hanging and a long deadline, Controls.force (a second Ctrl+C) cancels the
    in-flight final upload and serve() returns 130 within a second."""
    entered = asyncio.Event()
    settings = settings_for(agent, coderd, short_dir, settle_s=60, max_staleness_s=600,
                            shutdown_timeout_s=60)
    agent.add_message("user", "hello")
    async with serving(settings) as (controls, served):
        coderd.hook = hanging(entered)
        controls.shutdown.set()
        async with asyncio.timeout(5):
            await entered.wait()
        forced_at = time.monotonic()
        controls.force.set()
        async with asyncio.timeout(1):
            assert await served == 130
    assert time.monotonic() - forced_at < 1
    events = [json.loads(line)["event"] for line in log_output.getvalue().splitlines()]
    assert "final_flush_forced" in events
    assert "final_flush_done" not in events


async def test_final_flush_timed_out_names_the_flush_attempt_not_an_earlier_one(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """When the deadline cuts the final upload short, the log says no attempt of the flush
    finished, rather than repeating the outcome of the upload before it."""
    settings = settings_for(agent, coderd, short_dir, settle_s=0, shutdown_timeout_s=0.5)
    [task] = coderd.tasks
    agent.add_message("user", "first")
    entered = asyncio.Event()
    async with serving(settings) as (controls, served):
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
        coderd.hook = hanging(entered)
        agent.add_message("user", "second, never stored")
        async with asyncio.timeout(5):
            await entered.wait()
        controls.shutdown.set()
        assert await served == 0
    logged = [json.loads(line) for line in log_output.getvalue().splitlines()]
    [timed_out] = [line for line in logged if line["event"] == "final_flush_timed_out"]
    assert timed_out["outcome"] == "no attempt finished"
    assert timed_out["outcome"] != "accepted"


async def test_a_reload_reports_exactly_the_settings_it_applied(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """Live settings are applied to every component and reported as applied; the others are
    reported as needing a restart (or as the process's) and keep their old values."""
    settings = settings_for(agent, coderd, short_dir, upload_timeout_s=5)
    coderd.hook = hanging()
    async with Pipeline(settings) as pipeline:
        new = settings.model_copy(update={
            "upload_timeout_s": 0.2, "reconnect_max_s": 3.0, "max_event_bytes": 1 << 20,
            "poll_interval_s": 2.0, "send_wait_s": 7.0, "socket": short_dir / "other.sock",
            "agentapi_url": "http://127.0.0.1:1", "log_level": "debug",
            "log_format": "console",
        })
        result = pipeline.reload(new)
        assert result.applied == ["max_event_bytes", "poll_interval_s", "reconnect_max_s",
                                  "send_wait_s", "upload_timeout_s"]
        assert result.need_restart == ["agentapi_url", "log_format", "socket"]
        assert result.for_process == ["log_level"]
        for component in (pipeline.agentapi, pipeline.coder, pipeline.uploader,
                          pipeline.relay):
            assert component is not None
            assert component.settings is pipeline.settings
        assert pipeline.settings.socket == settings.socket
        assert pipeline.settings.upload_timeout_s == 0.2
        # Applied means in effect: the next attempt times out after the new 0.2 s.
        assert pipeline.coder is not None
        started = time.monotonic()
        outcome = await pipeline.coder.upload(b'{"messages":[]}')
        assert time.monotonic() - started < 2
        assert outcome.message == "timed out after 0.2s"


async def test_a_reloaded_max_event_bytes_applies_to_the_open_stream(
    agent: FakeAgentAPI, short_dir: Path, log_output: io.StringIO,
) -> None:
    """Lowering max_event_bytes by a reload drops the next larger event on the stream that
    is already open, not only after a reconnect."""
    settings = settings_for(agent, None, short_dir)
    smaller = settings.model_copy(update={"max_event_bytes": 65536})
    async with serving(settings, reload_settings=lambda: smaller) as (controls, served):
        controls.reload.set()
        await until(lambda: "config_reloaded" in log_output.getvalue())
        agent.add_message("agent", "x" * 100_000)
        await until(lambda: "agentapi_event_too_large" in log_output.getvalue())
        assert agent.subscribers == 1  # the same stream: no reconnect was needed
        controls.shutdown.set()
        assert await served == 0


def test_every_live_setting_is_read_at_use_time_by_some_component() -> None:
    """A live setting that no component reads through its `settings` would be reported as
    applied while doing nothing; every one of them is read somewhere."""
    sources = "\n".join(p.read_text() for p in SRC.glob("*.py")
                        if p.name not in ("config.py", "pipeline.py"))
    unread = [n for n in sorted(LIVE_SETTINGS) if not re.search(rf"settings\.{n}\b", sources)]
    assert unread == []
    assert not LIVE_SETTINGS & PROCESS_SETTINGS
    assert set(Settings.model_fields) >= LIVE_SETTINGS | PROCESS_SETTINGS


async def test_a_crashed_component_is_restarted_and_the_daemon_carries_on(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception in a component is logged and the component restarted after a
    back-off; uploads go on and the exit code stays 0."""
    real_run = Uploader.run
    crashes = 0

    async def crash_once(self: Uploader) -> None:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise RuntimeError("a bug")
        await real_run(self)

    monkeypatch.setattr(Uploader, "run", crash_once)
    settings = settings_for(agent, coderd, short_dir, settle_s=0)
    [task] = coderd.tasks
    async with serving(settings) as (controls, served):
        agent.add_message("user", "still uploaded after the crash")
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
        controls.shutdown.set()
        assert await served == 0
    logged = [json.loads(line) for line in log_output.getvalue().splitlines()]
    [crash] = [line for line in logged if line["event"] == "component_crashed"]
    assert crash["component"] == "uploader"
    assert crash["error"] == "RuntimeError: a bug"


async def test_systemd_status_follows_every_change_and_never_goes_stale(
    coderd: FakeCoderd, short_dir: Path,
) -> None:
    """STATUS= says it is waiting while agentapi is not up, then READY=1; after a burst of
    changes the last line is the final state, and an uploader state change refreshes it."""
    grams = Datagrams(str(short_dir / "notify"))
    agent = FakeAgentAPI(chunk_delay_s=0.01, stable_after_s=0.05)
    agent.port = free_port()  # not listening yet
    settings = settings_for(agent, coderd, short_dir, settle_s=0, shutdown_timeout_s=0.5)
    [task] = coderd.tasks
    controls = Controls()
    notifier = Notifier({"NOTIFY_SOCKET": grams.address})
    served = asyncio.create_task(serve(settings, controls, notifier=notifier))
    try:
        await grams.until(f"STATUS=waiting for agentapi at {agent.url}")
        async with agent:
            await grams.until("READY=1")
            agent.set_status("running")
            for i in range(5):  # a burst, well inside one STATUS interval
                agent.add_message("user" if i == 0 else "agent", f"step {i}")
            agent.set_status("stable")
            await grams.until("STATUS=following agentapi, 6 messages, agent stable, "
                              "uploads ok")
            await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())

            async def unavailable(request: web.Request) -> web.StreamResponse:
                return coder_error(503, "proxy says no")

            coderd.hook = unavailable
            agent.add_message("user", "one more")
            await grams.until("STATUS=following agentapi, 7 messages, agent stable, "
                              "uploads retrying", timeout_s=15)
            controls.shutdown.set()
            assert await served == 0
    finally:
        grams.close()
        if not served.done():
            served.cancel()
        await asyncio.gather(served, return_exceptions=True)


async def test_the_relay_answers_while_a_component_is_being_restarted(
    agent: FakeAgentAPI, short_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A follower that keeps crashing does not take the relay socket down with it."""
    from agent_sidecar.agentapi import AgentAPI

    async def always_crash(self: AgentAPI, conversation: object) -> None:
        raise RuntimeError("follower bug")

    monkeypatch.setattr(AgentAPI, "follow", always_crash)
    settings = settings_for(agent, None, short_dir)
    controls = Controls()
    served = asyncio.create_task(serve(settings, controls))
    try:
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http:
            async def status() -> int:
                async with http.get("http://x/status") as resp:
                    return resp.status

            await until(settings.socket.exists)
            async with asyncio.timeout(10):
                assert await status() == 200
                assert await status() == 200
        controls.shutdown.set()
        assert await served == 0
    finally:
        if not served.done():
            served.cancel()
        await asyncio.gather(served, return_exceptions=True)


async def test_livez_names_a_core_task_that_stopped(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """/livez is 200 while the follower and uploader run, and 503 naming the one that ended
    (which supervision makes impossible short of a bug in it)."""
    settings = settings_for(agent, None, short_dir)
    async with serving(settings):
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get("http://x/livez") as resp:
                assert resp.status == 200
            [follower] = [t for t in asyncio.all_tasks()
                          if t.get_name() == "agent-sidecar-follower"]
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            async with http.get("http://x/livez") as resp:
                assert resp.status == 503
                assert (await resp.json())["reasons"] == ["follower: stopped"]
