"""The agent's conversation as the sidecar knows it: messages by id, status, a change signal.

Memory is bounded by what a snapshot can still use, whatever agentapi sends (issue 15,
item 6). The packer keeps the newest messages whole going back in time and at most the
tail of one more, so a message is dropped once the messages after it, not counting the
last one (agentapi rewrites the last message in place, and it can shrink), either

- already hold `retain_chars` characters: a character encodes to at least one byte, so
  they cannot all fit in a snapshot of `retain_chars` bytes; or
- are already `max_messages(retain_chars)` in number: each encodes to at least
  `MIN_ITEM_BYTES`, so they cannot all fit either, however short they are.

Messages whose role is never sent (anything but `user` and `agent`) are not held at all,
and only the last `retain_chars` characters of any message are kept (make_message). So a
conversation holds at most `3 * retain_chars` characters (the first message held, those
between it and the last, and the last) in at most `max_messages(retain_chars) + 2`
messages, however long agentapi's history is.

What goes in is also what coderd's Go decoder accepts (issue 15, item 8): every time is an
RFC 3339 date as Go's `time.Time` reads it, and ids are checked by the parser
(agentapi.parse_message) to fit in an int64.

However the messages come (live one by one, as a replay on connect, as a poll, or through
the ACP reconcile), the same messages give the same model: the same messages held, the
same `count` and the same `has_user`. A replay or a reconcile is built aside by the same
upserts as live messages and then adopted whole, so what pruning saw on the way (a user
message too old to be held, ids of roles never sent) is not lost. That matters because
`has_user` is the uploader's guard: a snapshot is uploaded only while agentapi's
conversation has a user message, held or pruned, and every path that removes messages
(a replay, the reconcile, a role that changed) keeps it exact.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from agent_sidecar.aio import Pulse

Status = Literal["running", "stable"]
SENT_ROLES = frozenset({"user", "agent"})
# coderd decodes `id` into a Go int64 (coder-contract.md §4); agentapi's ids start at 0.
MAX_ID = 2**63 - 1

# The smallest item pack() can emit: id 0, empty content, the shortest sent role, and the
# shortest time Go accepts. tests/test_snapshot.py checks it against pack() itself.
MIN_ITEM_BYTES = len(b'{"id":0,"content":"","role":"user","time":"2006-01-02T15:04:05Z"}')

# RFC 3339 as Go's time.Time.UnmarshalJSON accepts it on its strict path (Go
# src/time/format_rfc3339.go, parseRFC3339): ASCII digits only ([0-9], never \d, which
# also matches full-width and Arabic-Indic digits), a capital T and Z, an optional
# fraction of any length, and a zone that is Z or +hh:mm / -hh:mm.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(\.[0-9]+)?(Z|[+-]([0-9]{2}):([0-9]{2}))"
)
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Go reads nanoseconds and drops further digits (parseNanoseconds), so a longer fraction
# is cut to this many digits without changing the time coderd stores.
_FRACTION_DIGITS = 9


def max_messages(retain_chars: int) -> int:
    """How many messages, after the one being looked at and before the last, make sure it
    can never reach a snapshot of `retain_chars` bytes: that many items and their commas
    are already larger."""
    return retain_chars // (MIN_ITEM_BYTES + 1) + 1


def _days_in(month: int, year: int) -> int:
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)  # Go's isLeap; 0 is leap
    return 29 if month == 2 and leap else _DAYS[month - 1]


def go_time(value: object) -> str | None:
    """`value` as a time that coderd's Go decoder accepts, or None if it is not one.

    Valid means RFC 3339 as Go reads it: a real calendar date (year 0000-9999, the month's
    real number of days), hours 00-23, minutes and seconds 00-59, an optional fraction, and
    `Z` or an offset within ±23:59, all in ASCII. A fraction longer than 9 digits is cut
    to 9, which is all Go reads; anything else valid is returned unchanged.
    """
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= _days_in(month, year)
            and hour <= 23 and minute <= 59 and second <= 59):
        return None
    if match.group(9) is not None and (int(match.group(9)) > 23 or int(match.group(10)) > 59):
        return None
    fraction = match.group(7)
    if fraction is not None and len(fraction) > 1 + _FRACTION_DIGITS:
        cut = match.start(7) + 1 + _FRACTION_DIGITS
        return value[:cut] + value[match.end(7):]
    return value


def now_time() -> str:
    """Now, in UTC, as a time coderd accepts."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Message:
    """One agentapi message as the sidecar keeps it; `time` is RFC 3339 as Go reads it."""

    id: int
    role: str
    content: str
    time: str
    cut_chars: int = 0  # characters dropped from the head of content by the sidecar
    time_replaced: bool = False  # agentapi's time was unusable; `time` is when we saw it

    @property
    def total_chars(self) -> int:
        return self.cut_chars + len(self.content)


def clean_time(value: object) -> str:
    """agentapi's time, as go_time() normalises it; otherwise now, so coderd never
    rejects the body."""
    return go_time(value) or now_time()


def make_message(id_: int, role: str, content: str, time_: object, retain_chars: int) -> Message:
    """A Message holding the last `retain_chars` characters of `content`; an unusable
    `time_` is replaced by now and flagged `time_replaced`."""
    cut = max(0, len(content) - retain_chars)
    valid = go_time(time_)
    return Message(id_, role, content[cut:] if cut else content, valid or now_time(), cut,
                   valid is None)


class Conversation:
    """The latest known state of agentapi's conversation. Single event loop, no locks.

    Owns the messages by id (pruned to what a snapshot of `retain_chars` bytes can still
    use; see the module docstring), what it knows of the messages pruned (`count`,
    `has_user`), the agent's status, whether the follower is connected, and `changed`, a
    Pulse notified on every change; `version` is its version. Every operation costs at
    most a step per message held, which is bounded, or per message given to it. Raises
    nothing; holds no tasks.
    """

    def __init__(self, retain_chars: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retain_chars = retain_chars
        self.max_messages = max_messages(retain_chars)
        self._clock = clock
        self._messages: dict[int, Message] = {}
        self._ids: list[int] = []  # the keys of _messages, ascending
        self._fixed_chars = 0  # characters of the messages held, all but the last
        self._floor = 0  # ids below this were pruned
        self._users = 0  # messages held whose role is user
        self._pruned_user = False  # a user message was pruned; agentapi still has it
        self.count = 0  # ids agentapi has used (its highest id + 1), pruned ones included
        self.status: Status | None = None
        self.connected = False  # the follower has agentapi's current state
        self.changed = Pulse()
        self.changed_at = clock()

    # -- reading ---------------------------------------------------------------------

    def messages(self) -> list[Message]:
        """The messages held, in ascending id order."""
        return [self._messages[i] for i in self._ids]

    @property
    def held(self) -> int:
        """How many messages are held now (at most `max_messages + 2`)."""
        return len(self._ids)

    @property
    def last_id(self) -> int | None:
        """The newest id held, or None when nothing is."""
        return self._ids[-1] if self._ids else None

    @property
    def has_user(self) -> bool:
        """Whether agentapi's conversation has a user message: one held, or one pruned
        (still in agentapi's history, only too old for a snapshot). Without one the
        conversation is a fresh or restarted agent's, and a snapshot of it would replace
        the history users see (DESIGN.md, "What never goes up"): the uploader and the sink
        read this and nothing else for that rule."""
        return self._users > 0 or self._pruned_user

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
        if self._store(message):
            self._bump()

    def _store(self, message: Message) -> bool:
        """Apply one message without notifying; whether anything changed."""
        changed = message.id + 1 > self.count
        self.count = max(self.count, message.id + 1)
        if message.id < self._floor:
            return changed  # pruned: it cannot re-enter a snapshot
        old = self._messages.get(message.id)
        if message.role not in SENT_ROLES:
            # Never sent, so never held; a held message whose role changed goes.
            return self._remove(message.id) or changed
        if old is not None and message.time_replaced and old.time_replaced:
            # The same unusable time again: keep the time we gave it first, so that a
            # replay does not look like a change.
            message = dataclasses.replace(message, time=old.time)
        if old == message:
            return changed
        self._users += (message.role == "user") - (old is not None and old.role == "user")
        if old is not None:
            if message.id != self._ids[-1]:
                self._fixed_chars += len(message.content) - len(old.content)
            self._messages[message.id] = message
        elif not self._ids or message.id > self._ids[-1]:
            if self._ids:
                self._fixed_chars += len(self._messages[self._ids[-1]].content)
            self._ids.append(message.id)
            self._messages[message.id] = message
        else:
            # Out of order (agentapi never does this): a bisect keeps it linear in the
            # messages held, which are bounded, rather than a sort per message.
            bisect.insort(self._ids, message.id)
            self._fixed_chars += len(message.content)
            self._messages[message.id] = message
        self._prune()
        return True

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
        """Rebuild from agentapi's whole list (a poll of GET /messages): nothing merged,
        nothing stale, nothing doubled, and the same model as the same messages arriving
        live, pruned ones included in `count` and `has_user`."""
        fresh = Conversation(self.retain_chars, self._clock)
        for message in messages:
            fresh._store(message)
        self.adopt(fresh, status)

    def adopt(self, replay: Conversation, status: Status | None) -> None:
        """Become `replay`: a model built aside, by upserts, from a full replay of
        agentapi's conversation (every connect to /events sends one). Its messages, `count`
        and `has_user` are taken as they are, so a user message it pruned still counts.
        A time agentapi sent unusable keeps the time first given to it, so that a replay
        of the same state is not a change. `replay` must have this `retain_chars`, and is
        consumed: it must not be used afterwards."""
        for id_, message in replay._messages.items():
            old = self._messages.get(id_)
            if (old is not None and message.time_replaced and old.time_replaced
                    and message.time != old.time):
                replay._messages[id_] = dataclasses.replace(message, time=old.time)
        changed = (replay._messages != self._messages or replay.count != self.count
                   or replay.has_user != self.has_user)
        self._messages = replay._messages
        self._ids = replay._ids
        self._fixed_chars = replay._fixed_chars
        self._floor = replay._floor
        self._users = replay._users
        self._pruned_user = replay._pruned_user
        self.count = replay.count
        if status is not None:
            self.set_status(status)
        if changed:
            self._bump()

    def reconcile(self, listed: Conversation, covered: int) -> list[int] | None:
        """Bring the ids below `covered` in line with agentapi's own list of them.

        `covered` is `count` as it was when GET /messages was sent: every id below it
        existed in agentapi before it answered. `listed` is a model built by upserts from
        that answer's messages with ids below `covered`. Ids from `covered` up may be
        newer than the answer; the ones held are kept. The result is the model that
        agentapi's list followed by those newer messages would have built arriving live:
        a message agentapi no longer has is gone (an ACP failed prompt's placeholder,
        removed without an event), and `has_user` and `count` follow. So an answer of
        `[]` (agentapi restarted) leaves no user message, and nothing can be uploaded over
        the history coderd holds. `listed` is consumed.

        Returns the held ids agentapi no longer has; or None, and nothing changes, when
        the answer is too old to apply: messages that arrived meanwhile pruned ids from
        `covered` up, which it says nothing about.
        """
        if self._floor > covered:
            return None
        gone = [i for i in self._ids
                if i < covered and i not in listed._messages and i >= listed._floor]
        for id_ in self._ids:
            if id_ >= covered:
                listed._store(self._messages[id_])
        if self.count > covered:
            listed.count = max(listed.count, self.count)  # ids seen after the answer
        self.adopt(listed, None)
        return gone

    def _remove(self, id_: int) -> bool:
        message = self._messages.pop(id_, None)
        if message is None:
            return False
        self._users -= message.role == "user"
        index = bisect.bisect_left(self._ids, id_)
        del self._ids[index]
        if index < len(self._ids):
            self._fixed_chars -= len(message.content)
        elif self._ids:
            # The last went: the one before it is the last now, and the last is not fixed.
            self._fixed_chars -= len(self._messages[self._ids[-1]].content)
        return True

    def _prune(self) -> None:
        while len(self._ids) > 1:
            first = self._messages[self._ids[0]]
            after = len(self._ids) - 2  # held after the first, not counting the last
            if (self._fixed_chars - len(first.content) < self.retain_chars
                    and after < self.max_messages):
                return
            del self._messages[first.id]
            del self._ids[0]
            self._fixed_chars -= len(first.content)
            self._floor = max(self._floor, first.id + 1)
            if first.role == "user":
                self._users -= 1
                self._pruned_user = True

    def _bump(self) -> None:
        self.changed_at = self._clock()
        self.changed.notify()
