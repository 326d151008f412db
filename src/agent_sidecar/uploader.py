"""When to upload, how to retry, the size a front accepts, and the last word at stop.

There is no queue. The conversation is the pending slot: every attempt packs the newest
state, so memory stays flat however long coderd is down and a retry never carries an old
snapshot. One attempt is in flight at most, because run() awaits each one, and the final
flush runs only once run() has stopped.

Other writers exist: the agentapi module's stop script uploads its last 10 messages just
before it stops agentapi (field-notes.md §2), and the sidecar cannot read what coderd
holds. So the final upload at shutdown is made even when coderd accepted the same body
before, and so is one upload shortly after agentapi goes away (bounded: one per
disappearance, at most one per `reupload_min_interval_s`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from agent_sidecar import logs
from agent_sidecar.aio import Backoff, Pulse, first_of
from agent_sidecar.coder import CoderClient, Outcome, Result, tasks_hint
from agent_sidecar.config import Settings
from agent_sidecar.conversation import SENT_ROLES, Conversation, Message
from agent_sidecar.metrics import Metrics
from agent_sidecar.sink import Sink
from agent_sidecar.snapshot import MIN_SNAPSHOT_BYTES, Packed, pack

log = logs.get("uploader")

# Failures that waiting cannot heal: /healthz says so as soon as one leaves a change unstored.
LASTING_FAILURES = frozenset({"redirected", "token_rejected", "task_not_found", "too_large"})
# Once the cap search is this close to the smallest size a front refused, it stops probing.
CAP_SEARCH_RESOLUTION_BYTES = 512


class Uploader:
    """Keeps coderd (or, without Coder, the sink) holding the newest snapshot of one
    Conversation.

    `run()` uploads as the policy in `settings` says until cancelled; an unexpected error
    inside it is logged, backed off and survived, so it raises nothing but CancelledError.
    `flush()` is the final upload; it returns whether the newest state is held, and a
    cancel stops it mid-attempt. Policy numbers are read from `settings` at each use, so
    `reconfigure()` takes effect at once. `agentapi_gone` (the follower's Pulse) asks for
    one forced upload after each disappearance of agentapi. `changed` is notified whenever
    the state that /status shows changes. `clock` and `sleep` may be injected: every wait
    of the policy goes through `sleep`. It owns no task.
    """

    def __init__(
        self,
        conversation: Conversation,
        settings: Settings,
        client: CoderClient | None,
        sink: Sink | None,
        metrics: Metrics,
        *,
        agentapi_gone: Pulse | None = None,
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
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_packed = on_packed or (lambda _p, _how: None)
        self._gone = agentapi_gone or Pulse()
        self._gone_seen = self._gone.version
        self._synced_version = -1
        self._dirty_since: float | None = None  # first change not yet attempted
        self._unstored_since: float | None = None  # first change coderd does not hold
        self._rejected: bytes | None = None
        self._reupload_at: float | None = None
        self._last_reupload: float | None = None
        self._errors = Backoff(self._rng)
        # The cap search (see _shrink and _grow).
        self.cap = settings.max_snapshot_bytes
        self._fits_at = 0  # the largest body accepted since the last refusal below it
        self._refused_at: int | None = None  # the smallest body refused as too large
        self._refused_until = 0.0  # when that refusal is forgotten
        self.last_accepted: bytes | None = None
        # For /status and /healthz.
        self.state = "idle"
        self.last_outcome: str | None = None
        self.last_success_unix: float | None = None
        self.consecutive_failures = 0
        self.attempts = 0  # started
        self.outcomes = 0  # finished, with an outcome
        self.reuploads = 0  # forced uploads after agentapi went away
        self.changed = Pulse()
        self.metrics.upload_state.state(self.state)

    @property
    def synced_version(self) -> int:
        """The conversation version the last finished sync covered."""
        return self._synced_version

    def reconfigure(self, settings: Settings) -> None:
        """Use new policy settings from now on; a new cap restarts the cap search."""
        if settings.max_snapshot_bytes != self.settings.max_snapshot_bytes:
            self.cap = settings.max_snapshot_bytes
            self._fits_at, self._refused_at = 0, None
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def has_destination(self) -> bool:
        return self.client is not None or self.sink is not None

    # -- what /status and /healthz read -------------------------------------------------

    @property
    def oldest_unstored_age_s(self) -> float | None:
        """How long the oldest change that coderd does not hold has waited; None if none."""
        if self.client is None or self._unstored_since is None:
            return None
        return max(0.0, self._clock() - self._unstored_since)

    @property
    def failing(self) -> str | None:
        """Why uploads fail to do their job, or None. Health means "stored": with uploads
        on and a user message in the conversation, the newest state is not stored, and
        either the failure is one waiting cannot heal, or the oldest unstored change is
        older than unhealthy_after_s. Tasks being unavailable is not a failure: there is
        nothing this sidecar should do about it (see tasks_hint)."""
        age = self.oldest_unstored_age_s
        if age is None or not self.conversation.has_user or self.state == "tasks_unavailable":
            return None
        if self.state in LASTING_FAILURES:
            return f"uploads: {self.state} ({self.last_outcome})"
        limit = self.settings.unhealthy_after_s
        if limit is not None and age > limit:
            return (f"uploads: the oldest change is unstored for {age:.0f}s, over "
                    f"unhealthy_after_s={limit:g} ({self.state}: {self.last_outcome})")
        return None

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Upload as the policy says until cancelled."""
        if not self.has_destination:
            # Neither Coder nor a sink: following alone still serves the relay and /status.
            await asyncio.Event().wait()
        while True:
            try:
                await self._step()
                self._errors.reset()
            except Exception as exc:
                # A bug must not end the uploads: say it (rate-limited by kind), back
                # off, and carry on with the state as it is.
                delay = self._errors.next_delay(self.settings.retry_initial_s,
                                                self.settings.retry_max_s)
                log.exception("uploader_error", error=f"{type(exc).__name__}: {exc}",
                              retry_in_s=round(delay, 2))
                await self._sleep(delay)

    async def _step(self) -> None:
        """One turn: a forced upload or a sync that is due, else wait for the next reason."""
        conv = self.conversation
        if self._gone.version != self._gone_seen:
            self._gone_seen = self._gone.version
            self._arm_reupload()
        now = self._clock()
        if self._reupload_at is not None and now >= self._reupload_at:
            self._reupload_at = None
            await self._reupload()
            return
        seen = conv.version
        due = self._reupload_at
        if seen != self._synced_version:
            if self._dirty_since is None:
                self._dirty_since = conv.changed_at
            if self._unstored_since is None and self.client is not None:
                self._unstored_since = conv.changed_at
            due = self._due() if due is None else min(due, self._due())
        if due is not None and due <= now:
            await self._sync(final=False)
            return
        waits: list[Awaitable[None]] = [conv.wait_changed(seen), self._gone.wait(self._gone_seen)]
        if due is not None:
            waits.append(self._sleep(due - now))
        await first_of(*waits)

    def _due(self) -> float:
        assert self._dirty_since is not None
        stale = self._dirty_since + self.settings.max_staleness_s
        if self.conversation.status == "running":
            return stale
        return min(self.conversation.changed_at + self.settings.settle_s, stale)

    # -- the last writer ---------------------------------------------------------------

    def _arm_reupload(self) -> None:
        """agentapi went away: the module's stop script may have just written its short
        snapshot. Upload ours after reupload_settle_s, at most one per
        reupload_min_interval_s; a disappearance while one is pending shares it."""
        if self._reupload_at is not None:
            return
        at = self._clock() + self.settings.reupload_settle_s
        if self._last_reupload is not None:
            at = max(at, self._last_reupload + self.settings.reupload_min_interval_s)
        self._reupload_at = at

    def _forced_upload_skipped(self) -> str | None:
        """Why a forced upload (after agentapi went away, or at shutdown) is not made."""
        if self.client is None:
            return "uploads are off"
        if not self.conversation.has_user:
            return "no user message"
        if self.state == "tasks_unavailable":
            return "this Coder does not serve Tasks"
        return None

    async def _reupload(self) -> None:
        if skipped := self._forced_upload_skipped():
            log.debug("reupload_skipped", reason=skipped)
            return
        self._last_reupload = self._clock()
        self.reuploads += 1
        log.info("reupload_after_agentapi_gone", messages=self.conversation.count)
        await self._sync(final=False, force=True)

    async def flush(self) -> bool:
        """The final upload from memory, retried until the caller's deadline.

        True if coderd holds the newest state (or there is nothing it should hold). With
        Coder it is made even if coderd accepted the same body before: another writer may
        have replaced it since. A rejected token or task, a redirect it will not follow,
        or Tasks being unavailable end it at once: no retry can change those in time.
        """
        if not self.has_destination:
            return True
        if self.client is None:
            if self._synced_version == self.conversation.version and self.state in (
                    "ok", "idle"):
                return True
            log.info("final_flush", messages=self.conversation.count)
            return await self._sync(final=True)
        if not self.conversation.has_user:
            return True
        if self.state == "tasks_unavailable":
            log.info("final_flush_skipped", reason="this Coder does not serve Tasks")
            return False
        log.info("final_flush", messages=self.conversation.count)
        return await self._sync(final=True, force=True)

    # -- one sync: pack, deliver, retry until done -------------------------------------

    async def _sync(self, final: bool, force: bool = False) -> bool:
        backoff = Backoff(self._rng)
        conv = self.conversation
        while True:
            version = conv.version
            started = self._clock()
            if not conv.has_user:
                # A fresh or restarted agent (no user message) would wipe the history
                # users see while the task resumes: nothing coderd should get.
                self._mark_synced(version, started, stored=True)
                return True
            messages = conv.messages()
            packed = pack(messages, self.cap)
            if packed.body == self.last_accepted and not (force and self.client):
                self._mark_synced(version, started, stored=True)  # a repeat costs a request
                return True
            if packed.body == self._rejected:
                self._mark_synced(version, started, stored=False)
                return False  # coderd refused exactly this; it does not hold it
            if self._unstored_since is None and self.client is not None:
                self._unstored_since = conv.changed_at
            self.metrics.snapshot_bytes.set(packed.size)
            self.metrics.snapshot_messages.set(packed.messages)
            if packed.truncated:
                self.metrics.truncations.inc()
            if backoff.failures:
                self.metrics.upload_retries.inc()
            outcome = await self._deliver(packed)
            result = outcome.result
            if result is Result.TOO_LARGE and self._shrink(packed.size, outcome):
                self._record(outcome, self.state)  # a step of the search, not a new state
                continue  # the smaller snapshot goes at once
            self._record(outcome)
            if result is Result.ACCEPTED:
                self.last_accepted = packed.body
                self._grow(packed, messages)
                self._on_packed(packed, "uploaded" if self.client else "written")
                self._mark_synced(version, started, stored=True)
                return True
            if result in (Result.PAYLOAD_REJECTED, Result.TOO_LARGE):
                self._rejected = packed.body  # the next change is tried afresh
                self._mark_synced(version, started, stored=False)
                return False
            if result in (Result.RETRY, Result.REDIRECTED):
                if final and result is Result.REDIRECTED:
                    return False
                delay = backoff.next_delay(self.settings.retry_initial_s,
                                           self.settings.retry_max_s)
                if outcome.retry_after_s is not None:
                    delay = max(delay, min(outcome.retry_after_s, self.settings.retry_max_s))
                await self._sleep(delay)
                continue
            # Token or task rejected, or no Tasks: nothing will change soon; wait long
            # (this is also how often Tasks is re-checked), or for a new token.
            if final:
                return False
            wake = None
            if result is Result.TOKEN_REJECTED and self.client:
                tokens = self.client.tokens
                tokens.changed.clear()
                if await tokens.reload():
                    continue  # the file already holds a new token: try it now
                wake = tokens.changed  # a rewrite noticed by the watcher ends the wait
            await self._pause(self.settings.rejected_backoff_s, wake)

    # -- the size a front accepts ------------------------------------------------------
    #
    # coderd takes 64 KiB, but a proxy in front of it may take less and answer 413 (nginx's
    # client_max_body_size). A 413, or coderd's own "request body too large", halves the
    # distance between the largest body known to fit (0 at first) and the body refused,
    # never below MIN_SNAPSHOT_BYTES, and the smaller snapshot goes at once. The cap climbs
    # back only after a body fits, and only when that body was cut by the cap: halfway to
    # the smallest refused size, so the search settles on the front's limit within about
    # log2(64 KiB / 1 KiB) = 6 refusals, then stops probing. A refusal is remembered for
    # rejected_backoff_s; after that the cap may climb again toward max_snapshot_bytes, so a
    # front whose limit was raised is noticed and one 413 does not shrink snapshots forever.
    # A body refused at the floor is `too_large`: /healthz says so at once.

    def _shrink(self, refused: int, outcome: Outcome) -> bool:
        """Lower the cap after `refused` bytes were too large; False at the floor."""
        if refused <= MIN_SNAPSHOT_BYTES:
            return False
        remembered = self._refused_at is not None and self._clock() < self._refused_until
        self._refused_at = min(refused, self._refused_at or refused) if remembered else refused
        self._refused_until = self._clock() + self.settings.rejected_backoff_s
        low = self._fits_at if self._fits_at < refused else 0
        self._fits_at = low
        self.cap = max(MIN_SNAPSHOT_BYTES, (low + refused) // 2)
        say = log.debug if remembered else log.warning
        say("snapshot_too_large", refused_bytes=refused, new_cap_bytes=self.cap,
            answer=outcome.describe())
        return True

    def _grow(self, packed: Packed, messages: list[Message]) -> None:
        """After a body that fit: probe halfway up if the cap cut this snapshot."""
        self._fits_at = max(self._fits_at, packed.size)
        ceiling = self.settings.max_snapshot_bytes
        if self.cap >= ceiling:
            return
        sendable = sum(1 for m in messages if m.role in SENT_ROLES)
        if not packed.truncated and packed.messages >= sendable:
            return  # everything fit: nothing to gain from a larger cap now
        remembered = self._refused_at is not None and self._clock() < self._refused_until
        target = self._refused_at if remembered and self._refused_at else ceiling
        if target - self.cap <= CAP_SEARCH_RESOLUTION_BYTES:
            if remembered:
                return  # settled just below the front's limit
            self.cap = ceiling  # nothing refused lately: back to the full size
        else:
            self.cap = (self.cap + target) // 2
        log.debug("snapshot_cap_probe", new_cap_bytes=self.cap)

    # -- delivery and bookkeeping ------------------------------------------------------

    async def _deliver(self, packed: Packed) -> Outcome:
        self.attempts += 1
        if self.client is None:
            assert self.sink is not None
            if await self.sink.write(packed.body):
                return Outcome(Result.ACCEPTED)
            self.metrics.sink_errors.inc()
            return Outcome(Result.RETRY, message=f"sink write failed: {self.sink.error}")
        started = time.perf_counter()
        try:
            outcome = await self.client.upload(packed.body)
        except Exception as exc:
            # A bug in the client must not cost the snapshot, least of all in the final
            # flush: say it (rate-limited by kind) and retry like a network error.
            error = f"{type(exc).__name__}: {exc}"
            log.exception("upload_error", error=error)
            return Outcome(Result.RETRY, message=f"internal error: {error}")
        self.metrics.upload_duration.observe(time.perf_counter() - started)
        for note in outcome.notes:
            log.warning("coderd_answer_ignored", note=note, status=outcome.status)
        return outcome

    async def _pause(self, delay: float, wake: asyncio.Event | None) -> None:
        if wake is None:
            await self._sleep(delay)
        else:
            await first_of(self._sleep(delay), wake.wait())

    def _mark_synced(self, version: int, started: float, *, stored: bool) -> None:
        self._synced_version = version
        # Changes that landed during the attempt are not in it: they count from its start.
        moved_on = self.conversation.version != version
        self._dirty_since = started if moved_on else None
        if stored:
            self._unstored_since = started if moved_on and self.client else None
        self.changed.notify()

    def _record(self, outcome: Outcome, state: str | None = None) -> None:
        self.outcomes += 1
        self.metrics.uploads.labels(result=outcome.result.value).inc()
        if outcome.result is Result.ACCEPTED:
            self.last_outcome = "accepted"
            self.consecutive_failures = 0
            self.last_success_unix = time.time()
            self.metrics.last_success.set(self.last_success_unix)
            if self.state not in ("ok", "idle"):
                log.info("upload_recovered", after=self.state)
            self._set_state("ok")
            return
        self.last_outcome = outcome.describe()
        self.consecutive_failures += 1
        state = state or {Result.RETRY: "retrying"}.get(outcome.result, outcome.result.value)
        if state != self.state:
            # Once per change of state, not per attempt: a dead coderd must not fill the disk.
            self._log_state(state, outcome)
        self._set_state(state)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.upload_state.state(state)
        self.changed.notify()

    def _log_state(self, state: str, outcome: Outcome) -> None:
        if outcome.result is Result.TASKS_UNAVAILABLE:
            version = self.client.coderd_version if self.client else None
            doubt = self.client.buildinfo_missing if self.client else False
            # Not a warning: nothing is wrong with this sidecar, and nothing it can fix;
            # unless the URL itself may be wrong.
            say = log.warning if doubt else log.info
            say("upload_tasks_unavailable", status=outcome.status,
                message=outcome.message, coderd_version=version,
                hint=tasks_hint(version, self.settings.rejected_backoff_s, doubt))
            return
        fields = {"status": outcome.status, "message": outcome.message,
                  "detail": outcome.detail, "location": outcome.location,
                  "content_type": outcome.content_type, "hint": _hint(outcome)}
        log.warning("upload_" + state, **{k: v for k, v in fields.items() if v is not None})


def _hint(outcome: Outcome) -> str:
    result = outcome.result
    if result is Result.TASK_NOT_FOUND and not outcome.from_coderd:
        return ("a 404 that coderd did not write: check CODER_AGENT_URL, and any proxy or "
                "front between the workspace and coderd")
    return {
        Result.TOKEN_REJECTED: "the agent token is not valid for this workspace build; "
        "it is re-read from CODER_AGENT_TOKEN_FILE when set",
        Result.TASK_NOT_FOUND: "the task id is not a task of this workspace "
        "(check AGENT_SIDECAR_TASK_ID against data.coder_task.me.id)",
        Result.PAYLOAD_REJECTED: "coderd refused this snapshot; the next change is tried "
        "afresh",
        Result.TOO_LARGE: "even a snapshot at the 1 KiB floor is refused as too large; "
        "raise the front's body limit (nginx: client_max_body_size) to 64k",
        Result.REDIRECTED: "redirects are followed only to the same host (307 and 308); "
        "set CODER_AGENT_URL to the URL coderd answers on",
        Result.RETRY: "retried with back-off",
    }.get(result, "")
