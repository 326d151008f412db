"""The light client: `send`, `status` and `check` against a stub relay on a real Unix socket.

The stub answers each status with Coder's error shape, as the relay contract says; the
end-to-end cases against the real relay live with the relay's tests.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standins import FakeAgentAPI

from agent_sidecar import cli, client

from .sidecar import Sidecar, clean_env

HEAVY = ("aiohttp", "pydantic", "pydantic_core", "pydantic_settings", "structlog",
         "prometheus_client", "watchfiles", "yarl", "multidict", "asyncio",
         "agent_sidecar.config")


@dataclass
class StubRelay:
    """A relay stand-in: fixed answers per endpoint, and a record of what it was sent."""

    socket: Path
    status: dict[str, Any] = field(default_factory=lambda: {
        "version": "9.9.9", "relay": {"socket": "s", "send_wait_s": 30, "send_timeout_s": 60}})
    send_answer: tuple[int, Any] | None = (204, None)  # None: never answer
    livez: tuple[int, Any] = (200, {"status": "alive"})
    healthz: tuple[int, Any] = (200, {"status": "ok"})
    chunked_status: bool = False
    hang_status: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    status_calls: int = 0
    posted: asyncio.Event = field(default_factory=asyncio.Event)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        self.sent.append(await request.json())
        self.posted.set()
        if self.send_answer is None:
            await asyncio.Event().wait()
        status, body = self.send_answer or (500, None)
        return web.Response(status=status) if body is None else web.json_response(
            body, status=status)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self.status_calls += 1
        if self.hang_status:
            await asyncio.Event().wait()
        if not self.chunked_status:
            return web.json_response(self.status)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        text = json.dumps(self.status).encode()
        for i in range(0, len(text), 7):
            await resp.write(text[i:i + 7])
        await resp.write_eof()
        return resp

    async def _livez(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.livez[1], status=self.livez[0])

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.healthz[1], status=self.healthz[0])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/send", self._send)
        app.router.add_get("/status", self._status)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/healthz", self._healthz)
        return app


@pytest.fixture
async def stub(short_dir: Path) -> AsyncIterator[StubRelay]:
    relay = StubRelay(short_dir / "relay.sock")
    runner = web.AppRunner(relay.app(), handle_signals=False, access_log=None,
                           shutdown_timeout=0.1)
    await runner.setup()
    await web.UnixSite(runner, str(relay.socket)).start()
    try:
        yield relay
    finally:
        await runner.cleanup()


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli_run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                  user: int | None = None) -> Run:
    """`agent-sidecar ARGS` as a child process, while this loop keeps serving the stub."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_sidecar", *args, env=env or clean_env(), user=user,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def send(stub: StubRelay, *args: str) -> tuple[str, ...]:
    return ("send", "--socket", str(stub.socket), *args)


def coder(message: str, detail: str = "") -> dict[str, str]:
    return {"message": message, "detail": detail}


# -- send: exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "body", "code"), [
    (204, None, 0),
    (400, coder("Field 'input' must not be empty.", "expected ..."), 2),
    (413, coder("The request body is over 1048576 bytes."), 2),
    (409, coder("The agent is still busy.", "it did not become stable within 30s"), 3),
    (502, coder("agentapi rejected the input.", "failed to wait for screen to stabilize"), 1),
    (503, coder("agentapi cannot be reached.", "connect failed"), 5),
    (504, coder("The input was sent; agentapi did not answer.", "do not resend blindly"), 4),
    (408, coder("The request did not arrive in time.", "headers took over 10s"), 5),
    (500, coder("The sidecar failed to handle this request.", "KeyError"), 1),
    (403, coder("This socket only serves its own user and root.", "peer uid 7"), 1),
])
async def test_send_maps_each_relay_answer_to_its_exit_code(
    stub: StubRelay, status: int, body: dict[str, str] | None, code: int,
) -> None:
    """Each relay status gets its documented exit code, and the relay's words on stderr."""
    stub.send_answer = (status, body)
    run = await cli_run(*send(stub, "hello"))
    assert run.code == code, run.err
    assert run.out == ""
    if body is None:
        assert run.err == ""
    else:
        assert run.err == f"agent-sidecar: {body['message']}" + (
            f" ({body['detail']})\n" if body["detail"] else "\n")


async def test_send_without_a_daemon_exits_5_with_the_cause(short_dir: Path) -> None:
    """No socket at all: exit 5 (never sent), naming the path and the OS's reason."""
    path = short_dir / "none.sock"
    run = await cli_run("send", "--socket", str(path), "hello")
    assert run.code == 5
    assert run.err == (f"agent-sidecar: cannot reach the sidecar at {path}: No such file or "
                       "directory; is `agent-sidecar run` running (see --socket)?\n")


def as_another_user(*args: str) -> tuple[int, str]:
    """`agent-sidecar ARGS` run by another user in a forked child: (exit code, its output).
    Root enters every directory, so as root the child becomes nobody; a user's fork is
    already someone the test can lock out."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read_end)
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            sys.stdout = sys.stderr = captured = io.StringIO()
            try:
                cli.main(list(args))
            except SystemExit as exc:
                code = int(exc.code or 0)
            os.write(write_end, captured.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_a_permission_error_reads_as_one(short_dir: Path) -> None:
    """A socket directory the caller may not enter reads "Permission denied", not a class."""
    path = short_dir / "locked" / "relay.sock"
    path.parent.mkdir(mode=0o700)
    if os.getuid() != 0:
        path.parent.chmod(0)
    try:
        for args, code in ((("send", "x"), 5), (("check",), 1), (("status",), 1)):
            got, output = as_another_user(args[0], "--socket", str(path), *args[1:])
            assert got == code, output
            assert f"cannot reach the sidecar at {path}: Permission denied; " in output
            assert "Error" not in output
    finally:
        path.parent.chmod(0o700)


# -- send: what it sends, and how long it waits ----------------------------------------------


async def test_send_states_wait_s_and_learns_the_default_from_status(stub: StubRelay) -> None:
    """wait_s is always sent: --wait, else the daemon's send_wait_s from GET /status."""
    stub.status["relay"]["send_wait_s"] = 12.5
    assert (await cli_run(*send(stub, "one"))).code == 0
    assert (await cli_run(*send(stub, "--wait", "3", "--raw", "\x1b"))).code == 0
    assert stub.sent == [{"input": "one", "type": "user", "wait_s": 12.5},
                         {"input": "\x1b", "type": "raw", "wait_s": 3.0}]
    assert stub.status_calls == 2


async def test_the_relays_bounds_come_from_status_with_documented_fallbacks(
    stub: StubRelay,
) -> None:
    """send_wait_s and send_timeout_s are read from GET /status; absent or junk, 30 and 60."""
    path = str(stub.socket)
    stub.status["relay"].update(send_wait_s=0, send_timeout_s=900)
    assert await asyncio.to_thread(cli._relay_bounds, path, None) == (0.0, 900.0)
    for junk in ({}, {"send_wait_s": "5", "send_timeout_s": -1},
                 {"send_wait_s": True, "send_timeout_s": None}):
        stub.status["relay"] = junk
        assert await asyncio.to_thread(cli._relay_bounds, path, None) == (30.0, 60.0)
    stub.status = {"no relay": "at all"}
    assert await asyncio.to_thread(cli._relay_bounds, path, None) == (30.0, 60.0)
    assert cli.send_bound(30, 60) == 30 + 60 + cli.SEND_MARGIN_S


async def test_send_waits_out_the_relays_own_bound_and_no_less(
    stub: StubRelay, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """With no answer, send gives up only after wait_s + send_timeout_s + the margin: exit 4."""
    monkeypatch.setattr(cli, "SEND_MARGIN_S", 0.3)  # the real 5 s would only slow the test
    stub.status["relay"].update(send_wait_s=0.2, send_timeout_s=0.4)
    stub.send_answer = None
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        await asyncio.to_thread(cli.main, send(stub, "hello"))
    elapsed = time.monotonic() - started
    assert exit_.value.code == 4
    assert 0.9 <= elapsed < 5
    assert stub.sent == [{"input": "hello", "type": "user", "wait_s": 0.2}]
    assert capsys.readouterr().err == (
        f"agent-sidecar: the sidecar at {stub.socket} did not answer in 0.9s; the input may "
        "have been delivered: do not resend it blindly\n")


@pytest.mark.parametrize("reply", [False, True])
async def test_timeout_bounds_the_whole_send(stub: StubRelay, reply: bool) -> None:
    """--timeout ends a send the relay never answers, --reply or not: exit 4, in time."""
    stub.send_answer = None
    started = time.monotonic()
    run = await cli_run(*send(stub, "--timeout", "0.5", *(["--reply"] if reply else []), "x"))
    assert run.code == 4
    assert time.monotonic() - started < 5
    assert "the input may have been delivered: do not resend it blindly" in run.err
    assert len(stub.sent) == 1
    assert stub.sent[0]["wait_s"] <= 0.5  # a busy agent would have had its 409 in time


async def test_a_timeout_too_small_to_connect_is_exit_5_not_a_traceback(
    stub: StubRelay,
) -> None:
    """A --timeout that runs out before the connect (1e-9 s) is "never sent", exit 5."""
    run = await cli_run(*send(stub, "--timeout", "1e-9", "x"))
    assert run.code == 5, run.err
    assert "Traceback" not in run.err
    assert stub.sent == []


async def test_timeout_while_status_hangs_sends_nothing(stub: StubRelay) -> None:
    """A daemon that does not answer GET /status within --timeout gets no input: exit 5."""
    stub.hang_status = True
    run = await cli_run(*send(stub, "--timeout", "0.3", "x"))
    assert run.code == 5
    assert run.err == (f"agent-sidecar: the sidecar at {stub.socket} did not answer in "
                       "0.3s\n")
    assert stub.sent == []


async def test_interrupted_send_exits_130_and_says_it_may_have_landed(stub: StubRelay) -> None:
    """Ctrl+C while the relay works on a send exits 130, warning the input may be delivered."""
    stub.send_answer = None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_sidecar", *send(stub, "x"), env=clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(stub.posted.wait(), 30)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert err.decode() == ("agent-sidecar: interrupted; the input may already have been "
                            "delivered\n")
    assert len(stub.sent) == 1


# -- send --reply ---------------------------------------------------------------------------


REPLY = {"messages": [
    {"id": 7, "role": "agent", "content": "Done.\nAll 12 tests pass.\n",
     "time": "2026-04-10T12:00:00Z"},
    {"id": 8, "role": "agent", "content": "Anything else?", "time": "2026-04-10T12:00:01Z"},
]}


async def test_reply_prints_the_agents_new_messages_as_text(stub: StubRelay) -> None:
    """send --reply asks for the reply and prints the new messages' text, one blank line apart."""
    stub.send_answer = (200, REPLY)
    run = await cli_run(*send(stub, "--reply", "run the tests"))
    assert run.code == 0, run.err
    assert run.out == "Done.\nAll 12 tests pass.\n\nAnything else?\n"
    assert stub.sent == [{"input": "run the tests", "type": "user", "wait_s": 30, "reply": True}]


async def test_reply_prints_json_with_json(stub: StubRelay) -> None:
    """send --reply --json prints the relay's answer as JSON, messages whole."""
    stub.send_answer = (200, REPLY)
    run = await cli_run(*send(stub, "--reply", "--json", "run the tests"))
    assert run.code == 0, run.err
    assert json.loads(run.out) == REPLY


async def test_an_incomplete_reply_is_printed_then_said_with_exit_6(stub: StubRelay) -> None:
    """A reply the relay marks incomplete is printed, then one stderr line says why and
    that the input was delivered (not to resend it), and send exits 6, not 0."""
    stub.send_answer = (200, {**REPLY, "incomplete": "a message larger than max_event_bytes"})
    run = await cli_run(*send(stub, "--reply", "run the tests"))
    assert run.code == 6
    assert run.out == "Done.\nAll 12 tests pass.\n\nAnything else?\n"
    assert run.err == ("agent-sidecar: the answer above is incomplete: a message larger than "
                       "max_event_bytes; the input was delivered: do not resend it\n")


async def test_an_incomplete_reply_keeps_its_field_in_json(stub: StubRelay) -> None:
    """send --reply --json prints the relay's `incomplete` with the messages, and exits 6."""
    answer = {**REPLY, "incomplete": "the sidecar's own view"}
    stub.send_answer = (200, answer)
    run = await cli_run(*send(stub, "--reply", "--json", "x"))
    assert run.code == 6
    assert json.loads(run.out) == answer
    assert "incomplete" in run.err


@pytest.mark.parametrize("args", [("status", "--json"), ("check",), ("send", "--reply", "x")])
async def test_output_into_a_closed_pipe_exits_141_quietly(
    stub: StubRelay, args: tuple[str, ...],
) -> None:
    """Writing into a pipe whose reader left (`| head -1`) ends the command with 141 and
    nothing on stderr, never a BrokenPipeError traceback."""
    stub.send_answer = (200, REPLY)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_sidecar", *args, "--socket", str(stub.socket),
            env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=write_end,
            stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (141, "")


@pytest.mark.parametrize(("args", "code", "said"), [
    (("status", "--json"), 1, "agent-sidecar: cannot write the output: No space left on device"),
    (("send", "--reply", "x"), 6, "agent-sidecar: the input was delivered, but its answer "
     "could not be written: No space left on device; do not resend it"),
])
async def test_output_that_cannot_be_written_is_one_line_not_a_traceback(
    stub: StubRelay, args: tuple[str, ...], code: int, said: str,
) -> None:
    """Output to a full device (/dev/full) ends the command with one line on stderr; `send`
    says its input was delivered (exit 6), the others exit 1; no traceback."""
    stub.send_answer = (200, REPLY)
    with open("/dev/full", "wb") as full:  # noqa: ASYNC230 - a device, never blocks
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_sidecar", *args, "--socket", str(stub.socket),
            env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=full,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode().strip()) == (code, said)


async def test_a_closed_stdout_is_not_a_traceback(stub: StubRelay) -> None:
    """With no stdout at all (`>&-`), `status --json` still exits 0 and writes nothing to
    stderr."""
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "agent_sidecar", "status",
        "--json", "--socket", str(stub.socket),
        env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (0, "")


async def test_a_malformed_reply_is_a_failure_that_says_it_was_delivered(
    stub: StubRelay,
) -> None:
    """A 200 whose body is not {"messages": [...]} exits 1 and says the input went through."""
    stub.send_answer = (200, {"messages": "nope"})
    run = await cli_run(*send(stub, "--reply", "x"))
    assert run.code == 1
    assert "the input was delivered" in run.err


async def test_json_without_reply_is_a_usage_error(stub: StubRelay) -> None:
    """--json alone has nothing to print: exit 2 before anything is sent."""
    run = await cli_run(*send(stub, "--json", "x"))
    assert run.code == 2
    assert stub.sent == []


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
async def test_bad_seconds_are_usage_errors(stub: StubRelay, value: str) -> None:
    """--wait takes a finite number of seconds, 0 or more, --timeout more than 0: else exit 2."""
    for flag in ("--wait", "--timeout"):
        run = await cli_run(*send(stub, flag, value, "x"))
        assert run.code == 2
        assert "must be a number of seconds" in run.err
    zero = await cli_run(*send(stub, "--timeout", "0", "x"))
    assert (zero.code, zero.err.splitlines()[-1]) == (
        2, "agent-sidecar send: error: argument --timeout: must be more than 0 seconds")
    assert stub.sent == []


# -- status and check -----------------------------------------------------------------------


async def test_status_text_names_the_agent_the_transport_and_coderd(stub: StubRelay) -> None:
    """`status` shows agentapi's agent type and transport and coderd's version when the
    daemon knows them, and the upload state (tasks_unavailable among them) as it is."""
    stub.status = {
        "version": "9.9.9", "uptime_s": 5,
        "agentapi": {"url": "http://localhost:3284", "connected": True, "agent_status": "stable",
                     "messages": 4, "agent_type": "claude", "transport": "acp"},
        "uploads": {"enabled": True, "state": "tasks_unavailable", "consecutive_failures": 1},
        "coderd": {"version": "v2.37.0"},
        "relay": {"socket": "s", "queue_length": 0, "send_wait_s": 30, "send_timeout_s": 60},
    }
    run = await cli_run("status", "--socket", str(stub.socket))
    assert run.code == 0, run.err
    assert "connected (claude, acp), agent stable, 4 messages" in run.out
    assert "tasks_unavailable, last success never, 1 failures in a row, coderd v2.37.0" in (
        run.out)


async def test_a_peers_escape_sequences_are_shown_escaped_not_sent_to_the_terminal(
    stub: StubRelay,
) -> None:
    """An error page that carries terminal escapes (retitle, clear screen) reaches check's
    and send's output escaped, so it cannot drive the user's terminal."""
    evil = "too_large (HTTP 413 (text/plain): \x1b]0;pwned\x07\x1b[2J\x1b[31mToo Large)"
    stub.healthz = (503, {"status": "unhealthy", "reasons": [f"uploads: {evil}"]})
    run = await cli_run("check", "--socket", str(stub.socket))
    assert run.code == 1
    assert "\x1b" not in run.out
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in run.out
    stub.send_answer = (502, {"message": "agentapi rejected the input.", "detail": evil})
    sent = await cli_run(*send(stub, "hello"))
    assert sent.code == 1
    assert "\x1b" not in sent.err


async def test_status_reads_a_chunked_answer(stub: StubRelay) -> None:
    """A chunked /status answer is read whole: status --json prints exactly it."""
    stub.chunked_status = True
    stub.status["padding"] = "x" * 5000
    run = await cli_run("status", "--json", "--socket", str(stub.socket))
    assert run.code == 0, run.err
    assert json.loads(run.out) == stub.status


@pytest.mark.parametrize(("live", "answer", "code", "line"), [
    (True, (200, {"status": "alive"}), 0, "alive"),
    (True, (503, {"status": "stalled", "reasons": ["follower stopped"]}), 1,
     "not alive: follower stopped"),
    (True, (404, coder("No such endpoint")), 1, "not alive: No such endpoint"),
    (False, (200, {"status": "ok"}), 0, "healthy"),
    (False, (200, {"status": "degraded", "reasons": ["sink: full"]}), 0, "degraded: sink: full"),
    (False, (503, {"status": "unhealthy", "reasons": ["agentapi: not connected"]}), 1,
     "unhealthy: agentapi: not connected"),
])
async def test_check_and_check_live(stub: StubRelay, live: bool, answer: tuple[int, Any],
                                    code: int, line: str) -> None:
    """check asks /healthz (readiness), check --live asks /livez (liveness): one line each."""
    if live:
        stub.livez = answer
    else:
        stub.healthz = answer
    run = await cli_run("check", *(["--live"] if live else []), "--socket", str(stub.socket))
    assert (run.code, run.out) == (code, line + "\n")


# -- the real daemon ------------------------------------------------------------------------


async def test_probes_against_the_real_daemon_on_its_default_socket(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With only TMPDIR set, run and the clients meet in the per-uid directory; with agentapi
    gone, check (readiness) fails while check --live (liveness) still passes."""
    env = clean_env(TMPDIR=str(short_dir), AGENT_SIDECAR_RECONNECT_INITIAL_S="0.05")
    env.pop("XDG_RUNTIME_DIR", None)
    async with Sidecar("--agentapi-url", agent.url, env=env) as sidecar:
        await sidecar.wait_log("ready")
        directory = short_dir / f"agent-sidecar-{os.getuid()}"
        assert stat.S_IMODE(directory.lstat().st_mode) == 0o700
        assert (await cli_run("check", env=env)).out == "healthy\n"
        assert (await cli_run("check", "--live", env=env)).out == "alive\n"
        mark = len(sidecar.lines)
        await agent.stop()
        await sidecar.wait_log("agentapi_disconnected", start=mark)
        ready = await cli_run("check", env=env)
        assert ready.code == 1
        assert ready.out.startswith("unhealthy: agentapi: not connected")
        live = await cli_run("check", "--live", env=env)
        assert (live.code, live.out) == (0, "alive\n")
        assert await sidecar.stop() == 0


@pytest.mark.parametrize("command", [("check",), ("check", "--live"), ("status",),
                                     ("send", "hello")])
async def test_the_light_commands_refuse_a_broken_config_file_as_run_does(
    stub: StubRelay, short_dir: Path, command: tuple[str, ...],
) -> None:
    """With AGENT_SIDECAR_CONFIG naming a file that is not valid TOML (or missing), `check`,
    `status` and `send` exit 2 with the one line `run` says, naming the file, and send
    nothing, rather than fall back to the default socket, where another daemon may be."""
    conf = short_dir / "c.toml"
    conf.write_text(f'socket = "{stub.socket}"\nsettle_s = \n')
    # The default socket leads to the stub: a client that skipped the file would reach it.
    (short_dir / "xdg").mkdir()
    (short_dir / "xdg" / "agent-sidecar.sock").symlink_to(stub.socket)
    env = clean_env(AGENT_SIDECAR_CONFIG=str(conf), XDG_RUNTIME_DIR=str(short_dir / "xdg"))
    ran = await cli_run(*command, env=env)
    refused = await cli_run("run", env=env)
    assert (ran.code, refused.code) == (2, 2), ran.err + refused.err
    assert ran.out == ""
    [line] = ran.err.splitlines()
    assert line.startswith(f"agent-sidecar: config file {conf}: not valid TOML: "), line
    assert json.loads(refused.err)["error"] == line.removeprefix("agent-sidecar: ")
    conf.unlink()
    missing = await cli_run(*command, env=env)
    assert missing.code == 2
    assert missing.err == f"agent-sidecar: config file {conf}: not found (set with --config " \
        "or AGENT_SIDECAR_CONFIG)\n"
    assert stub.sent == []
    assert stub.status_calls == 0


# -- the import guard -----------------------------------------------------------------------


GUARD = """\
import atexit, json, sys
def dump():
    with open(sys.argv[1], "w") as fh:
        json.dump(sorted(sys.modules), fh)
atexit.register(dump)
from agent_sidecar.cli import main
main(sys.argv[2:])
"""


async def imported_by(directory: Path, *args: str) -> set[str]:
    out = directory / "modules.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GUARD, str(out), *args, env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await asyncio.wait_for(proc.wait(), 60)
    modules = set(json.loads(out.read_text()))
    out.unlink()
    return modules


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY}


async def test_the_light_commands_import_no_heavy_module(stub: StubRelay, short_dir: Path) -> None:
    """check, status, send, their --help, and the top-level --help and --version import none
    of the daemon's stack, whether the sidecar answers or not."""
    stub.send_answer = (200, REPLY)
    sock = ("--socket", str(stub.socket))
    none = ("--socket", str(short_dir / "none.sock"))
    commands = [
        ("check", *sock), ("check", "--live", *sock), ("check", *none),
        ("status", *sock), ("status", "--json", *sock), ("status", *none),
        ("send", *sock, "x"), ("send", "--reply", *sock, "x"),
        ("send", "--reply", "--json", *sock, "x"), ("send", *none, "x"),
        ("--help",), ("--version",), ("check", "--help"), ("status", "--help"),
        ("send", "--help"),
    ]
    for args in commands:
        assert heavy(await imported_by(short_dir, *args)) == set(), args
    assert len(stub.sent) == 3
    # The guard sees what it guards against: `config` does load the settings model.
    assert "pydantic" in heavy(await imported_by(short_dir, "config", "--help"))


def test_the_package_root_is_cheap_and_its_version_lazy() -> None:
    """`import agent_sidecar` loads no metadata machinery; __version__ resolves on access."""
    code = ("import sys, agent_sidecar; assert 'importlib.metadata' not in sys.modules; "
            "print(agent_sidecar.__version__)")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from agent_sidecar import __version__

    assert proc.stdout == f"{__version__}\n"


@pytest.mark.skipif(os.getuid() == 0, reason="a server run by root is always trusted; "
                    "tests/faults/test_squatter.py covers root with a second uid")
async def test_a_client_only_talks_to_a_socket_of_ours(
    stub: StubRelay, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen from another (non-root) user, our own server is refused before anything is sent."""
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 4242)
    with pytest.raises(client.ForeignServer, match=f"is served by uid {uid}, not by us"):
        client.Connection(str(stub.socket), 5)
