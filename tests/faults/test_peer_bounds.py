"""Fault injection: what an agentapi sends cannot grow the real `agent-sidecar run` process
(issue 15, items 5 and 6), and at the default caps its worst case fits the pod example's
memory limit. Memory is measured as peak RSS (VmHWM)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from standins import FakeAgentAPI, sse_event, wait_for_file

from agent_sidecar.config import Settings
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


POD = Path(__file__).parents[2] / "deploy" / "kubernetes-pod.yaml"
ASTRAL = "\U0001f600"  # one character outside the BMP makes Python hold 4 bytes a character


def pod_memory_limit_kib() -> int:
    """The agent-sidecar container's memory limit in the pod example, KiB."""
    pod = yaml.safe_load(POD.read_text())
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == "agent-sidecar"]
    limit = str(container["resources"]["limits"]["memory"])
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 1024


async def test_the_worst_case_at_the_default_caps_fits_the_pod_limit(short_dir: Path) -> None:
    """At the default caps, the largest event that is kept (its text with an emoji) grows
    peak RSS by at most 10x max_event_bytes; `send --reply` reading a /messages as large as
    max_agentapi_response_bytes, of messages that large, by at most 24x max_event_bytes
    (two elements parsed at once, the reply's and the follower's, and the heap's
    fragmentation; nothing in proportion to the history); and that peak, plus one more
    event parsed meanwhile, stays within 80% of the pod example's memory limit."""
    defaults = Settings.model_fields
    event_cap = int(defaults["max_event_bytes"].default)
    body_cap = int(defaults["max_agentapi_response_bytes"].default)
    sink = short_dir / "sink"
    sink.mkdir()
    env = env_for(short_dir, AGENT_SIDECAR_SINK_DIR=str(sink), AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_LOG_LEVEL="info")
    # Texts as large as the event cap allows (the SSE event of one adds ~120 bytes of JSON
    # and writes the emoji as a 12-byte escape), as many as fill /messages to its cap.
    size = event_cap - 400
    count = (body_cap - 16000) // (size + 200)
    one = "x" * size + ASTRAL
    async with FakeAgentAPI(chunk_delay_s=0.01, stable_after_s=0.05) as agent, \
            sidecar(agent, env) as process:
        agent.add_message("user", "hello")
        await wait_for_file(sink / "local.json", agent.packed(), 30)
        baseline = process.peak_rss_kib()
        agent.add_message("agent", one)
        await wait_for_file(sink / "local.json", agent.packed(), 30)
        after_event = process.peak_rss_kib()
        assert not process.events("agentapi_event_too_large")
        for i in range(count - 1):
            agent.add_message("agent", f"{i:04d}" + one[4:])
        await wait_for_file(sink / "local.json", agent.packed(), 60)
        history = len(json.dumps({"messages": agent.rest_messages()}))
        assert history > body_cap * 0.9, (history, body_cap)
        connector = aiohttp.UnixConnector(path=env["AGENT_SIDECAR_SOCKET"])
        async with aiohttp.ClientSession(connector=connector) as http, http.post(
                "http://sidecar/send",
                json={"input": "hi", "type": "user", "reply": True, "wait_s": 30}) as resp:
            assert resp.status == 200, await resp.text()
        after_reply = process.peak_rss_kib()
        assert not process.events("relay_reply_from_view")  # it did read /messages
        assert not process.events("agentapi_messages_dropped")
    limit = pod_memory_limit_kib()
    print(f"VmHWM: {baseline} KiB following; {after_event} KiB after a {event_cap}-byte "
          f"event; {after_reply} KiB after --reply read a {history}-byte /messages; "
          f"pod limit {limit} KiB")
    assert after_event - baseline < 10 * event_cap // 1024, (baseline, after_event)
    assert after_reply - baseline < 24 * event_cap // 1024, (baseline, after_reply)
    assert after_reply + 8 * event_cap // 1024 < 0.8 * limit, (after_reply, limit)
