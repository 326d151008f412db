"""The relay socket of the real daemon, fuzzed with hypothesis: random methods, paths,
headers and bodies get only 2xx and 4xx answers, every error is JSON, and it still serves."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standins import FakeAgentAPI

from tests.sidecar import clean_env

pytestmark = pytest.mark.faults


def request(path: str, method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request written as raw bytes, so the server may answer (and close)
    before the body is sent, as it does for a request line it rejects."""
    lines = [f"{method} {url} HTTP/1.1", "Host: sidecar", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(path)
        # If it answered early and closed, the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        return resp.status, resp.read()


class ThreadedAgent:
    """A FakeAgentAPI on its own event loop thread, for synchronous hypothesis tests."""

    def __init__(self) -> None:
        self.agent = FakeAgentAPI(chunks=1, chunk_delay_s=0, stable_after_s=0.01)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeAgentAPI:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(10)
        return self.agent

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.agent.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="as-fz-", dir="/tmp"))
    path = str(directory / "s")
    with ThreadedAgent() as agent:
        env = clean_env(AGENT_SIDECAR_SOCKET=path, AGENT_SIDECAR_LOG_LEVEL="warning")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_sidecar", "run", "--agentapi-url", agent.url,
             "--log-level", "info"], env=env, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stderr is not None
        stream = proc.stderr
        def read() -> None:
            for line in stream:
                lines.put(line)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            _wait_ready(lines)
            yield path
            assert proc.poll() is None, "the daemon died under fuzzing: " + "".join(
                list(lines.queue)[-5:])
        finally:
            proc.terminate()
            proc.wait(15)
            reader.join(15)
            stream.close()
            shutil.rmtree(directory, ignore_errors=True)


def _wait_ready(lines: queue.Queue[str]) -> None:
    """Until the daemon logs `ready` (its stderr is read on a thread into `lines`)."""
    deadline = time.monotonic() + 15
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if json.loads(line).get("event") == "ready":
            lines.queue.clear()
            return
    raise AssertionError("the daemon did not become ready")


json_value = st.one_of(
    st.text(max_size=20), st.integers(-10, 10**6), st.floats(allow_nan=True),
    st.booleans(), st.none(), st.sampled_from(["user", "raw", "  hi  ", ""]),
    st.lists(st.integers(), max_size=2),
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["input", "type", "wait_s", "extra", ""]), json_value,
                    max_size=4).map(lambda d: json.dumps(d).encode()),
    st.just(b'{"input": "hello from the fuzzer", "wait_s": 5}'),
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                        max_size=30)
headers = st.dictionaries(
    st.sampled_from(["X-Test", "Content-Type", "Origin", "Accept", "Expect-Nothing",
                     "X-Forwarded-For", "Cookie"]),
    header_values, max_size=3,
)
paths = st.one_of(
    st.sampled_from(["/send", "/status", "/healthz", "/metrics", "/", "/send/", "//send",
                     "/send?x=1", "/%2e%2e/etc"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./%", max_size=30).map(
        lambda p: "/" + p),
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                           "TRACE", "FOO"])


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, url=paths, body=bodies, extra=headers)
def test_random_requests_get_clean_answers(
    daemon: str, method: str, url: str, body: bytes | None, extra: dict[str, str],
) -> None:
    """Whatever arrives, the answer is 2xx or 4xx, and every error body is Coder's JSON."""
    status, raw = request(daemon, method, url, body, extra)
    assert 200 <= status < 500, (status, raw)
    if status >= 400 and method != "HEAD":
        data: Any = json.loads(raw)
        assert isinstance(data["message"], str)
        assert data["message"]
        assert "detail" in data


def test_daemon_still_serves_after_the_fuzzing(daemon: str) -> None:
    """After the fuzzing the daemon is healthy and delivers a plain send."""
    assert request(daemon, "GET", "/healthz")[0] == 200
    status, _ = request(daemon, "POST", "/send",
                        json.dumps({"input": "still there?"}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 204
