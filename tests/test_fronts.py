"""What sits between the workspace and coderd, on real loopback sockets: a forward proxy, a
front that redirects, a front with a small body limit; and what /healthz and /status say."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd, ForwardProxy, front_body_limit, redirecting

from agent_sidecar.coder import api_path_warning
from agent_sidecar.config import Settings

from .conftest import until
from .test_daemon import serving, settings_for


async def get(settings: Settings, path: str) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(settings.socket))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.get(f"http://sidecar{path}") as resp:
        return resp.status, await resp.json()


def stored(coderd: FakeCoderd) -> bytes | None:
    [task] = coderd.tasks
    return coderd.snapshots.get(task)


def logged(log_output: io.StringIO, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in log_output.getvalue().splitlines()]
    return [x for x in lines if x["event"] == event]


async def test_a_forward_proxy_carries_coderd_requests_and_never_agentapi(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
    monkeypatch: pytest.MonkeyPatch, log_output: io.StringIO,
) -> None:
    """With HTTP_PROXY set, uploads (and buildinfo) reach a coderd the workspace cannot
    resolve through the proxy, in absolute form; agentapi on 127.0.0.1 is followed
    directly; and plain http to a remote host is warned about once."""
    name = f"coderd.invalid:{coderd.port}"
    async with ForwardProxy({name: ("127.0.0.1", coderd.port)}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        settings = settings_for(agent, coderd, short_dir, settle_s=0,
                                coder_url=f"http://{name}/")
        async with serving(settings):
            agent.add_message("user", "through the proxy, please")
            await coderd.wait_for(lambda: stored(coderd) == agent.packed())
            _, status = await get(settings, "/status")
    targets = [r.target for r in proxy.requests]
    assert any(t.startswith(f"http://{name}/api/v2/workspaceagents/me/tasks/")
               for t in targets)
    assert f"http://{name}/api/v2/buildinfo" in targets
    assert all(t.startswith(f"http://{name}/") for t in targets)  # agentapi never
    assert status["agentapi"]["connected"] is True
    assert status["coderd"]["version"] == coderd.version
    [warning] = logged(log_output, "coder_url_plain_http")
    assert "plain http to coderd.invalid" in warning["detail"]


async def test_a_308_front_on_the_same_host_is_followed(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """A front that moved coderd's path answers 308; the upload follows it, body and token,
    and the snapshot is stored."""
    async def moved(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/old/"):
            return await redirecting(308, lambda r: str(r.url).replace("/old/", "/", 1))(
                request)
        return None

    coderd.hook = moved
    settings = settings_for(agent, coderd, short_dir, settle_s=0,
                            coder_url=coderd.url + "old/")
    async with serving(settings):
        agent.add_message("user", "follow me")
        await coderd.wait_for(lambda: stored(coderd) == agent.packed())
        status, health = await get(settings, "/healthz")
    posts = [u for u in coderd.uploads if u.body]  # not the buildinfo GET, also moved
    assert [u.status for u in posts][:2] == [308, 204]
    assert posts[1].headers["Coder-Session-Token"] == coderd.token
    assert posts[1].body == posts[0].body
    assert status == 200
    assert health == {"status": "ok"}


async def test_a_307_to_another_host_never_sees_the_token_and_health_names_it(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """A front that sends uploads to another host gets no request followed: that host never
    sees the token, /healthz turns 503 naming the redirect (without its query), and the
    state is `redirected`."""
    # Another host on the same port, so that only the host differs.
    async with FakeCoderd(host="127.0.0.2", port=coderd.port) as other:
        elsewhere = f"http://127.0.0.2:{other.port}/api/v2/collect"
        coderd.hook = redirecting(307, lambda r: f"{elsewhere}?sig=s3cr3t")
        settings = settings_for(agent, coderd, short_dir, settle_s=0)
        async with serving(settings):
            agent.add_message("user", "where does this go?")
            await coderd.wait_for(lambda: len(coderd.uploads) >= 1)
            status, health = await get(settings, "/healthz")
            _, state = await get(settings, "/status")
    assert other.uploads == []
    assert status == 503
    [reason] = [r for r in health["reasons"] if r.startswith("uploads:")]
    assert reason.startswith("uploads: redirected (HTTP 307")
    assert elsewhere in reason
    assert "s3cr3t" not in json.dumps(health) + json.dumps(state)
    assert state["uploads"]["state"] == "redirected"
    [said] = logged(log_output, "upload_redirected")
    assert said["location"] == elsewhere


async def test_a_16kib_413_front_ends_with_a_stored_snapshot_within_it(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """nginx with client_max_body_size 16k in front: the stored snapshot is at most 16 KiB
    and holds the newest message; /healthz is ok once it is stored."""
    coderd.hook = front_body_limit(16 * 1024)
    settings = settings_for(agent, coderd, short_dir, settle_s=0)
    async with serving(settings):
        for i in range(6):
            agent.add_message("user" if i % 2 == 0 else "agent", f"turn {i}: " + "w" * 4000)
        agent.add_message("user", "the newest message")

        def newest_stored() -> bool:
            body = stored(coderd)
            return body is not None and json.loads(body)["messages"][-1]["content"] == (
                "the newest message")

        await coderd.wait_for(newest_stored)
        status, _ = await get(settings, "/healthz")
        _, state = await get(settings, "/status")
    body = stored(coderd)
    assert body is not None
    assert len(body) <= 16 * 1024
    assert 413 in [u.status for u in coderd.uploads]
    assert status == 200
    assert state["uploads"]["state"] == "ok"


async def test_tasks_unavailable_keeps_the_sidecar_healthy_and_says_why_in_status(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """On a Coder without Tasks /healthz stays 200, /status and the metrics show the state,
    /status the version and how long the newest change has gone unstored."""
    async with FakeCoderd(version="v2.37.0+deadbee") as coderd:
        coderd.tasks_served = False
        settings = settings_for(agent, coderd, short_dir, settle_s=0)
        async with serving(settings):
            agent.add_message("user", "anyone there?")
            await coderd.wait_for(lambda: len(coderd.uploads) >= 1)
            status, health = await get(settings, "/healthz")
            _, state = await get(settings, "/status")
            connector = aiohttp.UnixConnector(path=str(settings.socket))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get("http://sidecar/metrics") as resp:
                metrics = await resp.text()
    assert status == 200
    assert health == {"status": "ok"}
    assert state["uploads"]["state"] == "tasks_unavailable"
    assert ('agent_sidecar_upload_state{agent_sidecar_upload_state="tasks_unavailable"} 1.0'
            in metrics)
    assert state["coderd"]["version"] == "v2.37.0+deadbee"
    assert state["uploads"]["oldest_unstored_age_s"] >= 0


async def test_in_sink_only_mode_a_failing_sink_is_degraded_not_unhealthy(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Without Coder, a sink that cannot be written makes /healthz 200 "degraded", as the
    README says, never 503: the sink is for people, not a reason to restart."""
    blocker = short_dir / "not-a-dir"
    blocker.write_text("a file where the sink directory should be")
    # A short shutdown: the final flush retries the sink that cannot be written until then.
    settings = settings_for(agent, None, short_dir, settle_s=0, sink_dir=blocker / "sink",
                            shutdown_timeout_s=1)
    async with serving(settings):
        agent.add_message("user", "write me down")
        status, health = 0, dict[str, Any]()
        for _ in range(200):
            status, health = await get(settings, "/healthz")
            if health.get("status") != "ok":
                break
        assert status == 200
        assert health["status"] == "degraded"
        assert health["reasons"][0].startswith("sink: ")


async def test_an_api_path_in_the_coder_url_is_named_not_taken_for_tasks_gone(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path, log_output: io.StringIO,
) -> None:
    """CODER_AGENT_URL set to an API path (…/api/v2/) gets "Route not found." before any
    token check, as a Coder without Tasks would: the start-up warns about the path, and
    since buildinfo is missing too, the Tasks line is a warning that says to check the
    URL."""
    settings = settings_for(agent, coderd, short_dir, settle_s=0)
    settings = settings.model_copy(update={"coder_url": coderd.url + "api/v2/"})
    async with serving(settings):
        await until(lambda: bool(logged(log_output, "coderd_buildinfo_unavailable")))
        agent.add_message("user", "hello")
        await until(lambda: bool(logged(log_output, "upload_tasks_unavailable")))
    [path_warning] = logged(log_output, "coder_url_api_path")
    assert "should be Coder's access URL" in path_warning["detail"]
    [tasks] = logged(log_output, "upload_tasks_unavailable")
    assert tasks["level"] == "warning"
    assert "CODER_AGENT_URL may not be Coder's access URL" in tasks["hint"]


def test_api_path_warning_is_only_for_api_paths() -> None:
    """An access URL, with or without a path prefix of its own, draws no warning; one that
    holds /api/ does."""
    assert api_path_warning("https://coder.example.com/") is None
    assert api_path_warning("https://example.com/coder/") is None
    assert api_path_warning("https://coder.example.com/api/v2") is not None
    assert api_path_warning("https://u:p@coder.example.com/api/v2/?x=1") == (
        "CODER_AGENT_URL https://coder.example.com/api/v2/ has an API path; it should be "
        "Coder's access URL, like https://coder.example.com/, since /api/v2/... is joined "
        "below it")
