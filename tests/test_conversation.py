"""The conversation model: upserts, replays, status, and memory bounded by what a snapshot needs."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.conversation import Conversation, Message, clean_time, make_message
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


def test_long_history_is_pruned_to_what_a_snapshot_needs() -> None:
    """After 100 MB of history only about one snapshot's worth of characters is kept."""
    conv = Conversation(retain_chars=65536)
    for i in range(10_000):
        conv.upsert(make_message(i, "agent" if i % 2 else "user", "x" * 10_000, T, 65536))
    assert conv.count == 10_000
    kept = sum(len(x.content) for x in conv.messages())
    assert kept <= 65536 + 2 * 10_000
    assert conv.messages()[-1].id == 9_999


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
        st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=3000),
                  st.sampled_from(["user", "agent"])),
        min_size=1, max_size=80,
    ),
    cap=st.integers(min_value=1024, max_value=4096),
)
def test_pruned_model_packs_exactly_like_the_full_history(
    ops: list[tuple[int, int, str]], cap: int
) -> None:
    """Whatever the updates (new messages, the last one growing or shrinking), pruning never
    changes the packed snapshot."""
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
        text = (f"{id_}:" + "z" * size)[: max(size, 1)]
        full[id_] = m(id_, text, role)
        conv.upsert(make_message(id_, role, text, T, cap))
        assert pack(conv.messages(), cap).body == pack(list(full.values()), cap).body
    assert conv.count == len(full)
    assert conv.has_user == any(x.role == "user" for x in full.values())
