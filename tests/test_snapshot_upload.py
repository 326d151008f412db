"""`agent-sidecar snapshot --upload`: the drop-in for the module's shutdown script."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd, coder_error

from .sidecar import clean_env


def upload_cli(agent: FakeAgentAPI, coderd: FakeCoderd, *args: str,
               **env: str) -> subprocess.CompletedProcess[str]:
    task = env.pop("task", None) or str(coderd.add_task())
    environ = clean_env(CODER_AGENT_URL=coderd.url, CODER_AGENT_TOKEN=coderd.token,
                        AGENT_SIDECAR_TASK_ID=task, **env)
    return subprocess.run(
        [sys.executable, "-m", "agent_sidecar", "snapshot", "--upload",
         "--agentapi-url", agent.url, *args],
        capture_output=True, text=True, env=environ, timeout=60, check=False,
    )


async def test_upload_succeeds_and_stores_the_packed_conversation(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """It exits 0 and coderd holds exactly the packed conversation."""
    agent.add_message("user", "hello")
    agent.add_message("agent", "hi!")
    task = coderd.add_task()
    proc = await asyncio.to_thread(upload_cli, agent, coderd, task=str(task))
    assert proc.returncode == 0, proc.stderr
    assert coderd.snapshots[task] == agent.packed()
    assert "uploaded 3 messages" in proc.stderr


async def test_upload_retries_through_a_proxy_error(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """A 503 from a proxy is retried within --timeout."""
    agent.add_message("user", "hello")
    answers = [web.Response(status=503, text="no healthy upstream")]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return answers.pop() if answers else None

    coderd.hook = hook
    proc = await asyncio.to_thread(upload_cli, agent, coderd, "--timeout", "20",
                                   AGENT_SIDECAR_RETRY_INITIAL_S="0.1")
    assert proc.returncode == 0, proc.stderr
    assert [u.status for u in coderd.uploads] == [503, 204]


async def test_upload_failure_exits_1_with_the_server_message(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """A rejected token ends it at once with exit 1 and coderd's message on stderr."""
    agent.add_message("user", "hello")

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return coder_error(401, "Workspace agent not authorized.", "The agent cannot "
                           "authenticate until the workspace provision job has been completed.")

    coderd.hook = hook
    proc = await asyncio.to_thread(upload_cli, agent, coderd)
    assert proc.returncode == 1
    assert "upload failed: HTTP 401: Workspace agent not authorized." in proc.stderr
    assert coderd.token not in proc.stderr + proc.stdout


async def test_nothing_is_uploaded_without_a_user_message(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """A fresh agent's conversation is not uploaded over the stored history; exit 0."""
    proc = await asyncio.to_thread(upload_cli, agent, coderd)
    assert proc.returncode == 0
    assert "nothing uploaded" in proc.stderr
    assert coderd.uploads == []


async def test_upload_without_coder_settings_is_a_config_error(agent: FakeAgentAPI) -> None:
    """Without CODER_AGENT_URL it exits 2 and says what is missing."""
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent_sidecar", "snapshot", "--upload", "--agentapi-url",
         agent.url], capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    assert proc.returncode == 2
    assert "cannot upload: no Coder URL and no task id configured" in proc.stderr
