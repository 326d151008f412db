"""The agent's conversation as the sidecar knows it: messages by id, status, a change signal.

Memory is bounded by what a snapshot can still use. The packer keeps the newest messages
whole going back in time and at most the tail of one more, so a message is dropped once the
messages after it, not counting the last one (agentapi rewrites the last message in place,
and it can shrink), already hold `retain_chars` characters. A character encodes to at least
one byte, so this never drops anything a snapshot of `retain_chars` bytes could include. For
the same reason only the last `retain_chars` characters of any message are kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from agent_sidecar.aio import Pulse

Status = Literal["running", "stable"]
SENT_ROLES = frozenset({"user", "agent"})

# RFC 3339 with a zone, as Go's time.Time decodes it (coder-contract.md §4).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z"
)


@dataclass(frozen=True, slots=True)
class Message:
    """One agentapi message as the sidecar keeps it; `time` is RFC 3339 with a zone."""

    id: int
    role: str
    content: str
    time: str
    cut_chars: int = 0  # characters dropped from the head of content by the sidecar

    @property
    def total_chars(self) -> int:
        return self.cut_chars + len(self.content)


def clean_time(value: object) -> str:
    """agentapi's time, verbatim when valid; otherwise now, so coderd never rejects the body."""
    if isinstance(value, str) and _RFC3339.match(value):
        return value
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def make_message(id_: int, role: str, content: str, time_: object, retain_chars: int) -> Message:
    cut = max(0, len(content) - retain_chars)
    return Message(id_, role, content[cut:] if cut else content, clean_time(time_), cut)


class Conversation:
    """The latest known state of agentapi's conversation. Single event loop, no locks.

    Owns the messages by id (pruned to what a snapshot of `retain_chars` bytes can still
    use), the agent's status, whether the follower is connected, and `changed`, a Pulse
    notified on every change; `version` is its version. Raises nothing; holds no tasks.
    """

    def __init__(self, retain_chars: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retain_chars = retain_chars
        self._clock = clock
        self._messages: dict[int, Message] = {}  # ascending ids
        self._fixed_chars = 0  # characters of sent-role messages, all but the last
        self._floor = 0  # ids below this were pruned
        self.count = 0  # messages agentapi has, pruned ones included
        self.has_user = False  # any user message, pruned ones included
        self.status: Status | None = None
        self.connected = False  # the follower has agentapi's current state
        self.changed = Pulse()
        self.changed_at = clock()

    # -- reading ---------------------------------------------------------------------

    def messages(self) -> list[Message]:
        return list(self._messages.values())

    @property
    def version(self) -> int:
        """Bumped by every change."""
        return self.changed.version

    async def wait_changed(self, since_version: int) -> None:
        """Until the conversation changes after `since_version`."""
        await self.changed.wait(since_version)

    # -- writing ---------------------------------------------------------------------

    def upsert(self, message: Message) -> None:
        """Apply agentapi's full current text of one message."""
        if message.id < self._floor:
            return  # pruned: nothing newer depends on it, and it cannot re-enter a snapshot
        old = self._messages.get(message.id)
        if old == message:
            return
        last_id = next(reversed(self._messages)) if self._messages else -1
        if message.id > last_id:
            if self._messages:
                self._fixed_chars += _weight(self._messages[last_id])
            self._messages[message.id] = message
        else:
            if message.id != last_id:
                self._fixed_chars += _weight(message) - (_weight(old) if old else 0)
            self._messages[message.id] = message
            if old is None:
                self._messages = dict(sorted(self._messages.items()))
        self.count = max(self.count, message.id + 1)
        self.has_user = self.has_user or message.role == "user"
        self._prune()
        self._bump()

    def set_status(self, status: Status) -> None:
        if status == self.status:
            return
        self.status = status
        self._bump()

    def set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._bump()

    def replace(self, messages: Iterable[Message], status: Status | None) -> None:
        """Rebuild from a full replay: nothing merged, nothing stale, nothing doubled."""
        fresh = Conversation(self.retain_chars, self._clock)
        for message in messages:
            fresh.upsert(message)
        changed = fresh._messages != self._messages or fresh.count != self.count
        self._messages = fresh._messages
        self._fixed_chars = fresh._fixed_chars
        self._floor = fresh._floor
        self.count = fresh.count
        self.has_user = fresh.has_user
        if status is not None:
            self.set_status(status)
        if changed:
            self._bump()

    def _prune(self) -> None:
        while len(self._messages) > 1:
            first_id = next(iter(self._messages))
            first = self._messages[first_id]
            if self._fixed_chars - _weight(first) < self.retain_chars:
                return
            del self._messages[first_id]
            self._fixed_chars -= _weight(first)
            self._floor = first_id + 1

    def _bump(self) -> None:
        self.changed_at = self._clock()
        self.changed.notify()


def _weight(message: Message) -> int:
    return len(message.content) if message.role in SENT_ROLES else 0
