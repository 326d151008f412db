"""pack(): the exact body coderd accepts, filled to the cap, newest first."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.conversation import MIN_ITEM_BYTES, Message, max_messages
from agent_sidecar.snapshot import MIN_TAIL_BYTES, marker, pack

TIME = "2026-04-10T12:34:56.123456789Z"
MARKER_RE = re.compile(r"^\[agent-sidecar: (\d+) earlier characters of this message cut to fit\]\n")


def msg(id_: int, content: str, role: str = "agent", time: str = TIME) -> Message:
    return Message(id_, role, content, time)


def conversation(sizes: list[int], char: str = "a") -> list[Message]:
    return [msg(i, char * n, "user" if i % 2 else "agent") for i, n in enumerate(sizes)]


def decoded(body: bytes) -> list[dict[str, object]]:
    data = json.loads(body.decode("utf-8"))
    assert list(data) == ["messages"]
    return list(data["messages"])


def test_small_conversation_is_sent_whole_and_compact() -> None:
    """A conversation under the cap is sent whole, compact, in id order, with verbatim times."""
    messages = [msg(0, "hi"), msg(1, "hello", "user", "2026-04-10T12:00:00+02:00")]
    packed = pack(messages, 65536)
    assert packed.body == (
        b'{"messages":[{"id":0,"content":"hi","role":"agent","time":"2026-04-10T12:34:56.'
        b'123456789Z"},{"id":1,"content":"hello","role":"user","time":"2026-04-10T12:00:00'
        b'+02:00"}]}'
    )
    assert not packed.truncated


def test_non_ascii_is_sent_as_utf8_not_escaped() -> None:
    """Box drawing and accents go out as UTF-8 bytes, not \\u escapes."""
    packed = pack([msg(0, "┌─é─┐", "user")], 65536)
    assert "┌─é─┐".encode() in packed.body


def test_nul_is_stripped() -> None:
    """U+0000 never reaches coderd, whose jsonb column rejects it."""
    packed = pack([msg(0, "a\x00b", "user")], 65536)
    assert decoded(packed.body)[0]["content"] == "ab"
    assert b"\\u0000" not in packed.body


def test_only_user_and_agent_roles_are_sent() -> None:
    """Messages with other roles are left out."""
    packed = pack([msg(0, "x", "system"), msg(1, "y", "user"), msg(2, "z", "tool")], 65536)
    assert [m["id"] for m in decoded(packed.body)] == [1]


def test_empty_conversation() -> None:
    """No messages packs to an empty list, which coderd accepts."""
    assert pack([], 65536).body == b'{"messages":[]}'


def test_single_one_megabyte_message_keeps_its_tail() -> None:
    """A 1 MB message is cut to its newest part behind a marker, and fills the cap."""
    content = "".join(f"line {i:07d}\n" for i in range(80_000))
    packed = pack([msg(0, "q", "user"), msg(1, content)], 65536)
    assert packed.size <= 65536
    assert packed.size >= 0.97 * 65536
    [only] = decoded(packed.body)
    assert only["id"] == 1
    text = str(only["content"])
    match = MARKER_RE.match(text)
    assert match is not None
    kept = text[match.end():]
    assert content.endswith(kept)
    assert int(match.group(1)) == len(content) - len(kept)
    assert packed.truncated


def test_ten_thousand_small_messages_fill_the_cap_newest_first() -> None:
    """10 000 short messages: the newest ones go whole and the cap is at least 97% used."""
    messages = conversation([40] * 10_000)
    packed = pack(messages, 65536)
    ids = [int(str(m["id"])) for m in decoded(packed.body)]
    assert ids == sorted(ids)
    assert ids[-1] == 9_999
    assert packed.size <= 65536
    assert packed.size >= 0.97 * 65536


def test_quotes_and_control_characters_count_as_escaped() -> None:
    """Escaping blow-up (quotes x2, control characters x6) is measured, not guessed."""
    nasty = ('"\\' * 5000) + ("\x01\x1f" * 5000)
    packed = pack([msg(0, "q", "user"), msg(1, nasty)], 16384)
    assert packed.size <= 16384
    assert packed.size >= 0.97 * 16384
    text = str(decoded(packed.body)[-1]["content"])
    assert nasty.endswith(text[MARKER_RE.match(text).end():])  # type: ignore[union-attr]


def test_lone_surrogates_are_replaced_so_the_body_is_utf8() -> None:
    """A lone surrogate from agentapi's JSON cannot make the body invalid UTF-8."""
    packed = pack([msg(0, "a\ud800b", "user")], 65536)
    packed.body.decode("utf-8")


def test_time_is_kept_verbatim() -> None:
    """agentapi's time strings are forwarded byte for byte."""
    times = ["2026-04-10T12:34:56Z", "2026-04-10T12:34:56.1+05:30", TIME]
    packed = pack([msg(i, "x", "user", t) for i, t in enumerate(times)], 65536)
    assert [m["time"] for m in decoded(packed.body)] == times


def test_no_tail_when_too_little_room_is_left() -> None:
    """When less than a useful amount of room is left, the older message is dropped whole."""
    cap = 4096
    newest = msg(5, "n" * (cap - 40 - MIN_TAIL_BYTES // 2), "user")
    packed = pack([msg(4, "o" * 5000), newest], cap)
    assert [m["id"] for m in decoded(packed.body)] == [5]
    assert not packed.truncated


text_chars = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(
        ['"', "\\", "\n", "\x00", "\x1b", "─", "🙂", "é"]
    ),
    max_size=3000,
)


@settings(max_examples=200, deadline=None)
@given(
    contents=st.lists(text_chars, min_size=1, max_size=30),
    roles=st.lists(st.sampled_from(["user", "agent"]), min_size=30, max_size=30),
    cap=st.integers(min_value=1024, max_value=20000),
)
def test_pack_properties(contents: list[str], roles: list[str], cap: int) -> None:
    """For any conversation: fits the cap, valid UTF-8 JSON, ordered, newest whole, maximal."""
    messages = [msg(i, c, roles[i]) for i, c in enumerate(contents)]
    packed = pack(messages, cap)
    assert packed.size <= cap
    out = decoded(packed.body)
    ids = [int(str(m["id"])) for m in out]
    assert ids == list(range(len(messages) - len(ids), len(messages)))  # a contiguous tail
    whole = out[1:] if packed.truncated else out
    for item in whole:
        assert item["content"] == messages[int(str(item["id"]))].content.replace("\x00", "")
    if len(ids) < len(messages):
        # Maximal: the next older message, whole, would not have fitted.
        older = messages[len(messages) - len(ids) - (0 if packed.truncated else 1)]
        plus = pack([msg(older.id, older.content.replace("\x00", ""), older.role)]
                    + [msg(m.id, m.content, m.role) for m in messages[older.id + 1:]], 10**9)
        assert plus.size > cap
    if packed.truncated:
        first = out[0]
        text = str(first["content"])
        match = MARKER_RE.match(text)
        assert match is not None
        original = messages[int(str(first["id"]))].content.replace("\x00", "")
        kept = text[match.end():]
        assert original.endswith(kept)
        assert int(match.group(1)) == len(original) - len(kept)
        if len(kept) < len(original):
            # Maximal tail: one more character would not have fitted.
            longer = dict(first, content=marker(len(original) - len(kept) - 1)
                          + original[-(len(kept) + 1):])
            grown = [longer, *out[1:]]
            body = json.dumps({"messages": grown}, ensure_ascii=False, separators=(",", ":"))
            assert len(body.encode()) > cap


def test_marker_says_how_much_was_cut() -> None:
    """The marker is one line naming the number of characters cut."""
    assert marker(1234) == "[agent-sidecar: 1234 earlier characters of this message cut to fit]\n"


def test_the_smallest_item_is_what_the_message_bound_assumes() -> None:
    """The conversation's message bound rests on the smallest item pack() emits; the
    most of those a snapshot holds is below that bound."""
    smallest = msg(0, "", "user", "2006-01-02T15:04:05Z")
    assert pack([smallest], 65536).size == len(b'{"messages":[]}') + MIN_ITEM_BYTES
    for cap in (1024, 4096, 65536):
        many = [msg(0, "", "user", "2006-01-02T15:04:05Z")] * (max_messages(cap) + 10)
        assert pack(many, cap).messages < max_messages(cap)


@pytest.mark.parametrize(("id_", "time"), [
    (2**63, TIME),  # past int64
    (-1, TIME),
    (3, "2025-13-45T10:00:00Z"),
    (3, "2025-01-01T10:00:00+99:99"),
    (3, "\uff12\uff10\uff12\uff15-01-01T10:00:00Z"),
])
def test_a_message_coderd_would_refuse_is_left_out_not_the_body(id_: int, time: str) -> None:
    """One message with an id beyond int64 or a time Go refuses is left out, and the
    others still go."""
    poison = msg(id_, "poison", "agent", time)
    packed = pack([msg(0, "before", "user"), poison, msg(9, "after", "user")], 65536)
    assert [m["id"] for m in decoded(packed.body)] == [0, 9]
    assert packed.skipped == 1


def test_a_fraction_past_nanoseconds_is_cut_in_the_body() -> None:
    """A time with more fraction digits than Go reads goes out cut to nine digits."""
    packed = pack([msg(0, "x", "user", "2026-04-10T12:34:56.1234567890123Z")], 65536)
    assert decoded(packed.body)[0]["time"] == "2026-04-10T12:34:56.123456789Z"
