"""Running where users run it: sd_notify, live reloads, metrics, the demo, deployment files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from standins import FakeAgentAPI, FakeCoderd

from agent_sidecar.config import Settings
from agent_sidecar.sdnotify import Notifier

from .conftest import Datagrams
from .sidecar import Sidecar, clean_env, refusals
from .test_daemon import serving, settings_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Datagrams]:
    address = (str(short_dir / "notify") if request.param == "path"
               else f"@agent-sidecar-test-{uuid.uuid4().hex[:12]}")
    grams = Datagrams(address)
    yield grams
    grams.close()


async def test_notifier_speaks_the_protocol(notify_socket: Datagrams) -> None:
    """READY, STATUS, STOPPING and WATCHDOG arrive as KEY=value datagrams (path and abstract)."""
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"})
    assert notifier.enabled
    assert notifier.watchdog_interval_s == 0.1
    notifier.ready("following agentapi")
    notifier.stopping()
    pinger = asyncio.create_task(notifier.watchdog())
    try:
        got = await notify_socket.until("WATCHDOG=1")
    finally:
        pinger.cancel()
    assert got[0] == "READY=1\nSTATUS=following agentapi"
    assert got[1] == "STOPPING=1\nSTATUS=Shutting down"


def test_notifier_is_silent_without_notify_socket() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    assert notifier.watchdog_interval_s is None


def test_watchdog_respects_watchdog_pid() -> None:
    """A WATCHDOG_PID naming another process means the watchdog is not ours."""
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000"}
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 1.0
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval_s is None


async def test_daemon_notify_sequence(
    notify_socket: Datagrams, agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """The real process: READY=1 once following with the socket bound, watchdog pings from
    the loop at half WATCHDOG_USEC, readable STATUS= lines, and STOPPING=1 at SIGTERM."""
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"),
                    NOTIFY_SOCKET=notify_socket.address,
                    WATCHDOG_USEC="400000")
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        got = await notify_socket.until("READY=1")
        assert (short_dir / "s").exists()
        ready = next(d for d in got if "READY=1" in d)
        assert "STATUS=following agentapi, 1 messages, agent stable, uploads off" in ready
        notify_socket.received.clear()
        await notify_socket.until("WATCHDOG=1")
        sidecar.signal(signal.SIGTERM)
        await notify_socket.until("STOPPING=1")
        assert await sidecar.wait() == 0


async def test_token_file_rewrite_is_used_at_once(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With CODER_AGENT_TOKEN_FILE, a rewritten token ends the 'token rejected' back-off at
    once (watchfiles), without a restart, and the token never reaches the logs."""
    token_file = short_dir / "token"
    token_file.write_text("00000000-0000-4000-8000-000000000000\n")
    settings = settings_for(agent, coderd, short_dir, settle_s=0, coder_token=None,
                            coder_token_file=token_file, rejected_backoff_s=3600)
    [task] = coderd.tasks
    async with serving(settings):
        agent.add_message("user", "hello")
        await coderd.wait_for(lambda: any(u.status == 401 for u in coderd.uploads))
        # Rewrite by rename, as Kubernetes secrets and careful writers do.
        fresh = short_dir / "token.new"
        fresh.write_text(coderd.token + "\n")
        fresh.replace(token_file)
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed(), 10)


async def test_sighup_reloads_the_config_file(agent: FakeAgentAPI, short_dir: Path) -> None:
    """SIGHUP re-reads the file, applies what can change live, and names what needs a restart."""
    config = short_dir / "c.toml"
    config.write_text("settle_s = 0.5\n")
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"), AGENT_SIDECAR_CONFIG=str(config))
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        config.write_text(f'settle_s = 0.1\nsend_wait_s = 5\nsink_dir = "{short_dir}"\n')
        sidecar.signal(signal.SIGHUP)
        reloaded = await sidecar.wait_log("config_reloaded")
        assert reloaded["applied"] == ["send_wait_s", "settle_s"]
        assert reloaded["need_restart"] == ["sink_dir"]
        config.write_text("settle_s = -4\n")
        sidecar.signal(signal.SIGHUP)
        failed = await sidecar.wait_log("reload_failed")
        assert "invalid settle_s" in failed["error"]
        assert await sidecar.stop() == 0  # a bad reload keeps the daemon running


REQUIRED_METRICS = {
    "agent_sidecar_build_info": "gauge",
    "agent_sidecar_uploads": "counter",
    "agent_sidecar_upload_retries": "counter",
    "agent_sidecar_upload_duration_seconds": "histogram",
    "agent_sidecar_last_upload_success_timestamp_seconds": "gauge",
    "agent_sidecar_snapshot_bytes": "gauge",
    "agent_sidecar_snapshot_messages": "gauge",
    "agent_sidecar_snapshot_truncations": "counter",
    "agent_sidecar_sse_reconnects": "counter",
    "agent_sidecar_sse_connected": "gauge",
    "agent_sidecar_relay_requests": "counter",
}


async def test_metrics_parse_back_with_prometheus_client(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """/metrics, on the socket and over TCP, parses with prometheus-client's own parser and
    has every required family with Prometheus-conventional names."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings_for(agent, coderd, short_dir, settle_s=0,
                            metrics_addr=f"127.0.0.1:{port}")
    [task] = coderd.tasks
    async with serving(settings):
        agent.add_message("user", "x" * 70_000)
        await coderd.wait_for(lambda: coderd.snapshots.get(task) == agent.packed())
        connector = aiohttp.UnixConnector(path=str(settings.socket))
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.get("http://sidecar/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = await resp.text()
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics") as tcp:
            assert tcp.status == 200
            assert "agent_sidecar_uploads_total" in await tcp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in REQUIRED_METRICS.items():
        assert families[name].type == kind, name
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["agent_sidecar_uploads_total"].labels == {"result": "accepted"}
    assert samples["agent_sidecar_uploads_total"].value == 1
    assert samples["agent_sidecar_snapshot_truncations_total"].value == 1
    assert samples["agent_sidecar_sse_connected"].value == 1
    assert samples["agent_sidecar_build_info"].labels["version"]
    assert 60_000 < samples["agent_sidecar_snapshot_bytes"].value <= 65536


def test_demo_once_runs_a_whole_exchange(short_dir: Path) -> None:
    """`agent-sidecar demo --once` needs nothing installed, prints snapshots, and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent_sidecar", "demo", "--once", "--dir", str(short_dir)],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"relay socket        {short_dir}/relay.sock" in proc.stdout
    assert re.search(r"snapshot written: 3 messages, \d+ bytes, not truncated", proc.stdout)
    sink = json.loads((short_dir / "sink" / "local.json").read_text())
    assert [m["role"] for m in sink["messages"]] == ["agent", "user", "agent"]
    assert not (short_dir / "relay.sock").exists()


# -- the deployment files ----------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / "agent-sidecar.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_matches_the_daemon() -> None:
    """Type=notify with a watchdog, a stop timeout above the shutdown budget, a private
    runtime directory for the socket, and the env file for Coder's variables."""
    u = unit()
    assert u["Type"] == ["notify"]
    assert u["WatchdogSec"]
    assert u["Restart"] == ["on-failure"]
    assert int(u["TimeoutStopSec"][0].rstrip("s")) > 8
    assert u["RuntimeDirectory"] == ["agent-sidecar"]
    assert u["RuntimeDirectoryMode"] == ["0700"]
    assert u["EnvironmentFile"] == ["-/etc/agent-sidecar/env"]
    assert "AGENT_SIDECAR_SOCKET=%t/agent-sidecar/agent-sidecar.sock" in u["Environment"]
    assert u["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert u["UMask"] == ["077"]


def test_dockerfile_essentials() -> None:
    """Multi-stage from one base given as a build argument, non-root, tini as PID 1 in exec
    form, SIGTERM, and a health check."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "agent-sidecar"]' in text
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert 'CMD ["agent-sidecar", "check"]' in text


def test_dockerfile_installs_into_venvs() -> None:
    """Every pip runs from a venv, so the build works on Debian's own python3, which refuses
    a system-wide install (PEP 668), as well as on the official python image."""
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    pips = re.findall(r"(\S*pip) (?:install|wheel)\b", code)
    assert pips == ["/build/bin/pip", "/opt/agent-sidecar/bin/pip"]
    assert "python3 -m venv /build" in text
    assert "python3 -m venv /opt/agent-sidecar" in text
    assert re.search(r"^ENV PATH=/opt/agent-sidecar/bin:\$PATH", text, re.M)


def test_dockerfile_user_has_a_group_of_its_own() -> None:
    """The image's group is created first, with gid 10001: `useradd --system --user-group`
    picks a free system gid (999), and `USER 10001:10001` would then run with a gid that has
    no group entry."""
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    group = code.index("groupadd --gid 10001 sidecar")
    user = code.index("useradd --uid 10001 --gid 10001 ")
    assert group < user
    assert "--user-group" not in code
    assert re.search(r"^USER 10001:10001$", code, re.M)


def test_systemd_unit_has_no_restart_loop_on_bad_config() -> None:
    """A bad configuration is refused by `run` itself (exit 2, which RestartPreventExitStatus
    covers), not by an ExecStartPre= check, which systemd would restart in a loop."""
    u = unit()
    assert "ExecStartPre" not in u
    assert u["ExecStart"] == ["/usr/local/bin/agent-sidecar run"]
    assert u["RestartPreventExitStatus"] == ["2"]


def test_systemd_unit_enables_faulthandler() -> None:
    """A watchdog kill (SIGABRT) leaves a Python traceback: PYTHONFAULTHANDLER=1."""
    assert "PYTHONFAULTHANDLER=1" in unit()["Environment"]


def readme_block_after(marker: str) -> list[str]:
    """The lines of the first ```sh block after `marker` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text.split(marker + "\n", 1)[1]
    assert after.startswith("```sh\n")
    return after.removeprefix("```sh\n").split("\n```\n", 1)[0].splitlines()


def test_readme_debian12_install_is_what_the_engine_test_runs() -> None:
    """The README installs into a venv under /opt (Debian 12 refuses a system-wide pip
    install, PEP 668), links the command where the unit runs it, and deploy/test/run.sh runs
    exactly that block, found by its marker."""
    script = (ROOT / "deploy" / "test" / "run.sh").read_text()
    marker = re.search(r"^README_MARKER='(.+)'$", script, re.M)
    assert marker is not None
    block = readme_block_after(marker.group(1))
    assert block[0] == "apt-get update && apt-get install -y python3-venv"
    assert block[1] == "python3 -m venv /opt/agent-sidecar"
    pip = [line for line in block if " install " in line and "pip" in line]
    assert len(pip) == 1
    assert pip[0].startswith("/opt/agent-sidecar/bin/pip install agent-sidecar ")
    assert block[-1] == "ln -sf /opt/agent-sidecar/bin/agent-sidecar /usr/local/bin/agent-sidecar"
    assert unit()["ExecStart"][0].startswith("/usr/local/bin/agent-sidecar ")


def test_readme_says_the_token_file_must_be_readable_by_the_user() -> None:
    """The systemd section says a token file must be readable by the unit's User=."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### As a systemd service", 1)[1].split("\n### ", 1)[0]
    assert "**A token file must be readable by that user**" in section
    assert "Set `User=` in the unit to the workspace user" in section


def test_compose_socket_volume_is_the_services_own() -> None:
    """Both services mount the socket volume with nocopy, so Docker does not copy an image's
    /run/agent-sidecar owner (10001) and mode onto it, and the tmpfs belongs to the uid both
    run as, mode 0700."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    opts = compose["volumes"]["agent-sidecar-run"]["driver_opts"]
    for service in compose["services"].values():
        uid, gid = service["user"].split(":")
        assert f"uid={uid},gid={gid},mode=0700" == opts["o"]
        [mount] = service["volumes"]
        assert mount == {"type": "volume", "source": "agent-sidecar-run",
                         "target": "/run/agent-sidecar", "volume": {"nocopy": True}}


def test_probes_split_liveness_from_readiness() -> None:
    """The pod's liveness probe asks only whether the daemon lives (`check --live`); the
    readiness probe and Docker's HEALTHCHECK run `check`, which includes agentapi."""
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes-pod.yaml").read_text())
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "agent-sidecar")
    assert sidecar["livenessProbe"]["exec"]["command"] == ["agent-sidecar", "check", "--live"]
    assert sidecar["readinessProbe"]["exec"]["command"] == ["agent-sidecar", "check"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r'CMD \["agent-sidecar", "check"[^\]]*\]', dockerfile) == [
        'CMD ["agent-sidecar", "check"]']


def test_stop_timeouts_leave_room_for_the_final_upload() -> None:
    """Compose's stop_grace_period and the pod's grace period exceed shutdown_timeout_s, and
    the README tells Docker users about --stop-timeout (Docker's default, 10 s, is close)."""
    budget = Settings.model_fields["shutdown_timeout_s"].default
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    grace = compose["services"]["agent-sidecar"]["stop_grace_period"]
    assert float(grace.removesuffix("s")) >= budget + 5
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes-pod.yaml").read_text())
    assert pod["spec"]["terminationGracePeriodSeconds"] >= budget + 5
    text = (ROOT / "README.md").read_text()
    section = text.split("### As a container sidecar", 1)[1].split("\n## ", 1)[0]
    assert "`docker run --stop-timeout 15`" in section
    assert "`stop_grace_period: 15s`" in section


def test_engine_test_without_privileges_is_a_notice_or_a_ci_failure() -> None:
    """deploy/test/run.sh without root prints a NOTICE line and exits 0, but fails under
    CI=true, before it touches anything."""
    script = ROOT / "deploy" / "test" / "run.sh"
    drop = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            if os.geteuid() == 0 else [])
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    local = subprocess.run([*drop, "bash", str(script)], capture_output=True, text=True,
                           env=env, timeout=30, check=False, cwd="/")
    assert local.returncode == 0, local.stderr
    assert local.stdout.startswith("NOTICE: real-engine deployment test skipped: not root")
    ci = subprocess.run([*drop, "bash", str(script)], capture_output=True, text=True,
                        env={**env, "CI": "true"}, timeout=30, check=False, cwd="/")
    assert ci.returncode == 1
    assert "CI=true requires it" in ci.stderr


def test_deploy_examples_share_the_socket() -> None:
    """The Kubernetes and Compose examples parse, and both containers see the same socket."""
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes-pod.yaml").read_text())
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    for container in containers.values():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AGENT_SIDECAR_SOCKET"] == "/run/agent-sidecar/agent-sidecar.sock"
    sidecar = containers["agent-sidecar"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert {e["name"] for e in sidecar["env"]} >= {"CODER_AGENT_URL", "CODER_AGENT_TOKEN",
                                                   "AGENT_SIDECAR_TASK_ID"}
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    side = compose["services"]["agent-sidecar"]
    assert side["read_only"] is True
    assert side["network_mode"] == "service:agent"


async def test_an_unreadable_token_file_is_a_startup_error(short_dir: Path) -> None:
    """An unreadable token file stops `run` with exit 2 and a clear line, not a traceback."""
    env = clean_env(AGENT_SIDECAR_SOCKET=str(short_dir / "s"), CODER_AGENT_URL="http://x/",
                    AGENT_SIDECAR_TASK_ID=str(uuid.uuid4()),
                    CODER_AGENT_TOKEN_FILE=str(short_dir / "missing"))
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent_sidecar", "run"], capture_output=True,
        text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2
    assert refusals(proc.stderr) == [
        f"cannot start: coder_token_file {short_dir / 'missing'} (from env "
        "CODER_AGENT_TOKEN_FILE): cannot be read: No such file or directory"]



