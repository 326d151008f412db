"""The upload policy: when to upload, what never goes up, retries, terminal outcomes, flush."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from standins import FakeCoderd, coder_error, front_body_limit

from agent_sidecar.aio import Pulse
from agent_sidecar.coder import CoderClient, Outcome
from agent_sidecar.conversation import Conversation, Message
from agent_sidecar.metrics import Metrics
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, MIN_SNAPSHOT_BYTES, Packed, pack
from agent_sidecar.tokens import TokenSource
from agent_sidecar.uploader import CAP_SEARCH_RESOLUTION_BYTES, Uploader

from .conftest import make_settings, until

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


class FakeClock:
    """Simulated time: `sleep()` moves it on at once, so hours pass in milliseconds."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.t += delay
        await asyncio.sleep(0)


@pytest.fixture
async def make(
    coderd: FakeCoderd, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []
    async with aiohttp.ClientSession() as session:
        async def build(sleep: Callable[[float], Awaitable[None]] | None = None,
                        token_file: Path | None = None, timeout_s: float = 2.0,
                        clock: FakeClock | None = None, gone: Pulse | None = None,
                        **policy: float) -> Harness:
            task = coderd.add_task()
            defaults = {"settle_s": 0.05, "max_staleness_s": 0.5, "retry_initial_s": 1,
                        "retry_max_s": 8, "rejected_backoff_s": 300}
            settings = make_settings(coder_url=coderd.url, task_id=task,
                                     coder_token=None if token_file else coderd.token,
                                     coder_token_file=token_file,
                                     upload_timeout_s=timeout_s, **{**defaults, **policy})
            tokens = TokenSource(settings)
            await tokens.load()
            client = CoderClient(session, settings, tokens)
            conv = (Conversation(CODERD_MAX_BODY_BYTES, clock.now) if clock
                    else Conversation(CODERD_MAX_BODY_BYTES))
            sleeps: list[float] = []

            async def recording(delay: float) -> None:
                sleeps.append(delay)
                await (sleep or asyncio.sleep)(delay)

            uploader = Uploader(conv, settings, client, None, Metrics(), agentapi_gone=gone,
                                sleep=recording, rng=random.Random(7),
                                clock=clock.now if clock else time.monotonic)
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
    await until(lambda: h.sleeps == [300])  # its own re-read found nothing new: it waits
    token_file.write_text(h.coderd.token + "\n")
    assert h.uploader.client is not None
    assert await h.uploader.client.tokens.reload()  # what the file watcher does on a change
    await h.delivered()
    assert h.sleeps == [300]  # one long wait, cut short by the new token
    logged = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert logged.count("upload_token_rejected") == 1
    assert "upload_recovered" in logged
    assert h.coderd.token not in log_output.getvalue()


@pytest.mark.parametrize(("message", "state"), [
    ("Route not found.", "tasks_unavailable"),
    ("Resource not found or you do not have access to this resource", "task_not_found"),
])
async def test_the_two_404s_are_told_apart_and_logged_once(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO, message: str, state: str,
) -> None:
    """404 'Route not found.' means a Coder without Tasks, any other 404 a foreign task;
    each is logged once and re-checked every rejected_backoff_s."""
    h = await make(sleep=instant, settle_s=0)

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return coder_error(404, message)

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.attempts >= 5)
    assert h.uploader.state == state
    assert set(h.sleeps) == {300}
    logged = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert logged.count(f"upload_{state}") == 1


async def test_tasks_unavailable_is_a_state_not_a_failure_and_never_says_upgrade(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """On a Coder without Tasks the state is tasks_unavailable, /healthz stays healthy, and
    the one log line names the versions, the CODER_ENABLE_AI_TASKS flag and what keeps
    working, without the word "upgrade"."""
    h = await make(sleep=instant, settle_s=0)
    h.coderd.tasks_served = False
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.attempts >= 3)
    assert h.uploader.state == "tasks_unavailable"
    assert h.uploader.failing is None
    assert h.uploader.oldest_unstored_age_s is not None  # not stored, and that is fine
    lines = [json.loads(x) for x in log_output.getvalue().splitlines()]
    [said] = [x for x in lines if x["event"] == "upload_tasks_unavailable"]
    for words in ("v2.36", "v2.37", "CODER_ENABLE_AI_TASKS=true", "the sink and the relay "
                  "keep working", "re-checked every 300s"):
        assert words in said["hint"]
    assert "upgrade" not in log_output.getvalue().lower()


async def test_tasks_removed_for_an_hour_costs_one_attempt_per_rejected_backoff(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """With Tasks gone and the agent busy all along, one simulated hour costs at most
    3600 / rejected_backoff_s + 1 attempts: changes never add any."""
    clock = FakeClock()
    hour_over = asyncio.Event()

    async def sleep(delay: float) -> None:
        if clock.t + delay > start + 3600:
            hour_over.set()
            await asyncio.Event().wait()  # time stops at the end of the hour
        await clock.sleep(delay)
        h.conv.upsert(Message(h.conv.count, "agent", f"still working at {clock.t}", T))

    start = clock.t
    h = await make(sleep=sleep, clock=clock, settle_s=0.5, max_staleness_s=10)
    h.coderd.tasks_served = False
    h.start()
    user_turn(h.conv, status="running")
    async with asyncio.timeout(10):
        await hour_over.wait()
    attempts = len(h.coderd.uploads)
    assert attempts <= 3600 / 300 + 1
    assert attempts >= 3600 / 300  # and it did keep re-checking
    assert h.uploader.state == "tasks_unavailable"
    assert h.conv.count > attempts  # the agent moved on far more often than that


async def test_tasks_coming_back_is_noticed_at_the_next_recheck(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """When an admin turns Tasks on, the next re-check stores the snapshot."""
    h = await make(sleep=instant, settle_s=0)
    h.coderd.tasks_served = False

    async def turn_on(request: web.Request) -> web.StreamResponse | None:
        h.coderd.tasks_served = len(h.coderd.uploads) >= 2
        return None

    h.coderd.hook = turn_on
    h.start()
    user_turn(h.conv)
    await h.delivered()
    assert [u.status for u in h.coderd.uploads] == [404, 404, 204]
    assert h.uploader.state == "ok"


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


# -- health means "stored" ---------------------------------------------------------------


async def test_a_transient_failure_is_unhealthy_only_once_the_oldest_change_is_too_old(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """While coderd answers 503, /healthz stays healthy until the oldest unstored change is
    older than unhealthy_after_s (80 s at the defaults), however many attempts failed."""
    clock = FakeClock()
    stop_at = asyncio.Event()

    async def sleep(delay: float) -> None:
        await clock.sleep(min(delay, 1.0))  # time moves in small steps, checked between
        if h.uploader.oldest_unstored_age_s is not None and \
                h.uploader.oldest_unstored_age_s > 100:
            stop_at.set()
            await asyncio.Event().wait()

    h = await make(sleep=sleep, clock=clock, settle_s=0, max_staleness_s=10, retry_max_s=60)
    assert h.uploader.settings.unhealthy_after_s == 80  # 2 x 10 + 60

    seen: list[tuple[float, bool]] = []

    async def down(request: web.Request) -> web.StreamResponse | None:
        age = h.uploader.oldest_unstored_age_s
        assert age is not None
        seen.append((age, h.uploader.failing is not None))
        return web.Response(status=503, text="upstream connect error")

    h.coderd.hook = down
    h.start()
    user_turn(h.conv)
    async with asyncio.timeout(10):
        await stop_at.wait()
    assert len(seen) > 5
    assert all(not failing for age, failing in seen if age <= 80)
    assert all(failing for age, failing in seen if age > 80.5)
    reason = h.uploader.failing
    assert reason is not None
    assert "over unhealthy_after_s=80" in reason
    assert "HTTP 503" in reason


@pytest.mark.parametrize(("answer", "state"), [
    (lambda: web.Response(status=307, headers={"Location": "http://elsewhere.test/x?sig=1"}),
     "redirected"),
    (lambda: coder_error(401, "Workspace agent not authorized."), "token_rejected"),
    (lambda: coder_error(404, "Resource not found or you do not have access to this "
                         "resource"), "task_not_found"),
])
async def test_failures_that_waiting_cannot_heal_are_unhealthy_at_once(
    make: Callable[..., Awaitable[Harness]], answer: Callable[[], web.Response], state: str,
) -> None:
    """A redirect it will not follow, a rejected token or a foreign task make /healthz
    unhealthy at the first attempt that leaves the newest state unstored."""
    h = await make(sleep=instant, settle_s=0)

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return answer()

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.state == state)
    reason = h.uploader.failing
    assert reason is not None
    assert reason.startswith(f"uploads: {state} (HTTP ")
    assert "sig=1" not in reason


async def test_nothing_to_store_is_never_a_failure(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """Without a user message there is nothing coderd should hold, so even a rejected token
    leaves /healthz healthy; once something is held, a failing upload of an unchanged body
    is not attempted at all."""
    h = await make(sleep=instant, settle_s=0)
    h.start()
    h.conv.upsert(Message(0, "agent", "Welcome!", T))
    h.conv.set_status("stable")
    await h.until(lambda: h.uploader.synced_version == h.conv.version)
    assert h.uploader.failing is None
    assert h.uploader.oldest_unstored_age_s is None
    user_turn(h.conv)
    await h.delivered()
    assert h.uploader.oldest_unstored_age_s is None
    assert h.uploader.failing is None


# -- a front's body limit ------------------------------------------------------------------


async def test_a_16kib_front_ends_with_the_newest_message_stored_within_its_limit(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """An nginx-style HTML 413 for bodies over 16 KiB shrinks the cap at once; the stored
    snapshot is at most 16 KiB and holds the newest message, and the cap search settles
    below the limit instead of probing for ever."""
    h = await make(sleep=instant, settle_s=0)
    h.coderd.hook = front_body_limit(16 * 1024)
    h.start()
    for i in range(6):  # packs to about 24 KB
        h.conv.upsert(Message(i, "user" if i % 2 == 0 else "agent", f"{i} " + "x" * 4000, T))
    h.conv.set_status("stable")
    await h.until(lambda: h.uploader.state == "ok" and h.uploader.synced_version
                  == h.conv.version)
    first = h.stored()
    assert first is not None
    assert len(first) <= 16 * 1024
    assert json.loads(first)["messages"][-1]["content"].startswith("5 ")
    # The conversation moves on: each later body climbs back toward the limit, not past it
    # for long, and settles.
    for i in range(6, 30):
        h.conv.upsert(Message(i, "user" if i % 2 == 0 else "agent", f"{i} " + "y" * 4000, T))
        await h.until(lambda: h.uploader.synced_version == h.conv.version)
    stored = h.stored()
    assert stored is not None
    assert len(stored) <= 16 * 1024
    assert json.loads(stored)["messages"][-1]["content"].startswith("29 ")
    # The cap bounds the body, which can fall short of it: it settles near the limit.
    assert abs(h.uploader.cap - 16 * 1024) <= CAP_SEARCH_RESOLUTION_BYTES
    refusals = [u for u in h.coderd.uploads if u.status == 413]
    assert len(refusals) <= 8  # log2(64 KiB / 1 KiB) and a few: it settled
    tail = [u.status for u in h.coderd.uploads[-10:]]
    assert tail == [204] * 10  # settled: no more probing
    warned = [json.loads(x) for x in log_output.getvalue().splitlines()
              if json.loads(x)["event"] == "snapshot_too_large"
              and json.loads(x)["level"] == "warning"]
    assert len(warned) == 1
    assert "HTTP 413 (text/html): 413 Request Entity Too Large" in warned[0]["answer"]


async def test_a_body_too_large_at_the_floor_is_unhealthy_at_once(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """When even a 1 KiB snapshot is refused as too large, the state is too_large and
    /healthz says so at once; the cap never goes below the floor."""
    h = await make(sleep=instant, settle_s=0)
    h.coderd.hook = front_body_limit(512)
    h.start()
    user_turn(h.conv, "z" * 5000)
    await h.until(lambda: h.uploader.state == "too_large")
    assert h.uploader.cap == MIN_SNAPSHOT_BYTES
    reason = h.uploader.failing
    assert reason is not None
    assert reason.startswith("uploads: too_large (HTTP 413 (text/html)")


async def test_a_forgotten_refusal_lets_the_cap_climb_when_the_front_is_raised(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """A 413 is remembered for rejected_backoff_s only: after that, a body that fits lets
    the cap climb back to max_snapshot_bytes once the front takes more."""
    clock = FakeClock()
    h = await make(sleep=clock.sleep, clock=clock, settle_s=0)
    limit = [8 * 1024]

    async def front(request: web.Request) -> web.StreamResponse | None:
        return await front_body_limit(limit[0])(request)

    h.coderd.hook = front
    h.start()
    for i in range(10):
        h.conv.upsert(Message(i, "user", f"{i} " + "q" * 4000, T))
        await h.until(lambda: h.uploader.synced_version == h.conv.version)
    assert h.uploader.cap <= 8 * 1024 + CAP_SEARCH_RESOLUTION_BYTES
    limit[0] = 65536  # the admin raised client_max_body_size
    clock.t += 301  # the refusal is forgotten
    for i in range(10, 20):
        h.conv.upsert(Message(i, "user", f"{i} " + "q" * 4000, T))
        await h.until(lambda: h.uploader.synced_version == h.conv.version)
    assert h.uploader.cap == 65536
    stored = h.stored()
    assert stored is not None
    assert len(stored) > 40_000


# -- the last writer -----------------------------------------------------------------------


async def test_the_final_flush_is_made_even_when_coderd_already_had_that_body(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """Another writer (the module's stop script) may have replaced the snapshot, so the
    final upload goes up even when coderd accepted the same body before."""
    h = await make(settle_s=0)
    h.start()
    user_turn(h.conv)
    await h.delivered()
    await h.stop()
    [task] = h.coderd.tasks
    h.coderd.snapshots[task] = b'{"messages":[]}'  # the stop script wrote last
    assert await h.uploader.flush()
    assert h.stored() == h.expected()
    assert [u.body for u in h.coderd.uploads] == [h.expected(), h.expected()]


async def test_the_final_flush_is_skipped_while_tasks_are_unavailable(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """With Tasks unavailable the final upload would fail the same way: it is skipped."""
    h = await make(sleep=instant, settle_s=0)
    h.coderd.tasks_served = False
    h.start()
    user_turn(h.conv)
    await h.until(lambda: h.uploader.state == "tasks_unavailable")
    await h.stop()
    before = len(h.coderd.uploads)
    assert not await h.uploader.flush()
    assert len(h.coderd.uploads) == before


async def test_agentapi_going_away_brings_one_more_upload_of_the_same_body(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """After agentapi goes away the current snapshot is uploaded once more, unchanged,
    reupload_settle_s later, so it lands after what the module's stop script wrote."""
    gone = Pulse()
    h = await make(settle_s=0, gone=gone, reupload_settle_s=0.2)
    h.start()
    user_turn(h.conv)
    await h.delivered()
    [task] = h.coderd.tasks
    h.coderd.snapshots[task] = b'{"messages":[{"id":9,"content":"last 10 only"}]}'
    loop = asyncio.get_running_loop()
    gone_at = loop.time()
    gone.notify()
    await h.coderd.wait_for(lambda: h.stored() == h.expected())
    assert h.coderd.uploads[-1].at - gone_at >= 0.2
    assert [u.body for u in h.coderd.uploads] == [h.expected(), h.expected()]
    assert h.uploader.reuploads == 1
    logged = [json.loads(x)["event"] for x in log_output.getvalue().splitlines()]
    assert logged.count("reupload_after_agentapi_gone") == 1


async def test_a_flapping_agentapi_costs_at_most_three_extra_uploads_a_minute(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """agentapi going away every second for a minute costs at most 3 extra uploads at the
    defaults (reupload_min_interval_s = 30 s); here the same ratios run 60 times faster:
    away every 1/60 s for 1 s, at most one forced upload per 0.5 s."""
    gone = Pulse()
    h = await make(settle_s=0, gone=gone, reupload_settle_s=0.5 / 60,
                   reupload_min_interval_s=0.5)
    h.start()
    user_turn(h.conv)
    await h.delivered()
    before = len(h.coderd.uploads)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 1.0:
        gone.notify()
        await asyncio.sleep(1 / 60)  # agentapi's flapping pace, not synchronisation
    extra = [u for u in h.coderd.uploads[before:] if u.at - start <= 1.0]
    assert 1 <= len(extra) <= 3
    assert all(u.body == h.expected() for u in extra)
    assert h.uploader.reuploads == len(h.coderd.uploads) - before


async def test_no_forced_upload_while_tasks_are_unavailable_or_without_a_user_message(
    make: Callable[..., Awaitable[Harness]],
) -> None:
    """agentapi going away forces no upload while Tasks is unavailable, nor when the
    conversation has no user message."""
    gone = Pulse()

    async def sleep(delay: float) -> None:
        if delay >= 300:
            await asyncio.Event().wait()  # the re-check of Tasks is far away

    h = await make(sleep=sleep, settle_s=0, gone=gone, reupload_settle_s=0)
    h.start()
    h.conv.upsert(Message(0, "agent", "Welcome!", T))
    gone.notify()
    await h.until(lambda: h.uploader.synced_version == h.conv.version)
    await until(lambda: h.uploader._reupload_at is None)
    assert h.coderd.uploads == []
    h.coderd.tasks_served = False
    user_turn(h.conv)
    await h.until(lambda: h.uploader.state == "tasks_unavailable")
    attempts = len(h.coderd.uploads)
    gone.notify()
    for _ in range(50):
        await asyncio.sleep(0)
    assert h.uploader.reuploads == 0
    assert len(h.coderd.uploads) == attempts


# -- nothing kills the uploader ------------------------------------------------------------


async def test_an_unexpected_error_is_logged_backed_off_and_survived(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the upload loop itself (here: packing) is logged with its error, backed
    off, and the uploader carries on and stores the snapshot."""
    h = await make(sleep=instant, settle_s=0)
    calls = 0

    def flaky(messages: list[Message], max_bytes: int) -> Packed:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the packer")
        return pack(messages, max_bytes)

    monkeypatch.setattr("agent_sidecar.uploader.pack", flaky)
    h.start()
    user_turn(h.conv)
    await h.delivered()
    logged = [json.loads(x) for x in log_output.getvalue().splitlines()]
    [error] = [x for x in logged if x["event"] == "uploader_error"]
    assert error["error"] == "RuntimeError: a bug in the packer"
    assert h.task is not None
    assert not h.task.done()


async def test_a_client_bug_during_the_final_flush_is_retried_not_fatal(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception from the Coder client in the final flush is logged and the
    upload retried like a network error, so the snapshot still lands."""
    h = await make(sleep=instant, settle_s=0)
    assert h.uploader.client is not None
    real = h.uploader.client.upload
    boom = [ValueError("a header aiohttp would not send")]

    async def flaky(body: bytes) -> Outcome:
        if boom:
            raise boom.pop()
        return await real(body)

    monkeypatch.setattr(h.uploader.client, "upload", flaky)
    user_turn(h.conv)
    assert await h.uploader.flush()
    assert h.stored() == h.expected()
    logged = [json.loads(x) for x in log_output.getvalue().splitlines()]
    [error] = [x for x in logged if x["event"] == "upload_error"]
    assert error["error"] == "ValueError: a header aiohttp would not send"


async def test_a_garbage_retry_after_is_named_in_the_log_and_retried(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """A 429 whose Retry-After is garbage is retried on the usual back-off, and the value
    is named in the log."""
    h = await make(sleep=instant, settle_s=0)
    answers = [coder_error(429, "slow down", headers={"Retry-After": "in a while"})]

    async def hook(request: web.Request) -> web.StreamResponse | None:
        return answers.pop() if answers else None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered()
    logged = [json.loads(x) for x in log_output.getvalue().splitlines()]
    [note] = [x for x in logged if x["event"] == "coderd_answer_ignored"]
    assert note["note"].startswith("ignored Retry-After 'in a while'")
    assert note["status"] == 429


async def test_two_thousand_failed_retries_never_overflow_the_back_off(
    make: Callable[..., Awaitable[Harness]], log_output: io.StringIO,
) -> None:
    """The back-off exponent is bounded: 2 000 consecutive 503s (far past the 1 025 that
    would overflow 2**n as a float) are retried at the cap, and the upload then lands."""
    h = await make(sleep=instant, settle_s=0, retry_initial_s=1, retry_max_s=8)
    failures = 2000

    async def hook(request: web.Request) -> web.StreamResponse | None:
        if len(h.coderd.uploads) < failures:
            return web.Response(status=503)
        return None

    h.coderd.hook = hook
    h.start()
    user_turn(h.conv)
    await h.delivered(timeout_s=60)
    assert len(h.coderd.uploads) == failures + 1
    assert max(h.sleeps) <= 8
    assert "uploader_error" not in log_output.getvalue()  # no OverflowError survived either
