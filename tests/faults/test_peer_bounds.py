"""Fault injection: what an agentapi sends cannot grow the real `agent-sidecar run` process
(issue 15, items 5 and 6). Memory is measured as the growth of peak RSS (VmHWM)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from standins import FakeAgentAPI, sse_event, wait_for_file

from agent_sidecar.conversation import make_message
from agent_sidecar.simulator import SimMessage, serve_loopback
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack
from tests.faults.test_faults import env_for, sidecar

pytestmark = pytest.mark.faults

MIB = 1 << 20


def packed(messages: list[SimMessage]) -> bytes:
    """The snapshot body of `messages`, as the sidecar packs it."""
    return pack([make_message(m.id, m.role, m.content, m.time, CODERD_MAX_BODY_BYTES)
                 for m in messages], CODERD_MAX_BODY_BYTES).body


@contextlib.asynccontextmanager
async def flooding_agentapi(flood_mib: int, greeting: SimMessage, after: SimMessage,
                            flooded: asyncio.Event) -> AsyncIterator[FakeAgentAPI]:
    """An agentapi whose /events replays `greeting`, then sends one line of `flood_mib` MiB
    that does not end until all of it is written, then `after`; /status and /messages are
    a stand-in's. Sets `flooded` once the whole line was written."""
    agent = FakeAgentAPI()
    agent.messages = [greeting]

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(sse_event("message_update", greeting.sse()))
            await resp.write(sse_event("status_change", {"status": "stable"}))
            await resp.write(b"event: message_update\ndata: ")
            block = b"x" * MIB
            for _ in range(flood_mib):
                await resp.write(block)  # waits while the sidecar has not read it
            await resp.write(b"\n\n")
            flooded.set()
            await resp.write(sse_event("message_update", after.sse()))
            await asyncio.Event().wait()
        return resp

    app = web.Application()
    app.add_routes([web.get("/events", events),
                    *(r for r in agent.routes() if r.path != "/events")])
    runner, port = await serve_loopback(app, "127.0.0.1", 0)
    agent.port = port
    try:
        yield agent
    finally:
        await runner.cleanup()


async def test_a_300_mib_line_without_an_end_does_not_grow_memory(short_dir: Path) -> None:
    """A 300 MiB SSE line with no line end, under a 64 KiB max_event_bytes, is dropped as it
    arrives: peak RSS grows by less than 20 MiB, and the next event is followed."""
    sink = short_dir / "sink"
    sink.mkdir()
    greeting = SimMessage(0, "user", "hello")
    after = SimMessage(1, "agent", "after the flood")
    flooded = asyncio.Event()
    env = env_for(short_dir, AGENT_SIDECAR_SINK_DIR=str(sink), AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_MAX_EVENT_BYTES="65536", AGENT_SIDECAR_LOG_LEVEL="info")
    async with flooding_agentapi(300, greeting, after, flooded) as agent, \
            sidecar(agent, env) as process:
        await process.wait_log("agentapi_following")
        before = process.peak_rss_kib()
        async with asyncio.timeout(60):
            await flooded.wait()
        await wait_for_file(sink / "local.json", packed([greeting, after]), 30)
        peak = process.peak_rss_kib()
        assert process.events("agentapi_event_too_large")
    print(f"peak RSS: {before} KiB before a 300 MiB line, {peak} KiB after")
    assert peak - before < 20 * 1024, (before, peak)


async def test_30000_messages_never_sent_do_not_grow_memory(short_dir: Path) -> None:
    """30 000 messages that never reach a snapshot (20 000 with role `tool` and 4 KiB each,
    10 000 empty ones) grow peak RSS by less than 20 MiB, and the snapshot is still exact."""
    sink = short_dir / "sink"
    sink.mkdir()
    env = env_for(short_dir, AGENT_SIDECAR_SINK_DIR=str(sink), AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_LOG_LEVEL="info")
    async with FakeAgentAPI(buffer=40_000) as agent, sidecar(agent, env) as process:
        agent.add_message("user", "start")
        await wait_for_file(sink / "local.json", agent.packed(), 30)
        before = process.peak_rss_kib()
        agent.set_status("running")
        for i in range(30_000):
            if i % 3 == 2:
                agent.add_message("agent", "")
            else:
                agent.add_message("tool", f"{i} " + "t" * 4096)
        agent.add_message("user", "the end")
        agent.set_status("stable")
        await wait_for_file(sink / "local.json", agent.packed(), 60)
        peak = process.peak_rss_kib()
    print(f"peak RSS: {before} KiB before 30 000 unsent messages, {peak} KiB after")
    assert peak - before < 20 * 1024, (before, peak)
