"""The conversation model: upserts, replays, status, and memory bounded by what a snapshot needs."""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.conversation import (
    Conversation,
    Message,
    clean_time,
    go_time,
    make_message,
    max_messages,
)
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, pack

T = "2026-04-10T12:34:56Z"


def m(id_: int, content: str, role: str = "agent") -> Message:
    return Message(id_, role, content, T)


def test_upsert_replaces_the_text_of_an_id() -> None:
    """message_update carries the whole text: it replaces, never appends."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    conv.upsert(m(0, "hel"))
    conv.upsert(m(0, "hello"))
    conv.upsert(m(0, "bye"))
    assert [x.content for x in conv.messages()] == ["bye"]
    assert conv.count == 1


def test_replace_drops_stale_messages_after_an_agentapi_restart() -> None:
    """A replay with fewer messages (ids restarted at 0) leaves nothing stale behind."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    for i in range(5):
        conv.upsert(m(i, f"old {i}"))
    conv.replace([m(0, "fresh")], "stable")
    assert conv.messages() == [m(0, "fresh")]
    assert conv.count == 1


def test_replace_with_identical_state_is_not_a_change() -> None:
    """A reconnect that replays the same state does not look like new conversation."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    conv.replace([m(0, "a"), m(1, "b", "user")], "stable")
    version = conv.version
    conv.replace([m(0, "a"), m(1, "b", "user")], "stable")
    assert conv.version == version


async def test_status_changes_wake_waiters() -> None:
    """A status change wakes wait_changed; setting the same status again wakes nobody."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    conv.set_status("running")
    changed = asyncio.create_task(conv.wait_changed(conv.version))
    conv.set_status("running")
    await asyncio.sleep(0)
    assert not changed.done()
    conv.set_status("stable")
    async with asyncio.timeout(1):
        await changed


def test_invalid_times_are_replaced_by_a_valid_one() -> None:
    """A time coderd would reject (no zone, not a string) becomes now, in RFC 3339 UTC."""
    assert clean_time("2026-04-10T12:34:56.5-07:00") == "2026-04-10T12:34:56.5-07:00"
    for bad in ("2026-04-10 12:34:56", "2026-04-10T12:34:56", None, 5):
        assert clean_time(bad).endswith("Z")
        assert clean_time(bad)[10] == "T"


@pytest.mark.parametrize("value", [
    "2026-04-10T12:34:56Z",
    "2026-04-10T12:34:56.123456789Z",
    "2026-04-10T12:34:56.1+05:30",
    "2026-04-10T00:00:00-23:59",
    "2024-02-29T23:59:59+23:59",  # a leap day
    "2000-02-29T00:00:00Z",  # divisible by 400: leap
    "0000-02-29T00:00:00Z",  # Go's calendar: year 0 is a leap year
    "9999-12-31T23:59:59.999999999Z",
])
def test_times_go_accepts_are_kept_verbatim(value: str) -> None:
    """A time Go's time.Time decodes is kept byte for byte."""
    assert go_time(value) == value
    assert make_message(0, "user", "", value, 10).time == value


@pytest.mark.parametrize("value", [
    "2025-13-45T10:00:00Z",  # no month 13, no day 45
    "2025-00-10T10:00:00Z",
    "2025-01-00T10:00:00Z",
    "2025-02-29T10:00:00Z",  # not a leap year
    "1900-02-29T10:00:00Z",  # divisible by 100, not by 400
    "2025-04-31T10:00:00Z",  # April has 30 days
    "2025-01-01T24:00:00Z",
    "2025-01-01T23:60:00Z",
    "2025-01-01T23:59:60Z",  # Go has no leap seconds
    "2025-01-01T10:00:00+99:99",
    "2025-01-01T10:00:00+24:00",
    "2025-01-01T10:00:00-00:60",
    "2025-01-01T10:00:00+0000",
    "2025-01-01T10:00:00",  # no zone
    "2025-01-01 10:00:00Z",
    "2025-01-01t10:00:00Z",
    "2025-01-01T10:00:00z",
    "2025-01-01T1:00:00Z",  # one-digit hour
    "2025-01-01T10:00:00,5Z",
    "2025-01-01T10:00:00.Z",
    "2025-01-01T10:00:00Z\n",
    " 2025-01-01T10:00:00Z",
    "+2025-01-01T10:00:00Z",
    "\uff12\uff10\uff12\uff15-01-01T10:00:00Z",  # full-width digits: \\d and int() take them
    "\u0662\u0660\u0662\u0665-01-01T10:00:00Z",  # Arabic-Indic digits
    "2025-01-01T10:00:00+\u0660\u0665:00",
    "2025-01-01T10:00:00.\u0661Z",
    "",
])
def test_times_go_refuses_are_replaced_and_flagged(value: str) -> None:
    """A time coderd's Go decoder would refuse (and with it the whole body) is replaced by
    now, in UTC, and the message says so."""
    assert go_time(value) is None
    message = make_message(0, "user", "", value, 10)
    assert message.time_replaced
    assert go_time(message.time) == message.time
    assert message.time.endswith("Z")


def test_a_fraction_longer_than_go_reads_is_cut_to_nanoseconds() -> None:
    """Digits past the ninth are dropped, which is what Go does with them."""
    assert go_time("2026-04-10T12:34:56.1234567891234Z") == "2026-04-10T12:34:56.123456789Z"
    assert go_time("2026-04-10T12:34:56.1234567891+01:00") == (
        "2026-04-10T12:34:56.123456789+01:00")


def test_a_replaced_time_does_not_change_on_replay() -> None:
    """A message whose time had to be replaced keeps the first replacement, so a replay of
    the same conversation is not a change."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    conv.upsert(make_message(0, "user", "hi", "bogus", 100))
    first = conv.messages()[0].time
    version = conv.version
    conv.replace([make_message(0, "user", "hi", "bogus", 100)], None)
    conv.upsert(make_message(0, "user", "hi", "bogus", 100))
    assert conv.messages()[0].time == first
    assert conv.version == version


def test_long_history_is_pruned_to_what_a_snapshot_needs() -> None:
    """After 100 MB of history only about one snapshot's worth of characters is kept."""
    conv = Conversation(retain_chars=65536)
    for i in range(10_000):
        conv.upsert(make_message(i, "agent" if i % 2 else "user", "x" * 10_000, T, 65536))
    assert conv.count == 10_000
    kept = sum(len(x.content) for x in conv.messages())
    assert kept <= 65536 + 2 * 10_000
    assert conv.messages()[-1].id == 9_999


def test_messages_that_never_reach_a_snapshot_are_not_held() -> None:
    """30 000 messages with role `tool` or empty content leave the model at about one
    snapshot's worth: roles that are never sent are not held, and the number of messages is
    bounded by what a snapshot can hold."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    tracemalloc.start()
    try:
        for i in range(30_000):
            role, text = ("tool", "t" * 4096) if i % 2 else ("agent", "")
            conv.upsert(make_message(i, role, text, T, CODERD_MAX_BODY_BYTES))
        held_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(conv.messages()) <= 1000
    assert held_bytes < 1 << 20
    assert conv.count == 30_000
    assert conv.messages()[-1].id == 29_998


def test_out_of_order_ids_cost_no_more_than_in_order_ones() -> None:
    """40 000 empty messages in random id order are absorbed in seconds: an id that is not
    the newest is placed without re-sorting what is held."""
    ids = list(range(40_000))
    random.Random(7).shuffle(ids)
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    started = time.perf_counter()
    for i in ids:
        conv.upsert(Message(i, "user", "", T))
    assert time.perf_counter() - started < 10
    assert [x.id for x in conv.messages()] == sorted(x.id for x in conv.messages())
    assert len(conv.messages()) <= max_messages(CODERD_MAX_BODY_BYTES) + 2


def listing(messages: list[Message], covered: int, cap: int = CODERD_MAX_BODY_BYTES
            ) -> Conversation:
    """The model the follower builds from a GET /messages answer, for a reconcile."""
    listed = Conversation(cap)
    for x in messages:
        if x.id < covered:
            listed.upsert(x)
    return listed


def test_reconcile_drops_what_agentapi_no_longer_has() -> None:
    """Held ids the answer covers but lacks are dropped; ids newer than it stay."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    history = [m(i, f"m{i}", role) for i, role in
               enumerate(["user", "agent", "user", "agent", "user"])]
    for x in history:
        conv.upsert(x)
    version = conv.version
    answer = [history[0], history[2], history[3]]
    assert conv.reconcile(listing(answer, 4), covered=4) == [1]
    assert [x.id for x in conv.messages()] == [0, 2, 3, 4]
    assert conv.count == 5
    assert conv.version == version + 1
    assert conv.reconcile(listing(answer, 4), covered=4) == []
    assert conv.version == version + 1


def test_a_reconcile_that_lists_nothing_leaves_no_user_message() -> None:
    """/messages answering [] (agentapi restarted) empties the model and has_user with it,
    so no empty snapshot can be uploaded over the history coderd holds."""
    conv = Conversation(CODERD_MAX_BODY_BYTES)
    conv.upsert(m(0, "hello", "user"))
    conv.upsert(m(1, "hi there"))
    assert conv.has_user
    assert conv.reconcile(listing([], 2), covered=2) == [0, 1]
    assert conv.messages() == []
    assert not conv.has_user
    assert conv.count == 0


def test_a_reconcile_that_drops_the_only_user_message_clears_has_user() -> None:
    """Whatever the reconcile removes, has_user says whether a user message is left, even
    one pruned long ago that agentapi still lists, or one it no longer does."""
    cap = 1000
    history = [m(0, "the question", "user")] + [m(i, "a" * 400) for i in range(1, 6)]
    conv = Conversation(cap)
    for x in history:
        conv.upsert(x)
    assert 0 not in [x.id for x in conv.messages()]  # pruned
    assert conv.has_user
    assert conv.reconcile(listing(history[:-1], 6, cap), covered=6) == [5]
    assert conv.has_user  # agentapi still has message 0
    assert conv.reconcile(listing(history[1:5], 6, cap), covered=6) == []
    assert not conv.has_user  # now it does not


def test_an_answer_older_than_what_was_pruned_meanwhile_is_not_applied() -> None:
    """A /messages answer that covers ids below 2 while messages after it pruned id 2 is
    too old to say anything about that id: the reconcile changes nothing."""
    conv = Conversation(retain_chars=1000)
    conv.upsert(m(0, "q", "user"))
    conv.upsert(m(1, "a"))
    for i in range(2, 10):
        conv.upsert(m(i, "y" * 600))
    before = (conv.messages(), conv.count, conv.has_user, conv.version)
    assert conv.reconcile(listing([], 2, 1000), covered=2) is None
    assert (conv.messages(), conv.count, conv.has_user, conv.version) == before


def replayed(messages: list[Message], cap: int, into: Conversation | None = None
             ) -> Conversation:
    """A model that follows `messages` as a replay: built aside by upserts, then adopted
    by a model that held something else (the follower's way)."""
    conv = into or Conversation(cap)
    replay = Conversation(cap)
    for x in messages:
        replay.upsert(x)
    conv.adopt(replay, "stable")
    return conv


def live(messages: list[Message], cap: int) -> Conversation:
    conv = Conversation(cap)
    for x in messages:
        conv.upsert(x)
    return conv


def test_a_replay_whose_user_message_is_pruned_still_has_one() -> None:
    """One user message then 1 200 agent messages: as a replay (every connect sends one)
    the model has a user message and counts 1 201 messages, exactly as when they arrived
    live, so it is uploaded."""
    history = [m(0, "do it", "user")] + [m(i, f"step {i} " + "x" * 80) for i in range(1, 1201)]
    arrived = live(history, CODERD_MAX_BODY_BYTES)
    assert 0 not in [x.id for x in arrived.messages()]
    stale = live([m(0, "something else", "user")], CODERD_MAX_BODY_BYTES)
    for conv in (replayed(history, CODERD_MAX_BODY_BYTES, into=stale),
                 replayed(history, CODERD_MAX_BODY_BYTES)):
        assert conv.has_user
        assert conv.count == arrived.count == 1201
        assert conv.messages() == arrived.messages()
    polled = Conversation(CODERD_MAX_BODY_BYTES)
    polled.replace(history, "stable")
    assert (polled.has_user, polled.count) == (True, 1201)


def test_messages_never_sent_count_after_a_replay_as_they_do_live() -> None:
    """30 000 trailing `tool` messages after a user message show as 30 001 messages after a
    replay too, not as the one held."""
    history = [m(0, "start", "user")] + [m(i, "t", "tool") for i in range(1, 30_001)]
    assert live(history, CODERD_MAX_BODY_BYTES).count == 30_001
    assert replayed(history, CODERD_MAX_BODY_BYTES).count == 30_001
    assert len(replayed(history, CODERD_MAX_BODY_BYTES).messages()) == 1


@settings(max_examples=200, deadline=None)
@given(
    roles=st.lists(st.sampled_from(["user", "agent", "agent", "agent", "tool"]),
                   max_size=60),
    sizes=st.lists(st.integers(min_value=0, max_value=900), min_size=60, max_size=60),
    removed=st.sets(st.integers(min_value=0, max_value=59)),
    cap=st.integers(min_value=1024, max_value=3000),
)
def test_every_path_gives_the_model_the_same_messages_give_live(
    roles: list[str], sizes: list[int], removed: set[int], cap: int,
) -> None:
    """Live upserts, a replay adopted, a poll (replace) and a reconcile after agentapi
    removed some messages all give the model that agentapi's messages give arriving live:
    the same messages held, the same count, and has_user true exactly when agentapi has a
    user message."""
    history = [make_message(i, role, (f"{i}:" + "z" * sizes[i])[:sizes[i]], T, cap)
               for i, role in enumerate(roles)]
    kept = [x for x in history if x.id not in removed]

    def shape(conv: Conversation) -> tuple[list[Message], int, bool]:
        return conv.messages(), conv.count, conv.has_user

    expected = shape(live(kept, cap))
    assert expected[2] == any(x.role == "user" for x in kept)
    assert shape(replayed(kept, cap, into=live(history, cap))) == expected
    polled = live(history, cap)
    polled.replace(kept, None)
    assert shape(polled) == expected
    reconciled = live(history, cap)
    assert reconciled.reconcile(listing(kept, len(history), cap), len(history)) is not None
    assert shape(reconciled) == expected
    assert pack(reconciled.messages(), cap).body == pack(kept, cap).body


def test_huge_message_keeps_only_its_tail() -> None:
    """A message longer than the retention keeps its tail and remembers how much was cut."""
    message = make_message(3, "agent", "a" * 100 + "b" * 65536, T, 65536)
    assert message.content == "b" * 65536
    assert message.cut_chars == 100
    assert message.total_chars == 100 + 65536


def test_updates_to_pruned_ids_are_ignored() -> None:
    """An update for a message already pruned cannot re-enter the model out of order."""
    conv = Conversation(retain_chars=1000)
    for i in range(10):
        conv.upsert(m(i, "y" * 600))
    first = conv.messages()[0].id
    assert first > 0
    conv.upsert(m(0, "resurrected"))
    assert conv.messages()[0].id == first


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(min_value=0, max_value=3),
                  st.integers(min_value=0, max_value=3000) | st.just(0),
                  st.sampled_from(["user", "agent", "agent", "tool"])),
        min_size=1, max_size=80,
    ),
    cap=st.integers(min_value=1024, max_value=4096),
)
def test_pruned_model_packs_exactly_like_the_full_history(
    ops: list[tuple[int, int, str]], cap: int
) -> None:
    """Whatever the updates (new messages, empty ones, roles never sent, the last one growing
    or shrinking), pruning never changes the packed snapshot, and the messages held stay
    within the bound."""
    conv = Conversation(retain_chars=cap)
    full: dict[int, Message] = {}
    next_id = 0
    for kind, size, role in ops:
        # kind 0: a new message; otherwise rewrite the last one (it can shrink).
        if kind == 0 or not full:
            id_ = next_id
            next_id += 1
        else:
            id_ = next_id - 1
            role = full[id_].role
        text = (f"{id_}:" + "z" * size)[:size]
        full[id_] = m(id_, text, role)
        conv.upsert(make_message(id_, role, text, T, cap))
        assert pack(conv.messages(), cap).body == pack(list(full.values()), cap).body
        assert len(conv.messages()) <= max_messages(cap) + 2
    assert conv.count == len(full)
    assert conv.has_user == any(x.role == "user" for x in full.values())
    assert all(x.role in ("user", "agent") for x in conv.messages())
