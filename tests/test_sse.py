"""The SSE decoder: line ends, chunk boundaries, sizes."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

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


def held_peak(feed: Callable[[Decoder], None], max_event_bytes: int) -> int:
    """The peak memory allocated while `feed` runs against a fresh decoder, in bytes."""
    decoder = Decoder(max_event_bytes)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        feed(decoder)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_line_that_never_ends_holds_no_more_than_the_cap() -> None:
    """64 MiB of one line with no line end, under a 64 KiB cap, is dropped as it arrives:
    the decoder never holds more than about the cap."""
    cap = 64 * 1024
    chunk = b"x" * (1 << 20)
    reports: list[Event | Oversized] = []

    def flood(decoder: Decoder) -> None:
        reports.extend(decoder.feed(b"event: message_update\ndata: "))
        for _ in range(64):
            reports.extend(decoder.feed(chunk))

    assert held_peak(flood, cap) <= 4 * cap
    assert len(reports) == 1
    assert isinstance(reports[0], Oversized)


def test_a_dropped_line_end_is_not_mistaken_for_the_blank_line() -> None:
    """The end of a line whose bytes were dropped is not the blank line that ends the
    event: the oversized event's later lines are still skipped, wherever chunks split."""
    raw = (b"data: " + b"z" * 5000 + b"\r\ndata: still the big event\r\n\r\n"
           b"event: ok\ndata: 1\n\n")
    for step in (1, 7, 5000 + 6, len(raw)):
        out = decode(raw, step, max_event_bytes=1024)
        assert [type(x) for x in out] == [Oversized, Event], step
        assert out[1] == Event("ok", "1")


def test_many_small_data_lines_are_held_at_their_own_size() -> None:
    """100 000 one-byte data lines hold about 200 KB, not a Python object per line."""
    raw = b"data:x\n" * 100_000

    def lines(decoder: Decoder) -> None:
        assert decoder.feed(raw) == []

    assert held_peak(lines, 256 * 1024) <= 3 * 256 * 1024


@pytest.mark.parametrize("line_end", [b"\n", b"\r", b"\r\n"])
def test_cost_is_linear_in_the_number_of_line_ends(line_end: bytes) -> None:
    """Two million empty lines in one chunk decode in seconds, not minutes: each byte is
    scanned a bounded number of times whatever the mix of line ends."""
    started = time.perf_counter()
    assert Decoder(1 << 20).feed(line_end * 2_000_000) == []
    assert time.perf_counter() - started < 10


@given(st.lists(st.sampled_from([b"data: ", b"x" * 300, b"x" * 1000, b"\n", b"\r", b":c",
                                  b"event: e"]), max_size=60),
       st.integers(min_value=1, max_value=50))
def test_nothing_held_passes_the_cap(parts: list[bytes], step: int) -> None:
    """For any stream and chunking, every event that comes out fits the cap, and the bytes
    held between chunks never pass it by more than one line end."""
    cap = 1024
    raw = b"".join(parts)
    decoder = Decoder(cap)
    for i in range(0, len(raw), step):
        for item in decoder.feed(raw[i : i + step]):
            if isinstance(item, Event):
                assert len(item.data.encode()) <= cap
        assert decoder.held <= cap + 1
