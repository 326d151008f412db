"""`agent-sidecar run` without Coder: the local sink, and `agent-sidecar snapshot`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

from standins import FakeAgentAPI, wait_for_file

from .sidecar import Sidecar, clean_env

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


async def test_run_writes_the_sink_within_two_seconds_of_a_change(
    agent: FakeAgentAPI, short_dir: Path
) -> None:
    """With a sink set, each conversation change is in <sink>/<task-id>.json within 2 s."""
    sink = short_dir / "sink"
    sink.mkdir()
    task = uuid.uuid4()
    env = clean_env(AGENT_SIDECAR_SINK_DIR=str(sink), AGENT_SIDECAR_SOCKET=str(short_dir / "s"))
    async with Sidecar("--agentapi-url", agent.url, "--task-id", str(task), env=env) as sidecar:
        await sidecar.wait_log("ready")
        assert sidecar.events("uploads_disabled")[0]["reason"] == "no Coder URL configured"
        target = sink / f"{task}.json"
        assert not target.exists()  # a fresh agent with no user message is never written
        agent.add_message("user", "first question")
        await wait_for_file(target, agent.packed(), 2.0)
        agent.set_status("running")
        agent.add_message("agent", "┌─ answer ─┐ \"quoted\" …")
        agent.set_status("stable")
        await wait_for_file(target, agent.packed(), 2.0)
        assert not list(sink.glob(".*.tmp"))  # the temporary file was renamed into place
        assert await sidecar.stop() == 0


async def test_sink_is_local_json_without_a_task_id(agent: FakeAgentAPI, short_dir: Path) -> None:
    """Without a task id the sink file is local.json."""
    env = clean_env(AGENT_SIDECAR_SINK_DIR=str(short_dir),
                    AGENT_SIDECAR_SOCKET=str(short_dir / "s"))
    agent.add_message("user", "hello")
    async with Sidecar("--agentapi-url", agent.url, "--settle-s", "0", env=env) as sidecar:
        await wait_for_file(short_dir / "local.json", agent.packed(), 5.0)
        assert await sidecar.stop() == 0


def snapshot_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sidecar", "snapshot", *args], capture_output=True,
        env=clean_env(), timeout=60, check=False,
    )


async def test_snapshot_prints_a_body_coderd_accepts(agent: FakeAgentAPI, tmp_path: Path) -> None:
    """`snapshot` prints valid JSON within the cap, with RFC 3339 zoned times, and exits 0."""
    agent.add_message("user", "q" * 50_000)
    agent.add_message("agent", "é" * 40_000)
    proc = await asyncio.to_thread(snapshot_cli, "--agentapi-url", agent.url)
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout.rstrip(b"\n")
    assert len(body) <= 65536
    assert body == agent.packed()
    messages = json.loads(body)["messages"]
    assert all(RFC3339.match(m["time"]) for m in messages)
    out = tmp_path / "snap.json"
    proc = await asyncio.to_thread(snapshot_cli, "--agentapi-url", agent.url, "-o", str(out))
    assert proc.returncode == 0
    assert out.read_bytes() == body


def test_snapshot_fails_clearly_when_agentapi_is_unreachable() -> None:
    """`snapshot` exits 1 and says agentapi is unreachable when nothing listens."""
    proc = snapshot_cli("--agentapi-url", "http://127.0.0.1:9")
    assert proc.returncode == 1
    assert b"cannot read the conversation" in proc.stderr
    assert b"unreachable" in proc.stderr
