"""What `run` refuses at start, `config` refuses too (but what is in use), through the real
CLI, with the same line."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .sidecar import clean_env


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent_sidecar", *args], capture_output=True,
                          text=True, env=clean_env(**env), timeout=60, check=False)


async def config_and_run(*flags: str, **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                           subprocess.CompletedProcess[str]]:
    """`config` and `run` with the same settings, side by side."""
    configured, ran = await asyncio.gather(
        asyncio.to_thread(run_cli, "config", *flags, **env),
        asyncio.to_thread(run_cli, "run", "--agentapi-url", "http://127.0.0.1:9", *flags,
                          **env))
    return configured, ran


# -- the socket path ------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["too long", "a regular file", "parent in /proc",
                                     "parent is a file"])
async def test_config_refuses_the_socket_paths_run_refuses(short_dir: Path, problem: str) -> None:
    """A socket path over the Unix limit, one that is a regular file, or one whose parent
    cannot be created: `config` exits 2 with the very line `run` exits 2 with."""
    if problem == "too long":
        path = short_dir / ("d" * 60) / ("s" * 60)
    elif problem == "a regular file":
        path = short_dir / "file"
        path.write_text("not a socket")
    elif problem == "parent in /proc":
        path = Path("/proc/self/agent-sidecar/s.sock")
    else:
        (short_dir / "file").write_text("")
        path = short_dir / "file" / "s.sock"
    configured, ran = await config_and_run(AGENT_SIDECAR_SOCKET=str(path))
    assert (configured.returncode, ran.returncode) == (2, 2), configured.stderr + ran.stderr
    [line] = configured.stderr.splitlines()
    assert ran.stderr.splitlines()[-1] == line.replace("agent-sidecar: ",
                                                       "agent-sidecar: cannot start: ", 1)
    assert "Traceback" not in configured.stderr + ran.stderr
    if problem == "too long":
        assert not (short_dir / ("d" * 60)).exists()  # a dry run makes nothing
    if problem == "parent is a file":
        assert "Not a directory" in line


async def test_config_passes_what_is_only_in_use(short_dir: Path) -> None:
    """A socket a daemon serves and a metrics port it holds are "in use": `run` refuses
    them, `config` does not, so it can vet a configuration next to a running daemon."""
    path = short_dir / "s.sock"
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    metrics = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        served.bind(str(path))
        served.listen(1)
        metrics.bind(("127.0.0.1", 0))
        metrics.listen(1)
        port = metrics.getsockname()[1]
        configured, ran = await config_and_run(AGENT_SIDECAR_SOCKET=str(path))
        assert configured.returncode == 0, configured.stderr
        assert ran.returncode == 2
        assert f"another process is serving {path}" in ran.stderr
        configured, ran = await config_and_run(
            "--metrics-addr", f"127.0.0.1:{port}", AGENT_SIDECAR_SOCKET=str(short_dir / "t"))
        assert configured.returncode == 0, configured.stderr
        assert ran.returncode == 2
        assert f"cannot serve metrics on 127.0.0.1:{port}" in ran.stderr
    finally:
        served.close()
        metrics.close()
