"""The last writer at stop: the agentapi module's stop script uploads its last 10 messages and
then stops agentapi; the real sidecar process must write after it (field-notes.md §2)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from standins import FakeAgentAPI, FakeCoderd

from .sidecar import Sidecar, clean_env


@pytest.fixture
async def forty() -> AsyncIterator[FakeAgentAPI]:
    """agentapi holding a 40-message conversation, started before the sidecar."""
    agent = await FakeAgentAPI().start()
    agent.messages.clear()
    for i in range(40):
        agent.add_message("user" if i % 2 == 0 else "agent", f"message {i}: " + "m" * 200)
    try:
        yield agent
    finally:
        await agent.stop()


async def stop_script(agent: FakeAgentAPI, coderd: FakeCoderd, task: str) -> None:
    """What agentapi-shutdown.sh does: the last 10 messages of GET /messages, POSTed
    (pretty-printed, as jq writes it) with the agent token."""
    last10 = {"messages": agent.rest_messages()[-10:]}
    url = f"{coderd.url}api/v2/workspaceagents/me/tasks/{task}/log-snapshot?format=agentapi"
    async with aiohttp.ClientSession() as http, http.post(
        url, data=json.dumps(last10, indent=2), headers={
            "Coder-Session-Token": coderd.token, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 204


@pytest.mark.parametrize("ending", ["SIGTERM at once", "SIGKILL 4 s later"])
async def test_the_sidecar_writes_after_the_modules_stop_script(
    forty: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, ending: str,
) -> None:
    """In sync with 40 messages, then the stop script's 10-message upload, then agentapi
    stops: coderd ends up holding the sidecar's 40-message snapshot, whether the sidecar
    then gets SIGTERM at once (the final upload is made although coderd had accepted that
    body before) or SIGKILL 4 s later (the upload after agentapi went away), at the
    default settings, within 2 s of agentapi stopping."""
    agent = forty
    task_id = coderd.add_task()
    task = str(task_id)
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"), CODER_AGENT_URL=coderd.url,
                    CODER_AGENT_TOKEN=coderd.token, AGENT_SIDECAR_TASK_ID=task)
    ours = agent.packed()
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        await coderd.wait_for(lambda: coderd.snapshots.get(task_id) == ours)
        await stop_script(agent, coderd, task)
        assert len(json.loads(coderd.snapshots[task_id])["messages"]) == 10
        await agent.stop()  # the script's SIGTERM to agentapi: its streams end
        stopped = time.monotonic()
        if ending == "SIGTERM at once":
            sidecar.signal(signal.SIGTERM)
            assert await sidecar.wait() == 0
        else:
            await asyncio.sleep(4)  # the scenario's timing: the pod is killed 4 s later
            sidecar.signal(signal.SIGKILL)
            assert await sidecar.wait() == -signal.SIGKILL
            [again] = [u for u in coderd.uploads if u.at > stopped]
            assert again.body == ours
            assert again.at - stopped <= 2  # issue 9: at most 2 s at the defaults
    assert coderd.snapshots[task_id] == ours
    assert len(json.loads(ours)["messages"]) == 40
