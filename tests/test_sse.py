"""The SSE decoder: line ends, chunk boundaries, sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_sidecar.sse import Decoder, Event, Oversized


def decode(raw: bytes, step: int, max_event_bytes: int = 1 << 20) -> list[Event | Oversized]:
    decoder = Decoder(max_event_bytes)
    out: list[Event | Oversized] = []
    for i in range(0, len(raw), step):
        out += decoder.feed(raw[i : i + step])
    return out


STREAM = (
    b"event: message_update\r\ndata: {\"a\":\"x\xe2\x80\xa8y\"}\r\n\r\n"
    b"event: status_change\rdata: 1\rdata: 2\r\r"
    b": a comment\n\n"
    b"data:no-space\n\n"
    b"event: empty\n\n"
)
EXPECTED = [
    Event("message_update", '{"a":"x\u2028y"}'),
    Event("status_change", "1\n2"),
    Event("message", "no-space"),
]


@pytest.mark.parametrize("step", range(1, len(STREAM) + 1))
def test_line_ends_split_anywhere(step: int) -> None:
    """CR, LF and CRLF end lines wherever the chunk boundaries fall, U+2028 does not."""
    assert decode(STREAM, step) == EXPECTED


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40))
def test_arbitrary_chunking(cuts: list[int]) -> None:
    """Any split of the stream into chunks yields the same events."""
    decoder = Decoder(1 << 20)
    out: list[Event | Oversized] = []
    pos = 0
    for cut in cuts:
        out += decoder.feed(STREAM[pos : pos + cut])
        pos += cut
    out += decoder.feed(STREAM[pos:])
    assert out == EXPECTED


def test_multi_megabyte_event_in_small_chunks() -> None:
    """A 5 MB data line arriving in 64 KiB chunks is decoded whole."""
    payload = "é" * (5 * 1024 * 1024 // 2)
    raw = b"event: message_update\ndata: " + payload.encode() + b"\n\n"
    out = decode(raw, 65536, max_event_bytes=16 << 20)
    assert out == [Event("message_update", payload)]


def test_oversized_event_is_skipped_and_the_stream_recovers() -> None:
    """An event over the cap is reported and dropped; the next event still decodes."""
    raw = b"data: " + b"x" * 5000 + b"\n\nevent: ok\ndata: after\n\n"
    out = decode(raw, 700, max_event_bytes=1024)
    assert len(out) == 2
    assert isinstance(out[0], Oversized)
    assert out[0].size > 1024
    assert out[1] == Event("ok", "after")


def test_bom_at_stream_start_is_ignored() -> None:
    """A UTF-8 byte order mark before the first line does not corrupt the first field."""
    assert decode(b"\xef\xbb\xbfevent: a\ndata: b\n\n", 1) == [Event("a", "b")]


def test_incomplete_event_is_not_dispatched() -> None:
    """An event cut before its blank line is never emitted."""
    assert decode(b"event: a\ndata: partial", 3) == []


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    """Bytes that are not UTF-8 decode with replacement characters."""
    assert decode(b"data: \xff\xfe\n\n", 2) == [Event("message", "\ufffd\ufffd")]
