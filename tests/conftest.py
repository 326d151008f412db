"""Shared fixtures: protocol stand-ins on loopback, short socket paths, captured logs."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.abc import AbstractStreamWriter
from standins import FakeAgentAPI, FakeCoderd
from yarl import URL

from agent_sidecar import logs
from agent_sidecar.config import Settings


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgentAPI]:
    async with FakeAgentAPI(chunk_delay_s=0.01, stable_after_s=0.05) as fake:
        yield fake


@pytest.fixture
async def coderd() -> AsyncIterator[FakeCoderd]:
    async with FakeCoderd() as fake:
        yield fake


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Every log line the code under test writes, as JSON lines. Nothing is rate-limited
    here, so a test that says "logged once" sees every line the code emits."""
    stream = io.StringIO()
    logs.configure("debug", "json", stream=stream, limiter=logs.RepeatLimiter(window_s=0))
    try:
        yield stream
    finally:
        logs.reset()


def make_settings(**values: Any) -> Settings:
    """Settings for a component under test: no Coder, no sink, quick reconnects, plus
    `values`. Everything else is the product's default."""
    base: dict[str, Any] = {
        "coder_url": None, "coder_token": None, "coder_token_file": None, "task_id": None,
        "sink_dir": None, "reconnect_initial_s": 0.01, "reconnect_max_s": 0.05,
    }
    return Settings(**{**base, **values})


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0,
                wake: Callable[[], Awaitable[object]] | None = None) -> None:
    """Wait until `predicate()` holds, re-checking whenever `wake()` returns (else each turn
    of the loop)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            if wake is not None:
                await wake()
            else:
                await asyncio.sleep(0)


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` argument
    (pnuckowski/aioresponses#289); supply the one attribute aiohttp reads from it."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", cast(AbstractStreamWriter, _SentWriter()))
        super().__init__(method, url, **kwargs)


class _SentWriter:
    output_size = 0


class Datagrams:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.received: list[str] = []

    async def until(self, line: str, timeout_s: float = 10) -> list[str]:
        """Receive datagrams until one contains `line`; return all received so far."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while not any(line in d.splitlines() for d in self.received):
                data = await loop.sock_recv(self.sock, 4096)
                self.received.append(data.decode())
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stream_limited() -> Iterator[tuple[io.StringIO, list[float]]]:
    """The log lines, as JSON, through a repeat limiter with a 60 s window on a clock the
    test sets (`now[0]`), so that repeats are limited as in production."""
    stream, now = io.StringIO(), [0.0]
    logs.configure("debug", "json", stream=stream,
                   limiter=logs.RepeatLimiter(window_s=60, clock=lambda: now[0]))
    try:
        yield stream, now
    finally:
        logs.reset()
