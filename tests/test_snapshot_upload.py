"""`agent-sidecar snapshot --upload`: the drop-in for the module's shutdown script."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from aiohttp import web
from standins import (
    FakeAgentAPI,
    FakeCoderd,
    ForwardProxy,
    coder_error,
    front_body_limit,
    redirecting,
)

from .sidecar import clean_env


def upload_cli(agent: FakeAgentAPI, coderd: FakeCoderd, *args: str,
               **env: str) -> subprocess.CompletedProcess[str]:
    task = env.pop("task", None) or str(coderd.add_task())
    environ = clean_env(**{"CODER_AGENT_URL": coderd.url, "CODER_AGENT_TOKEN": coderd.token,
                           "AGENT_SIDECAR_TASK_ID": task, **env})
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


async def test_upload_goes_through_the_proxy_like_run(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """With HTTP_PROXY set, `snapshot --upload` reaches coderd through the proxy (absolute
    form), reads agentapi on 127.0.0.1 directly, and warns about plain http, as `run` does."""
    agent.add_message("user", "hello")
    name = f"coderd.invalid:{coderd.port}"
    task = coderd.add_task()
    async with ForwardProxy({name: ("127.0.0.1", coderd.port)}) as proxy:
        proc = await asyncio.to_thread(upload_cli, agent, coderd, task=str(task),
                                       CODER_AGENT_URL=f"http://{name}/",
                                       HTTP_PROXY=proxy.url)
    assert proc.returncode == 0, proc.stderr
    assert coderd.snapshots[task] == agent.packed()
    assert [r.target.startswith(f"http://{name}/") for r in proxy.requests] == [True]
    assert "coder_url_plain_http" in proc.stderr


async def test_upload_follows_a_308_front_on_the_same_host_like_run(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """A 308 to the same host is followed with the body, as `run` does."""
    agent.add_message("user", "hello")
    task = coderd.add_task()

    async def moved(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/old/"):
            return await redirecting(308, lambda r: str(r.url).replace("/old/", "/", 1))(
                request)
        return None

    coderd.hook = moved
    proc = await asyncio.to_thread(upload_cli, agent, coderd, task=str(task),
                                   CODER_AGENT_URL=coderd.url + "old/")
    assert proc.returncode == 0, proc.stderr
    assert coderd.snapshots[task] == agent.packed()


async def test_upload_refuses_a_307_to_another_host_like_run(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """A 307 to another host is not followed: exit 1 naming the Location without its query,
    and the other host never sees the token."""
    agent.add_message("user", "hello")
    # Another host on the same port, so that only the host differs.
    async with FakeCoderd(host="127.0.0.2", port=coderd.port) as other:
        elsewhere = f"http://127.0.0.2:{other.port}/collect"
        coderd.hook = redirecting(307, lambda r: f"{elsewhere}?sig=s3cr3t")
        proc = await asyncio.to_thread(upload_cli, agent, coderd)
    assert proc.returncode == 1
    assert other.uploads == []
    [line] = [x for x in proc.stderr.splitlines() if "upload failed" in x]
    assert line.startswith("agent-sidecar: upload failed: HTTP 307")
    assert elsewhere in line
    assert "s3cr3t" not in proc.stderr


async def test_upload_fits_a_16kib_front_like_run(
    agent: FakeAgentAPI, coderd: FakeCoderd,
) -> None:
    """Behind a 16 KiB front the upload shrinks until it fits: exit 0, and the stored
    snapshot is at most 16 KiB with the newest message."""
    for i in range(6):
        agent.add_message("user" if i % 2 == 0 else "agent", f"turn {i}: " + "w" * 4000)
    agent.add_message("user", "the newest message")
    task = coderd.add_task()
    coderd.hook = front_body_limit(16 * 1024)
    proc = await asyncio.to_thread(upload_cli, agent, coderd, task=str(task))
    assert proc.returncode == 0, proc.stderr
    body = coderd.snapshots[task]
    assert len(body) <= 16 * 1024
    assert json.loads(body)["messages"][-1]["content"] == "the newest message"
    assert f"{len(body)} bytes" in proc.stderr


async def test_upload_on_a_coder_without_tasks_exits_1_with_the_reason(
    agent: FakeAgentAPI,
) -> None:
    """Against a Coder without Tasks it exits 1 with the Tasks-unavailable message, worded
    for coderd's version, and never says "upgrade"."""
    agent.add_message("user", "hello")
    async with FakeCoderd(version="v2.36.2") as coderd:
        coderd.tasks_served = False
        proc = await asyncio.to_thread(upload_cli, agent, coderd)
    assert proc.returncode == 1
    [line] = [x for x in proc.stderr.splitlines() if "upload failed" in x]
    assert line.startswith("agent-sidecar: upload failed: Tasks unavailable (HTTP 404: "
                           "Route not found.): coderd v2.36.2 serves Coder Tasks, and its "
                           "log-snapshot endpoint, only when an admin sets "
                           "CODER_ENABLE_AI_TASKS=true")
    assert "upgrade" not in proc.stderr.lower()
