"""Another local user squats the default socket: nothing of ours talks to it or through it."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sidecar import clean_env, refusals

pytestmark = pytest.mark.faults

NOBODY = 65534
# What a squatter would answer to make `check` say healthy: it speaks first, unasked.
FAKE_HEALTHY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n"
                b"Connection: close\r\n\r\n{\"status\":\"ok\"}")


@dataclass
class Squatter:
    pid: int
    control: int  # closing it tells the squatter to report and exit
    report: int
    directory: Path
    reaped: bool = False

    def finish(self) -> dict[str, int]:
        """Stop the squatter; what it received: connections and bytes."""
        os.close(self.control)
        with os.fdopen(self.report, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        assert os.waitstatus_to_exitcode(status) == 0, data
        result: dict[str, int] = json.loads(data)
        return result


def _squat(tmpdir: Path, mode: str, control: int, report: int) -> None:
    """The squatter's life, as uid 65534, in the forked child. `mode`: what it plants:
    "directory", a 0777 per-uid directory of its own; "symlink", the per-uid directory as
    a symlink to one of its directories; "tmpdir", a symlink to one of its directories, to
    be named as TMPDIR (the per-uid directory would be made inside, where it can rename it).
    """
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    own = tmpdir / "sq-own"
    own.mkdir()
    own.chmod(0o777)
    directory = tmpdir / "agent-sidecar-0"
    if mode == "directory":
        directory.mkdir()
        directory.chmod(0o777)
    elif mode == "symlink":
        directory.symlink_to(own)
    else:
        (tmpdir / "sq-tmp").symlink_to(own)
        directory = own
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / "agent-sidecar.sock"))
    os.chmod(directory / "agent-sidecar.sock", 0o777)  # noqa: S103 - a squatter's bait
    listener.listen(16)
    os.write(report, b"ready\n")
    connections = received = 0
    while True:
        ready, _, _ = select.select([listener.fileno(), control], [], [], 30)
        if not ready:
            raise TimeoutError("the test never finished")
        if control in ready:  # the parent closed its end: report and go
            os.write(report, json.dumps({"connections": connections,
                                         "bytes": received}).encode())
            return
        conn, _ = listener.accept()
        connections += 1
        with conn, contextlib.suppress(OSError):  # a client that hung up resets
            conn.settimeout(10)
            conn.sendall(FAKE_HEALTHY)
            while chunk := conn.recv(65536):
                received += len(chunk)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A TMPDIR like /tmp (1777) that uid 65534 can reach: inside a dedicated 0711 directory,
    since pytest's own temporary root is 0700."""
    if os.getuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the squatter test needs a second uid")
        pytest.skip("needs root, to run the squatter as uid 65534")
    base = Path(tempfile.mkdtemp(prefix="as-squat-", dir="/tmp"))
    base.chmod(0o711)
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    try:
        yield tmpdir
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def squatter(shared_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Squatter]:
    """A squatter process of uid 65534 that has planted `request.param` (see _squat;
    "directory" unless parametrized) and listens on its socket."""
    mode = getattr(request, "param", "directory")
    control_r, control_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(control_w)
            os.close(report_r)
            _squat(shared_tmp, mode, control_r, report_w)
            code = 0
        finally:
            os._exit(code)
    os.close(control_r)
    os.close(report_w)
    squat = Squatter(pid, control_w, report_r, shared_tmp / "agent-sidecar-0")
    ready, _, _ = select.select([report_r], [], [], 30)
    assert ready, "the squatter did not start"
    assert os.read(report_r, 6) == b"ready\n"
    try:
        yield squat
    finally:
        if not squat.reaped:  # the test failed before finish(): stop it by its pid
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def cli(tmpdir: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """`agent-sidecar ARGS` with TMPDIR spelt exactly as given (a Path would normalise it)."""
    env = clean_env(TMPDIR=str(tmpdir))
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([sys.executable, "-m", "agent_sidecar", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_squatted_default_socket_is_refused_by_every_command(squatter: Squatter) -> None:
    """Another user who created the per-uid directory first: `run` refuses to start (exit 2,
    saying what to do) and `config` says so too, `send` sends nothing, and `check` does not
    say healthy."""
    tmpdir = squatter.directory.parent
    run = cli(tmpdir, "run", "--agentapi-url", "http://127.0.0.1:9")
    assert run.returncode == 2, run.stderr
    assert refusals(run.stderr) == [
        f"cannot start: socket directory {squatter.directory} belongs to uid "
        f"{NOBODY}, not to us (uid 0): another user created it first and could serve the "
        "socket in our place; set XDG_RUNTIME_DIR to a private directory, or choose the "
        "socket with --socket (or AGENT_SIDECAR_SOCKET)"]

    config = cli(tmpdir, "config")
    assert config.returncode == 2
    # config says what run would
    assert refusals(config.stderr) == [refusals(run.stderr)[0].removeprefix("cannot start: ")]

    send = cli(tmpdir, "send", "rm -rf / is not what I meant")
    assert send.returncode == 5
    assert f"is served by uid {NOBODY}, not by us (uid 0) or root, so nothing was sent" in (
        send.stderr)

    check = cli(tmpdir, "check")
    assert check.returncode == 1
    assert check.stdout.startswith("unhealthy: the socket ")
    assert f"is served by uid {NOBODY}" in check.stdout

    status = cli(tmpdir, "status")
    assert status.returncode == 1
    assert "9.9.9" not in status.stdout

    seen = squatter.finish()
    assert seen == {"connections": 3, "bytes": 0}  # they came, checked, and said nothing


@pytest.mark.parametrize("squatter", ["directory", "symlink"], indirect=True)
def test_every_spelling_of_tmpdir_finds_the_squatted_directory(squatter: Squatter) -> None:
    """TMPDIR spelt with a trailing slash, a double slash, `.` or `..`: `config` and `run`
    verify the same per-uid directory, find it squatted (another user's 0777 directory, or
    their symlink) and refuse with exit 2; the squatter hears nothing."""
    tmpdir = squatter.directory.parent
    base = tmpdir.parent
    why = "is a symlink" if squatter.directory.is_symlink() else f"belongs to uid {NOBODY}"
    refusal = f"socket directory {squatter.directory} {why}"
    for spelling in (f"{tmpdir}/", f"{tmpdir}//", f"{tmpdir}/.", f"{tmpdir}/./",
                     f"{tmpdir}/../tmp", f"{tmpdir}/../../{base.name}/tmp"):
        config = cli(spelling, "config")  # first: before the fix it passed, and run served
        assert config.returncode == 2, (spelling, config.stderr)
        assert refusal in config.stderr, spelling
        run = cli(spelling, "run", "--agentapi-url", "http://127.0.0.1:9")
        assert run.returncode == 2, (spelling, run.stderr)
        assert f"cannot start: {refusal}" in run.stderr, spelling
    assert squatter.finish() == {"connections": 0, "bytes": 0}


@pytest.mark.parametrize("squatter", ["tmpdir"], indirect=True)
def test_a_tmpdir_that_leads_to_another_users_directory_is_refused(squatter: Squatter) -> None:
    """TMPDIR naming another user's symlink to their own directory: the per-uid directory
    would be made where its owner could rename it, so `config` and `run` refuse (exit 2)
    and make nothing there."""
    tmpdir = squatter.directory.parent
    own = tmpdir / "sq-own"
    for command in (("config",), ("run", "--agentapi-url", "http://127.0.0.1:9")):
        done = cli(tmpdir / "sq-tmp", *command)
        assert done.returncode == 2, (command, done.stderr)
        assert (f"socket directory {own}/agent-sidecar-0 is in {own}, which belongs to uid "
                f"{NOBODY}, not to us (uid 0) or root") in done.stderr
    assert not (own / "agent-sidecar-0").exists()
    assert squatter.finish() == {"connections": 0, "bytes": 0}
