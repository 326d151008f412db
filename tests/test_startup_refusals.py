"""What `run` refuses at start, `config` refuses too (but what is in use), through the real
CLI, with the same line."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .sidecar import clean_env, refusals
from .test_client import heavy, imported_by


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
                                     "parent is a file", "existing parent in /proc",
                                     "existing parent in /sys"])
async def test_config_refuses_the_socket_paths_run_refuses(short_dir: Path, problem: str) -> None:
    """A socket path over the Unix limit, one that is a regular file, one whose parent
    cannot be created, or one whose existing parent cannot hold a socket (procfs, sysfs):
    `config` exits 2 with the very line `run` exits 2 with."""
    if problem == "too long":
        path = short_dir / ("d" * 60) / ("s" * 60)
    elif problem == "a regular file":
        path = short_dir / "file"
        path.write_text("not a socket")
    elif problem == "parent in /proc":
        path = Path("/proc/self/agent-sidecar/s.sock")
    elif problem == "existing parent in /proc":
        path = Path("/proc/self/s")
    elif problem == "existing parent in /sys":
        path = Path("/sys/s")
    else:
        (short_dir / "file").write_text("")
        path = short_dir / "file" / "s.sock"
    configured, ran = await config_and_run(AGENT_SIDECAR_SOCKET=str(path))
    assert (configured.returncode, ran.returncode) == (2, 2), configured.stderr + ran.stderr
    [line] = configured.stderr.splitlines()
    assert refusals(ran.stderr) == ["cannot start: " + line.removeprefix("agent-sidecar: ")]
    assert "Traceback" not in configured.stderr + ran.stderr
    if problem == "too long":
        assert not (short_dir / ("d" * 60)).exists()  # a dry run makes nothing
    if problem == "parent is a file":
        assert "Not a directory" in line
    if problem.startswith("existing parent"):
        assert line.startswith(f"agent-sidecar: cannot make a socket in {path.parent}: "), line


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
        assert (f"cannot serve metrics on 127.0.0.1:{port} (metrics_addr, from flag "
                "--metrics-addr): ") in ran.stderr
    finally:
        served.close()
        metrics.close()


@pytest.mark.parametrize("addr", ["http://127.0.0.1:9100", "127.0.0.1:\uff11\uff19\uff11",
                                  "::1:19193", "127.0.0.1:9100/metrics"])
async def test_config_refuses_the_metrics_addr_forms_run_refuses(short_dir: Path,
                                                                addr: str) -> None:
    """A metrics_addr in a form other than HOST:PORT is refused by `config` and `run` alike,
    exit 2, with the one line that names the setting, its source and HOST:PORT."""
    configured, ran = await config_and_run(AGENT_SIDECAR_SOCKET=str(short_dir / "s"),
                                           AGENT_SIDECAR_METRICS_ADDR=addr)
    assert (configured.returncode, ran.returncode) == (2, 2), configured.stderr + ran.stderr
    [line] = configured.stderr.splitlines()
    assert line.startswith("agent-sidecar: invalid metrics_addr (from env "
                           "AGENT_SIDECAR_METRICS_ADDR): "), line
    assert "expected HOST:PORT" in line
    assert refusals(ran.stderr) == [line.removeprefix("agent-sidecar: ")]


def test_run_names_metrics_addr_when_its_host_does_not_resolve(short_dir: Path) -> None:
    """A metrics_addr whose host does not resolve passes `config` (it depends on the
    machine) and `run` refuses it, exit 2, naming metrics_addr and where it was set."""
    env = {"AGENT_SIDECAR_SOCKET": str(short_dir / "s"),
           "AGENT_SIDECAR_METRICS_ADDR": "no-such-host.invalid:9100"}
    ran = run_cli("run", "--agentapi-url", "http://127.0.0.1:9", **env)
    assert ran.returncode == 2, ran.stderr
    said = refusals(ran.stderr)[-1]  # after the relay's own "listening" line
    assert said.startswith("cannot start: cannot serve metrics on no-such-host.invalid:9100 "
                           "(metrics_addr, from env AGENT_SIDECAR_METRICS_ADDR): "), said
    assert "expected HOST:PORT" in said


# -- the agent token ------------------------------------------------------------------------

TOKEN = "5b0e7a3c-1f2d-4e6a-9b8c-7d6e5f4a3b2c"


@pytest.mark.parametrize("source", ["env", "file"])
@pytest.mark.parametrize(("token", "what"), [
    (f"{TOKEN[:8]}\t{TOKEN[8:]}", "a control character (U+0009)"),
    (f"{TOKEN}\x1c", "a control character (U+001C)"),
    (f"{TOKEN}\x85", "a control character (U+0085)"),
    (f"{TOKEN}\u00a0", "a character outside ASCII (U+00A0)"),
    (f"\u00a0{TOKEN}", "a character outside ASCII (U+00A0)"),
])
async def test_a_token_with_anything_but_printable_ascii_is_refused(
    short_dir: Path, source: str, token: str, what: str,
) -> None:
    """A tab inside the token, or a character Python's strip() would drop silently (\\x1c,
    \\x85, NBSP) around it: `config` and `run` exit 2 with one line naming the setting and
    its source, never the value."""
    env = {"CODER_AGENT_URL": "https://coder.example.com/",
           "AGENT_SIDECAR_TASK_ID": "0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70",
           "AGENT_SIDECAR_SOCKET": str(short_dir / "s")}
    if source == "env":
        env["CODER_AGENT_TOKEN"] = token
        where = "invalid coder_token (from env CODER_AGENT_TOKEN): "
    else:
        path = short_dir / "token"
        path.write_text(token + "\n", encoding="utf-8")
        env["CODER_AGENT_TOKEN_FILE"] = str(path)
        where = f"coder_token_file {path} (from env CODER_AGENT_TOKEN_FILE): "
    configured, ran = await config_and_run(**env)
    assert (configured.returncode, ran.returncode) == (2, 2), configured.stderr + ran.stderr
    [line] = configured.stderr.splitlines()
    assert line.startswith(f"agent-sidecar: {where}holds {what}"), line
    assert refusals(ran.stderr)[-1].endswith(line.removeprefix("agent-sidecar: "))
    assert TOKEN[:8] not in configured.stderr + ran.stderr
    assert TOKEN[-8:] not in configured.stderr + ran.stderr


@pytest.mark.parametrize("source", ["env", "file"])
async def test_ascii_whitespace_around_the_token_is_dropped(short_dir: Path,
                                                           source: str) -> None:
    """Spaces, tabs, CR, LF, VT and FF around the token are not part of it: `config` passes."""
    token = f" \t\x0b\x0c{TOKEN}\r\n \t"
    env = {"CODER_AGENT_URL": "https://coder.example.com/",
           "AGENT_SIDECAR_TASK_ID": "0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70",
           "AGENT_SIDECAR_SOCKET": str(short_dir / "s")}
    if source == "env":
        env["CODER_AGENT_TOKEN"] = token
    else:
        (short_dir / "token").write_text(token, encoding="utf-8")
        env["CODER_AGENT_TOKEN_FILE"] = str(short_dir / "token")
    configured = await asyncio.to_thread(run_cli, "config", **env)
    assert configured.returncode == 0, configured.stderr


# -- how a refusal is said ------------------------------------------------------------------


def _refusal_cases(short_dir: Path) -> dict[str, tuple[tuple[str, ...], dict[str, str], str]]:
    """Each way `run` refuses to start: its arguments, its environment, and a piece of
    what it says."""
    served = short_dir / "served.sock"
    return {
        "bad setting": (("--task-id", "nope"), {}, "invalid task_id (from flag --task-id)"),
        "token file": ((), {"CODER_AGENT_URL": "https://coder.example.com/",
                            "AGENT_SIDECAR_TASK_ID": "0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70",
                            "CODER_AGENT_TOKEN_FILE": str(short_dir / "missing")},
                        "cannot start: coder_token_file"),
        "socket in use": ((), {"AGENT_SIDECAR_SOCKET": str(served)},
                          f"cannot start: another process is serving {served}"),
        "usage": (("--no-such-flag",), {}, "error: unrecognized arguments: --no-such-flag"),
    }


def _run_into(stderr: Path, args: tuple[str, ...], **env: str) -> int:
    """`run ARGS` with stderr going to the file `stderr`; its exit code."""
    with stderr.open("w") as fh:
        return subprocess.run(
            [sys.executable, "-m", "agent_sidecar", "run", "--agentapi-url",
             "http://127.0.0.1:9", *args], stdout=subprocess.DEVNULL, stderr=fh,
            env=clean_env(**{"AGENT_SIDECAR_SOCKET": str(stderr.parent / "s"), **env}),
            timeout=60, check=False).returncode


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("case", ["bad setting", "token file", "socket in use", "usage"])
def test_a_refusal_to_start_carries_journalds_error_priority(
    short_dir: Path, case: str, fmt: str,
) -> None:
    """When stderr is journald's stream (JOURNAL_STREAM names its device and inode), every
    line of a refusal to start (a bad setting, a token file, a socket in use, a usage
    error) starts with `<3>`, so `journalctl -p warning` shows why the unit failed; with
    the JSON log format the rest is one JSON line, like every other log line."""
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    served.bind(str(short_dir / "served.sock"))
    served.listen(1)
    journal = short_dir / "journal"
    journal.touch()
    st = journal.stat()
    args, env, says = _refusal_cases(short_dir)[case]
    try:
        code = _run_into(journal, args, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                         AGENT_SIDECAR_LOG_FORMAT=fmt, **env)
    finally:
        served.close()
    lines = journal.read_text().splitlines()
    assert code == 2, lines
    assert lines
    assert all(line.startswith("<3>") for line in lines), lines
    if fmt == "json":
        [record] = [json.loads(line.removeprefix("<3>")) for line in lines]
        assert record["level"] == "error"
        assert says in record["error"]
        assert record["timestamp"].endswith("Z")
    else:
        assert says in lines[-1]
        assert not lines[-1].startswith("<3>{")


def test_no_priority_where_stderr_is_not_journald(short_dir: Path) -> None:
    """A JOURNAL_STREAM that names another file (inherited, then redirected) adds nothing:
    the refusal is the plain JSON line."""
    other = short_dir / "other"
    other.touch()
    st = other.stat()
    code = _run_into(short_dir / "err", ("--task-id", "nope"),
                     JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    assert code == 2
    [line] = (short_dir / "err").read_text().splitlines()
    assert json.loads(line)["event"] == "config_invalid"


def test_the_format_of_a_refusal_is_the_configured_one_where_it_can_be_known(
    short_dir: Path,
) -> None:
    """The log format of a refusal comes from where the settings would take it (here the
    config file, when the bad setting is another one; "auto" is JSON off a terminal); a
    bad log format itself cannot be known, and the refusal is plain."""
    conf = short_dir / "c.toml"
    for configured, plain in (('log_format = "json"\n', False), ("", False),
                              ('log_format = "console"\n', True)):
        conf.write_text(configured)
        code = _run_into(short_dir / "err", ("--task-id", "nope", "--config", str(conf)),
                         AGENT_SIDECAR_LOG_FORMAT="")
        assert code == 2
        said = (short_dir / "err").read_text()
        assert said.startswith("agent-sidecar: invalid task_id" if plain else "{"), said
    code = _run_into(short_dir / "err", (), AGENT_SIDECAR_LOG_FORMAT="yaml")
    assert code == 2
    assert (short_dir / "err").read_text().startswith("agent-sidecar: invalid log_format")


async def test_a_light_commands_usage_error_stays_light(short_dir: Path) -> None:
    """`check`, `status` and `send` with a bad flag print argparse's own lines and import
    none of the daemon's stack, even with stderr as journald's."""
    for args in (("check", "--bogus"), ("status", "--bogus"), ("send",)):
        assert heavy(await imported_by(short_dir, *args)) == set(), args
    err = short_dir / "err"
    code = await asyncio.to_thread(_check_into_journal, err)
    assert code == 2
    text = err.read_text()
    assert text.startswith("usage: agent-sidecar ")
    assert "<3>" not in text


def _check_into_journal(err: Path) -> int:
    """`check --bogus` with stderr going to `err`, which JOURNAL_STREAM names."""
    with err.open("w") as fh:
        st = os.fstat(fh.fileno())
        return subprocess.run([sys.executable, "-m", "agent_sidecar", "check", "--bogus"],
                              stderr=fh, env=clean_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
                              timeout=60, check=False).returncode
