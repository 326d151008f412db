"""The upload policy: when to upload, what never goes up, retries, terminal outcomes, flush."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from standins import FakeCoderd, coder_error

from agent_sidecar.coder import CoderClient
from agent_sidecar.conversation import Conversation, Message
from agent_sidecar.metrics import Metrics
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack
from agent_sidecar.tokens import TokenSource
from agent_sidecar.uploader import Uploader

from .conftest import make_settings

T = "2026-04-10T12:34:56Z"


@dataclass
class Harness:
    coderd: FakeCoderd
    conv: Conversation
    uploader: Uploader
    sleeps: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.uploader.run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def expected(self) -> bytes:
        return pack(self.conv.messages(), self.uploader.cap).body

    def stored(self) -> bytes | None:
        [task] = self.coderd.tasks
        return self.coderd.snapshots.get(task)

    async def delivered(self, timeout_s: float = 5) -> None:
        """Until coderd stores the packed current conversation and the uploader knows it."""
        await self.coderd.wait_for(lambda: self.stored() == self.expected(), timeout_s)
        await self.until(lambda: self.uploader.last_accepted == self.expected(), timeout_s)

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 5) -> None:
        """Until `predicate` holds, re-checked whenever the uploader makes progress."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self.uploader.changed.wait()


async def instant(delay: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def make(
    coderd: FakeCoderd, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []
    async with aiohttp.ClientSession() as session:
        async def build(sleep: Callable[[float], Awaitable[None]] | None = None,
                        token_file: Path | None = None, timeout_s: float = 2.0,
                        **policy: float) -> Harness:
            task = coderd.add_task()
            tokens = TokenSource(None if token_file else coderd.token, token_file)
            defaults = {"settle_s": 0.05, "max_staleness_s": 0.5, "retry_initial_s": 1,
                        "retry_max_s": 8, "rejected_backoff_s": 300}
            settings = make_settings(coder_url=coderd.url, task_id=task,
                                     upload_timeout_s=timeout_s, **{**defaults, **policy})
            client = CoderClient(session, settings, tokens)
            conv = Conversation(CODERD_MAX_BODY_BYTES)
            sleeps: list[float] = []

            async def recording(delay: float) -> None:
                sleeps.append(delay)
                await (sleep or asyncio.sleep)(delay)

            uploader = Uploader(conv, settings, client, None, Metrics(),
                                sleep=recording, rng=random.Random(7))
            harness = Harness(coderd, conv, uploader, sleeps)
            harnesses.append(harness)
            return harness

        yield build
        for harness in harnesses:
            await harness.stop()


def user_turn(conv: Conversation, text: str = "hello", status: str = "stable") -> None:
    conv.upsert(Message(conv.count, "user", text, T))
    conv.set_status(status)  # type: ignore[arg-type]


async def test_a_stable_change_is_uploaded_after_settling(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """Once the agent is stable, a change goes up settle_s later, not before."""
    h = await make(settle_s=0.3)
    h.start()
    loop = asyncio.get_running_loop()
    changed_at = loop.time()
    user_turn(h.conv)
    await h.delivered()
    assert h.coderd.uploads[-1].at - changed_at >= 0.3
    assert len(h.coderd.uploads) == 1


async def test_while_running_uploads_are_paced_by_max_staleness(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """A long streamed reply is uploaded about every max_staleness_s, not on every update."""
    h = await make(max_staleness_s=0.3)
    h.start()
    user_turn(h.conv, status="running")
    h.conv.upsert(Message(1, "agent", "", T))
    loop = asyncio.get_running_loop()
    start = loop.time()
    i = 0
    while loop.time() - start < 1.2:
        i += 1
        h.conv.upsert(Message(1, "agent", "word " * i, T))
        await asyncio.sleep(0.01)  # the simulated agent's typing speed, not synchronisation
    assert 2 <= len(h.coderd.uploads) <= 6
    h.conv.set_status("stable")
    await h.delivered()
    assert i > 50  # many changes...
    assert len(h.coderd.uploads) <= 7  # ...few uploads


async def test_nothing_without_a_user_message(make: Callable[..., Awaitable[Harness]]) -> None:
    """A fresh agent (no user message yet) is never uploaded: it would wipe the history."""
    h = await make(settle_s=0)
    h.start()
    h.conv.upsert(Message(0, "agent", "Welcome! What should I do?", T))
    h.conv.set_status("stable")
    await h.until(lambda: h.uploader.synced_version == h.conv.version)
    assert h.coderd.uploads == []
    user_turn(h.conv)  # now there is something worth keeping
    await h.delivered()
    bodies = [json.loads(u.body) for u in h.coderd.uploads]
    assert all(any(m["role"] == "user" for m in b["messages"]) for b in bodies)


async def test_never_the_same_payload_twice(make: Callable[..., Awaitable[Harness]]) -> None:
    """A change that packs to what coderd already holds sends nothing."""
    h = await make(settle_s=0)
    h.start()
    user_turn(h.conv)
    await h.delivered()
    for _ in range(3):  # status flips change the model but not the payload
        h.conv.set_status("running")
        h.conv.set_status("stable")
    h.conv.upsert(Message(1, "agent", "new", T))
    await h.delivered()
    assert len(h.coderd.uploads) == 2


async def test_retries_back_off_exponentially_with_full_jitter(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """503s are retried with delays drawn from [0, min(cap, base * 2^n)]."""
    h = await make(sleep=instant, settle_s=0, retry_initial_s=1, retry_max_s=8)
    failures = 7

    async def hook(request: web.Request) -> web.StreamResponse | None:
        if len(h.coderd.uploads) < failures:
            return web.Response(status=503, text="upstream connect error")
        return None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered()
    assert len(h.coderd.uploads) == failures + 1
    assert len(h.sleeps) == failures
    for n, delay in enumerate(h.sleeps):
        assert 0 <= delay <= min(8, 2**n)
    assert len(set(h.sleeps)) == failures  # jittered, not a fixed ladder
    assert h.uploader.state == "ok"
    assert h.uploader.consecutive_failures == 0


@pytest.mark.parametrize(("retry_after", "low", "high"), [("5", 5, 5), ("3600", 8, 8)])
async def test_retry_after_is_honoured_and_capped(
    make: Callable[..., Awaitable[Harness]], retry_after: str, low: float, high: float
) -> None:
    """429's Retry-After sets the wait (at least), capped at retry_max_s."""
    h = await make(sleep=instant, settle_s=0, retry_max_s=8)
    responses = [coder_error(429, "You've been rate limited", headers={"Retry-After": retry_after})]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return responses.pop() if responses else None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered()
    assert len(h.sleeps) == 1
    assert low <= h.sleeps[0] <= high


async def test_every_retry_carries_the_newest_snapshot(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """Changes made while a retry waits are in the next attempt; the old body is never resent."""
    h = await make(settle_s=0)
    gate = asyncio.Event()

    async def sleep(delay: float) -> None:
        h.conv.upsert(Message(h.conv.count, "agent", f"newer {h.conv.count}", T))
        gate.set()
        await asyncio.sleep(0)

    h.uploader._sleep = sleep
    fail = [True, True]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return web.Response(status=502, text="Bad Gateway") if fail and fail.pop() else None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered()
    bodies = [u.body for u in h.coderd.uploads]
    assert len(bodies) == 3
    assert len(set(bodies)) == 3  # each attempt packed the state of its moment
    assert bodies[-1] == h.expected()


async def test_a_rejected_payload_is_not_retried(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """A 400 is logged with coderd's detail and that payload is not sent again."""
    h = await make(settle_s=0)
    answers = [coder_error(400, "Invalid agentapi payload structure.", "Missing required field.")]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return answers.pop() if answers else None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.state == "payload_rejected")
    h.conv.set_status("running")
    h.conv.set_status("stable")  # same payload: still not resent
    h.conv.upsert(Message(1, "agent", "different now", T))
    await h.delivered()
    assert len(h.coderd.uploads) == 2
    logged = [json.loads(x) for x in log_output.getvalue().splitlines()]
    [rejected] = [x for x in logged if x["event"] == "upload_payload_rejected"]
    assert rejected["detail"] == "Missing required field."


async def test_too_large_shrinks_the_cap_and_repacks(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """'request body too large' lowers the cap and the smaller snapshot is sent at once."""
    h = await make(settle_s=0)
    h.coderd.LIMIT = 20_000
    h.start()
    user_turn(h.conv, "x" * 30_000)
    h.conv.upsert(Message(1, "agent", "y" * 30_000, T))
    await h.until(lambda: h.uploader.state == "ok")
    stored = h.stored()
    assert stored is not None
    assert len(stored) <= 20_000
    assert h.uploader.cap < 65536
    assert [u.status for u in h.coderd.uploads][-1] == 204


async def test_a_reply_too_long_to_show_the_prompt_is_still_uploaded(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """An 80 000-character reply packs to its own tail only; the user message rule is about
    the conversation, so it still goes up."""
    h = await make(settle_s=0)
    h.start()
    user_turn(h.conv, "render the whole screen")
    h.conv.upsert(Message(1, "agent", "│" * 80_000, T))
    await h.delivered()
    stored = h.stored()
    assert stored is not None
    assert [m["role"] for m in json.loads(stored)["messages"]] == ["agent"]


async def test_token_rejected_rereads_the_file_and_resumes_on_change(
    make: Callable[..., Awaitable[Harness]], tmp_path: Path, log_output: io.StringIO,
) -> None:
    """401 re-reads CODER_AGENT_TOKEN_FILE, waits long, and ends the wait when it changes."""
    token_file = tmp_path / "token"
    token_file.write_text("11111111-2222-4333-8444-555555555555\n")
    forever = asyncio.Event()

    async def long_wait(delay: float) -> None:
        await forever.wait()

    h = await make(sleep=long_wait, token_file=token_file, settle_s=0)
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.state == "token_rejected")
    token_file.write_text(h.coderd.token + "\n")
    assert h.uploader.client is not None
    assert h.uploader.client.tokens.reload()  # what the file watcher does on a change
    await h.delivered()
    assert h.sleeps == [300]  # one long wait, cut short by the new token
    logged = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert logged.count("upload_token_rejected") == 1
    assert "upload_recovered" in logged
    assert h.coderd.token not in log_output.getvalue()


@pytest.mark.parametrize(("message", "state"), [
    ("Route not found.", "not_supported"),
    ("Resource not found or you do not have access to this resource", "task_not_found"),
])
async def test_the_two_404s_are_told_apart_and_logged_once(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO, message: str, state: str,
) -> None:
    """404 'Route not found.' means an old coderd, any other 404 a foreign task; logged once."""
    h = await make(sleep=instant, settle_s=0)

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return coder_error(404, message)

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.attempts >= 5)
    assert h.uploader.state == state
    assert h.uploader.failing is not None
    assert set(h.sleeps) == {300}
    logged = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert logged.count(f"upload_{state}") == 1


async def test_a_hung_coderd_times_out_and_is_retried(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """An attempt that gets no answer ends at the per-attempt timeout and is retried."""
    h = await make(sleep=instant, timeout_s=0.2, settle_s=0)
    hang = [asyncio.Event()]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        if hang:
            await hang.pop().wait()
        return None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered()
    assert h.sleeps  # one back-off after the timeout
    assert h.uploader.attempts == 2


async def test_flush_sends_the_final_state_from_memory(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """The final flush uploads what the model holds, with no agentapi involved."""
    h = await make(settle_s=30, max_staleness_s=30)
    h.start()
    user_turn(h.conv, status="running")
    h.conv.upsert(Message(1, "agent", "the last words", T))
    await h.stop()
    assert h.coderd.uploads == []
    assert await h.uploader.flush()
    assert h.stored() == h.expected()


async def test_flush_gives_up_on_a_rejected_token(
    make: Callable[..., Awaitable[Harness]], tmp_path: Path,
) -> None:
    """At shutdown a 401 ends the flush at once rather than waiting out the deadline."""
    token_file = tmp_path / "token"
    token_file.write_text("11111111-2222-4333-8444-555555555555")
    h = await make(token_file=token_file)
    user_turn(h.conv)
    async with asyncio.timeout(5):
        assert not await h.uploader.flush()
    assert h.uploader.state == "token_rejected"
