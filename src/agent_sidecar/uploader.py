"""When to upload, how to retry, and the final flush.

There is no queue. The conversation is the pending slot: every attempt packs the newest
state, so memory stays flat however long coderd is down and a retry never carries an old
snapshot. One attempt is in flight at most, because run() awaits each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

from agent_sidecar import logs
from agent_sidecar.aio import Backoff, Pulse, first_of
from agent_sidecar.coder import CoderClient, Outcome, Result
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import Metrics
from agent_sidecar.sink import Sink
from agent_sidecar.snapshot import MIN_SNAPSHOT_BYTES, Packed, pack

log = logs.get("uploader")

PERSISTENT_FAILURES = 3  # consecutive failed attempts before /healthz says so


class Uploader:
    """Keeps coderd (and the sink) holding the newest snapshot of one Conversation.

    `run()` uploads as the policy in `settings` says until cancelled; it never raises
    anything else. `flush()` is the final upload; it returns whether the newest state is
    held, and a cancel stops it mid-attempt. Policy numbers are read from `settings` at each
    use, so `reconfigure()` takes effect at once. `changed` is notified whenever the state
    that /status shows changes. It owns no task.
    """

    def __init__(
        self,
        conversation: Conversation,
        settings: Settings,
        client: CoderClient | None,
        sink: Sink | None,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        on_packed: Callable[[Packed, str], None] | None = None,
    ) -> None:
        self.conversation = conversation
        self.settings = settings
        self.client = client
        self.sink = sink
        self.metrics = metrics
        self.cap = settings.max_snapshot_bytes
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_packed = on_packed or (lambda _p, _how: None)
        self._synced_version = -1
        self._dirty_since: float | None = None
        self._rejected: bytes | None = None
        self.last_accepted: bytes | None = None
        # For /status and /healthz.
        self.state = "idle"
        self.last_outcome: str | None = None
        self.last_success_unix: float | None = None
        self.consecutive_failures = 0
        self.attempts = 0  # started
        self.outcomes = 0  # finished, with an outcome
        self.changed = Pulse()

    @property
    def synced_version(self) -> int:
        """The conversation version the last finished sync covered."""
        return self._synced_version

    def reconfigure(self, settings: Settings) -> None:
        """Use new policy settings from now on; a new cap replaces any shrunken one."""
        if settings.max_snapshot_bytes != self.settings.max_snapshot_bytes:
            self.cap = settings.max_snapshot_bytes
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def failing(self) -> str | None:
        """Why uploads are failing persistently, or None."""
        if self.state in ("token_rejected", "task_not_found", "not_supported"):
            return f"uploads: {self.state} ({self.last_outcome})"
        if self.consecutive_failures >= PERSISTENT_FAILURES:
            return f"uploads: {self.consecutive_failures} failures in a row ({self.last_outcome})"
        return None

    # -- the loop ----------------------------------------------------------------------

    @property
    def has_destination(self) -> bool:
        return self.client is not None or self.sink is not None

    async def run(self) -> None:
        """Upload as the policy says until cancelled."""
        if not self.has_destination:
            # Neither Coder nor a sink: following alone still serves the relay and /status.
            await asyncio.Event().wait()
        conv = self.conversation
        while True:
            seen = conv.version
            if seen == self._synced_version:
                await conv.wait_changed(seen)
                continue
            if self._dirty_since is None:
                self._dirty_since = conv.changed_at
            delay = self._due() - self._clock()
            if delay > 0:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # races with the wait finishing, and this loop would outlive shutdown.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await conv.wait_changed(seen)
                continue
            await self._sync(final=False)

    def _due(self) -> float:
        assert self._dirty_since is not None
        stale = self._dirty_since + self.settings.max_staleness_s
        if self.conversation.status == "running":
            return stale
        return min(self.conversation.changed_at + self.settings.settle_s, stale)

    async def flush(self) -> bool:
        """The final upload from memory, retried until the caller's deadline.

        True if coderd holds the newest state (or there is nothing it should hold). A
        rejected token or task ends it at once: no retry can change those in time.
        """
        if not self.has_destination:
            return True
        if self._synced_version == self.conversation.version and self.state in ("ok", "idle"):
            await self._mirror()  # a shutdown may have cut the sink's copy short
            return True
        log.info("final_flush", messages=self.conversation.count)
        return await self._sync(final=True)

    # -- one sync: pack, deliver, retry until done -------------------------------------

    async def _sync(self, final: bool) -> bool:
        backoff = Backoff(self._rng)
        while True:
            version = self.conversation.version
            started = self._clock()
            packed = pack(self.conversation.messages(), self.cap)
            if not self.conversation.has_user or packed.body == self.last_accepted:
                # Nothing coderd should get: a fresh or restarted agent (no user message)
                # would wipe the history users see while the task resumes, and a repeat
                # would only cost a request.
                self._mark_synced(version, started)
                return True
            if packed.body == self._rejected:
                self._mark_synced(version, started)
                return False  # coderd refused exactly this; it does not hold it
            self.metrics.snapshot_bytes.set(packed.size)
            self.metrics.snapshot_messages.set(packed.messages)
            if packed.truncated:
                self.metrics.truncations.inc()
            if backoff.failures:
                self.metrics.upload_retries.inc()
            outcome = await self._deliver(packed)
            self._record(outcome)
            result = outcome.result
            if result is Result.ACCEPTED:
                self.last_accepted = packed.body
                self._on_packed(packed, "uploaded" if self.client else "written")
                self._mark_synced(version, started)
                await self._mirror()
                return True
            if result is Result.PAYLOAD_REJECTED:
                if outcome.too_large and self.cap > MIN_SNAPSHOT_BYTES:
                    self.cap = max(MIN_SNAPSHOT_BYTES, min(self.cap, packed.size) * 7 // 8)
                    log.warning("snapshot_too_large", new_cap_bytes=self.cap,
                                detail=outcome.detail)
                    continue
                self._rejected = packed.body
                self._mark_synced(version, started)
                return False
            if result is Result.RETRY:
                delay = backoff.next_delay(self.settings.retry_initial_s,
                                           self.settings.retry_max_s)
                if outcome.retry_after_s is not None:
                    delay = max(delay, min(outcome.retry_after_s, self.settings.retry_max_s))
                await self._pause(delay, None)
                continue
            # Token or task rejected: nothing will change soon; wait long, or for a new token.
            if final:
                return False
            wake = None
            if result is Result.TOKEN_REJECTED and self.client:
                tokens = self.client.tokens
                tokens.changed.clear()
                if tokens.reload():
                    continue  # the file already holds a new token: try it now
                wake = tokens.changed  # a rewrite noticed by the watcher ends the wait
            await self._pause(self.settings.rejected_backoff_s, wake)

    async def _mirror(self) -> None:
        """With Coder and a sink, the sink mirrors what coderd accepted."""
        if self.client is None or self.sink is None or self.last_accepted is None:
            return
        if not await self.sink.write(self.last_accepted):
            self.metrics.sink_errors.inc()
            log.warning("sink_write_failed", error=self.sink.error)

    async def _deliver(self, packed: Packed) -> Outcome:
        self.attempts += 1
        if self.client is None:
            assert self.sink is not None
            if await self.sink.write(packed.body):
                return Outcome(Result.ACCEPTED)
            self.metrics.sink_errors.inc()
            return Outcome(Result.RETRY, message=f"sink write failed: {self.sink.error}")
        started = time.perf_counter()
        outcome = await self.client.upload(packed.body)
        self.metrics.upload_duration.observe(time.perf_counter() - started)
        return outcome

    async def _pause(self, delay: float, wake: asyncio.Event | None) -> None:
        if wake is None:
            await self._sleep(delay)
        else:
            await first_of(self._sleep(delay), wake.wait())

    def _mark_synced(self, version: int, started: float) -> None:
        self._synced_version = version
        # Changes that landed during the attempt are not in it: they count from its start.
        self._dirty_since = started if self.conversation.version != version else None
        self.changed.notify()

    def _record(self, outcome: Outcome) -> None:
        self.outcomes += 1
        self.changed.notify()
        self.metrics.uploads.labels(result=outcome.result.value).inc()
        if outcome.result is Result.ACCEPTED:
            self.last_outcome = "accepted"
            self.consecutive_failures = 0
            self.last_success_unix = time.time()
            self.metrics.last_success.set(self.last_success_unix)
            if self.state not in ("ok", "idle"):
                log.info("upload_recovered", after=self.state)
            self.state = "ok"
            return
        self.last_outcome = outcome.describe()
        self.consecutive_failures += 1
        state = {
            Result.RETRY: "retrying",
            Result.PAYLOAD_REJECTED: "payload_rejected",
            Result.TOKEN_REJECTED: "token_rejected",
            Result.TASK_NOT_FOUND: "task_not_found",
            Result.NOT_SUPPORTED: "not_supported",
        }[outcome.result]
        if state != self.state:
            # Once per change of state, not per attempt: a dead coderd must not fill the disk.
            log.warning("upload_" + state, status=outcome.status, message=outcome.message,
                        detail=outcome.detail, hint=_HINTS.get(outcome.result, ""))
        self.state = state


_HINTS = {
    Result.TOKEN_REJECTED: "the agent token is not valid for this workspace build; "
    "it is re-read from CODER_AGENT_TOKEN_FILE when set",
    Result.TASK_NOT_FOUND: "the task id is not a task of this workspace "
    "(check AGENT_SIDECAR_TASK_ID against data.coder_task.me.id)",
    Result.NOT_SUPPORTED: "this Coder release has no log-snapshot endpoint; upgrade coderd",
    Result.PAYLOAD_REJECTED: "coderd refused this snapshot; the next change is tried afresh",
}
