"""Small waiting helpers for tests: a hook that never answers, and a wait on a file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles
from aiohttp import web

Hook = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def hanging(entered: asyncio.Event | None = None) -> Hook:
    """A hook that never answers (a hung coderd or agentapi); sets `entered` when called."""
    async def hook(request: web.Request) -> web.StreamResponse | None:
        if entered is not None:
            entered.set()
        await asyncio.Event().wait()
        return None

    return hook


async def drop_after_reading(request: web.Request) -> web.StreamResponse | None:
    """A hook that reads the request, then drops the connection without an answer: the
    peer took the input, and the client cannot know what became of it."""
    await request.read()
    assert request.transport is not None
    request.transport.abort()
    await asyncio.Event().wait()
    return None


async def wait_for_file(path: Path, content: bytes, timeout_s: float) -> None:
    """Until `path` holds `content`, woken by filesystem events. The watcher also wakes every
    200 ms without one, so a write just before it started watching is not missed."""
    if _holds(path, content):
        return
    stop = asyncio.Event()
    async with asyncio.timeout(timeout_s):
        async for _ in watchfiles.awatch(path.parent, stop_event=stop, debounce=10, step=10,
                                         rust_timeout=200, yield_on_timeout=True):
            if _holds(path, content):
                stop.set()
                return


def _holds(path: Path, content: bytes) -> bool:
    # A read of one small local file: not worth a thread.
    return path.exists() and path.read_bytes() == content
