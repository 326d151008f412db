"""The benchmark's model of the shutdown script, and the coverage claim it supports."""

from __future__ import annotations

import json
import random

import pytest
from bench.__main__ import (
    baseline_marker_len,
    corpus,
    messages_response,
    preserved,
    sidecar_marker_len,
)
from bench.baseline import MARKER, shutdown_snapshot

from agent_sidecar.conversation import Message
from agent_sidecar.snapshot import pack

T = "2026-04-10T12:34:56Z"


def test_keeps_the_last_ten_pretty_printed_with_schema() -> None:
    """Like `jq '.messages |= .[-10:]'`: the last 10 messages, $schema kept, jq's layout."""
    messages = [Message(i, "user", f"m{i}", T) for i in range(25)]
    result = shutdown_snapshot(messages_response(messages))
    assert [m["id"] for m in result.messages] == list(range(15, 25))
    assert result.body is not None
    assert result.body.startswith(b'{\n  "$schema": ')
    assert result.body.endswith(b"}\n")


def test_drops_the_oldest_then_truncates_the_last_one() -> None:
    """Over 64 KiB it drops the oldest; one message left, it keeps its last 57 344 chars."""
    messages = [Message(0, "user", "q", T), Message(1, "agent", "a" * 100_000, T)]
    result = shutdown_snapshot(messages_response(messages))
    [only] = result.messages
    assert only["content"] == MARKER + "a" * 57_344


def test_gives_up_when_the_tail_is_still_too_big() -> None:
    """57 344 three-byte characters do not fit 64 KiB: the script uploads nothing."""
    messages = [Message(0, "agent", "─" * 80_000, T)]
    assert shutdown_snapshot(messages_response(messages)).body is None


@pytest.mark.parametrize("name", ["small (4 messages)", "many short turns",
                                  "80 000-char terminal messages", "box-drawing TUI text",
                                  "quote-heavy code"])
def test_sidecar_preserves_at_least_as_much_as_the_script(name: str) -> None:
    """On every benchmark corpus the sidecar keeps at least the script's recent history, and
    more wherever the history exceeds 10 messages or 64 KiB."""
    messages = corpus(name, random.Random(20261129))
    ours, _ = preserved(json.loads(pack(messages, 65536).body)["messages"], sidecar_marker_len)
    base, _ = preserved(shutdown_snapshot(messages_response(messages)).messages,
                        baseline_marker_len)
    assert ours >= base
    history = sum(len(m.content.encode()) for m in messages)
    if len(messages) > 10 or history > 65536:
        assert ours > base
