"""The agent token: validated and normalised once, the same way from the environment and from
a file; the file read off the event loop, bounded, and watched without ever dying."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from agent_sidecar import config
from agent_sidecar.config import ConfigError
from agent_sidecar.tokens import TokenError, TokenSource, off_loop

from .conftest import make_settings, until
from .sidecar import clean_env

TOKEN = "4b1c1d7e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


@pytest.fixture(autouse=True)
def no_sidecar_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("AGENT_SIDECAR_", "CODER_")):
            monkeypatch.delenv(name)


async def from_file(path: Path, **settings: object) -> str | None:
    source = TokenSource(make_settings(coder_token_file=path, **settings))
    await source.load()
    return source.token


@pytest.mark.parametrize("raw", [f"{TOKEN}\n", f"  {TOKEN}\r\n", f"\t{TOKEN} \n\n"])
def test_surrounding_whitespace_is_stripped_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str,
) -> None:
    """CODER_AGENT_TOKEN with a trailing newline (or any surrounding whitespace) is the
    same token."""
    monkeypatch.setenv("CODER_AGENT_TOKEN", raw)
    token = config.load().settings.coder_token
    assert token is not None
    assert token.get_secret_value() == TOKEN


@pytest.mark.parametrize(("raw", "what"), [
    (f"{TOKEN[:8]}\r\n{TOKEN[8:]}", "a control character (U+000D)"),
    (f"{TOKEN[:8]}\n{TOKEN[8:]}", "a control character (U+000A)"),
    (f"{TOKEN}\x01x", "a control character (U+0001)"),
    (f"{TOKEN}\x7f", "a control character (U+007F)"),
    (f"{TOKEN}é", "a character outside ASCII (U+00E9)"),
    ("   \n", "is empty"),
])
def test_a_token_a_header_cannot_carry_is_a_config_error_without_its_value(
    monkeypatch: pytest.MonkeyPatch, raw: str, what: str,
) -> None:
    """From the environment, a token with a control or non-ASCII character inside is one
    line naming the setting, where it came from and the valid form, never the value."""
    monkeypatch.setenv("CODER_AGENT_TOKEN", raw)
    with pytest.raises(ConfigError) as err:
        config.load()
    message = str(err.value)
    assert message.startswith("invalid coder_token (from env CODER_AGENT_TOKEN): ")
    assert what in message
    if raw.strip():
        assert "expected printable ASCII, like the UUID the Coder agent provides" in message
    assert TOKEN[:8] not in message
    assert len(message.splitlines()) == 1


async def test_the_file_is_normalised_the_same_way(tmp_path: Path) -> None:
    """A token file's trailing newline, CRLF or UTF-8 BOM is stripped, as for the env."""
    path = tmp_path / "token"
    for content in (f"{TOKEN}\n".encode(), f"{TOKEN}\r\n".encode(),
                    b"\xef\xbb\xbf" + TOKEN.encode()):
        path.write_bytes(content)
        assert await from_file(path) == TOKEN
    link = tmp_path / "link"
    link.symlink_to(path)  # Kubernetes secrets are symlinks
    assert await from_file(link) == TOKEN


@pytest.mark.parametrize(("content", "what"), [
    (f"{TOKEN[:8]}\r\n{TOKEN[8:]}".encode(), "holds a control character (U+000D)"),
    (b"\xff\xfe" + TOKEN.encode("utf-16-le"), "not UTF-8 text"),
    (b"\n\n", "is empty"),
])
async def test_a_bad_token_file_is_refused_naming_the_file_not_the_value(
    tmp_path: Path, content: bytes, what: str,
) -> None:
    """A token file that is not text, or holds what a header cannot carry, is refused with
    the setting, the file and what is wrong, never the value."""
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(TokenError) as err:
        await from_file(path)
    message = str(err.value)
    assert message.startswith(f"coder_token_file {path} (from ")
    assert what in message
    assert TOKEN[:8] not in message


async def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO (no writer) or a directory as the token file is refused at once: it never
    blocks the event loop, and the error says what it is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
        started = time.monotonic()
        with pytest.raises(TokenError, match=rf"not a regular file \({kind}\)"):
            await from_file(path)
        assert time.monotonic() - started < 2


async def test_a_huge_token_file_is_refused_unread(tmp_path: Path) -> None:
    """A 300 MiB token file is refused by its size, reading nothing of it."""
    path = tmp_path / "token"
    with path.open("wb") as fh:
        fh.truncate(300 << 20)  # sparse: cheap to make
    tracemalloc.start()
    try:
        with pytest.raises(TokenError, match="over max_token_file_bytes=65536"):
            await from_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


async def test_a_read_that_hangs_times_out_and_the_loop_keeps_running() -> None:
    """Blocking work runs on a daemon thread: a read stuck in the kernel ends in a timeout
    while the event loop goes on."""
    release = threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(ticker())
    try:
        with pytest.raises(TimeoutError):
            await off_loop(release.wait, 0.3, "test-hang")
    finally:
        beat.cancel()
        release.set()
    assert ticks >= 10


async def test_a_rewritten_bad_token_keeps_the_old_one_and_says_so(
    tmp_path: Path, log_output: io.StringIO,
) -> None:
    """A reload that finds a token a header cannot carry keeps the previous token and logs
    why, without either value."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    source = TokenSource(make_settings(coder_token_file=path))
    await source.load()
    path.write_bytes(b"new-token\r\nX-Injected: 1")
    assert not await source.reload()
    assert source.token == TOKEN
    [line] = [json.loads(x) for x in log_output.getvalue().splitlines()
              if json.loads(x)["event"] == "token_reload_failed"]
    assert "holds a control character (U+000D)" in line["error"]
    assert TOKEN not in log_output.getvalue()
    assert "new-token" not in log_output.getvalue()


async def test_the_watcher_survives_its_directory_vanishing(
    tmp_path: Path, log_output: io.StringIO,
) -> None:
    """When the token's directory disappears the watcher logs it, backs off and comes back;
    a token written once the directory is back is picked up."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    path = directory / "token"
    path.write_text(TOKEN)
    source = TokenSource(make_settings(coder_token_file=path))
    await source.load()
    stop = asyncio.Event()
    watcher = asyncio.create_task(source.watch(stop))
    try:
        first = str(uuid.uuid4())
        while source.token != first:  # until a rewrite is heard: the watch is on
            path.write_text(first)
            with contextlib.suppress(TimeoutError):
                await until(lambda: source.token == first, timeout_s=0.5)
        path.unlink()
        directory.rmdir()
        await until(lambda: "token_watch_failed" in log_output.getvalue(), timeout_s=10)
        directory.mkdir()
        new = str(uuid.uuid4())
        path.write_text(new)
        await until(lambda: source.token == new, timeout_s=10)
        assert not watcher.done()
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 5)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent_sidecar", *args], capture_output=True,
                          text=True, env=clean_env(**env), timeout=60, check=False)


def uploads_env(tmp_path: Path, **env: str) -> dict[str, str]:
    return {"CODER_AGENT_URL": "https://coder.example.com/",
            "AGENT_SIDECAR_TASK_ID": str(uuid.uuid4()),
            "AGENT_SIDECAR_SOCKET": str(tmp_path / "s"), **env}


@pytest.mark.parametrize("problem", ["unreadable", "fifo", "crlf", "not utf-8"])
async def test_config_runs_the_token_checks_that_run_runs(tmp_path: Path, problem: str) -> None:
    """`agent-sidecar config` refuses (exit 2) a token file that `run` would refuse, with the
    same one line, so it vets a configuration before a restart meets it."""
    path = tmp_path / "token"
    if problem == "fifo":
        os.mkfifo(path)
    elif problem == "crlf":
        path.write_bytes(b"abc\r\ndef")
    elif problem == "not utf-8":
        path.write_bytes(b"\xff\xfe\xfd")
    env = uploads_env(tmp_path, CODER_AGENT_TOKEN_FILE=str(path))
    configured, ran = await asyncio.gather(
        asyncio.to_thread(run_cli, "config", **env), asyncio.to_thread(run_cli, "run", **env))
    assert (configured.returncode, ran.returncode) == (2, 2)
    [line] = configured.stderr.strip().splitlines()
    assert line.startswith(f"agent-sidecar: coder_token_file {path} (from env "
                           "CODER_AGENT_TOKEN_FILE): ")
    assert line.removeprefix("agent-sidecar: ") in ran.stderr
    assert "Traceback" not in configured.stderr + ran.stderr
    assert "abc" not in configured.stderr + ran.stderr


async def test_config_and_run_refuse_a_socks_proxy_for_coderd(tmp_path: Path) -> None:
    """A SOCKS HTTPS_PROXY for the Coder URL stops `config` and `run` with exit 2 and a line
    that says what works instead; one that the Coder URL would not use is fine."""
    env = uploads_env(tmp_path, CODER_AGENT_TOKEN=TOKEN, HTTPS_PROXY="socks5://p:1080")
    configured, ran = await asyncio.gather(
        asyncio.to_thread(run_cli, "config", **env), asyncio.to_thread(run_cli, "run", **env))
    assert (configured.returncode, ran.returncode) == (2, 2)
    assert "HTTPS_PROXY=socks5://p:1080: SOCKS proxies are not supported; use an HTTP proxy" \
        in configured.stderr
    assert "SOCKS proxies are not supported" in ran.stderr
    exempt = await asyncio.to_thread(run_cli, "config", **env, NO_PROXY="coder.example.com")
    assert exempt.returncode == 0, exempt.stderr


async def test_a_socks_proxy_the_coder_url_would_not_use_is_no_start_up_error(
    tmp_path: Path,
) -> None:
    """A SOCKS HTTPS_PROXY with an http Coder URL (which HTTP_PROXY would carry) does not
    stop `config`: only a redirect to https would need it, and that upload then fails
    naming the proxy."""
    env = uploads_env(tmp_path, CODER_AGENT_TOKEN=TOKEN, HTTPS_PROXY="socks5://p:1080",
                      CODER_AGENT_URL="http://coder.example.com/")
    configured = await asyncio.to_thread(run_cli, "config", **env)
    assert configured.returncode == 0, configured.stderr
