"""An incremental Server-Sent Events decoder: bytes in, events out.

It splits lines on bytes, so U+2028 inside a UTF-8 data line is never a line break, and
a CR at the end of one chunk pairs with an LF at the start of the next.

Bounds (issue 15, item 5): the decoder never holds more than about `max_event_bytes` of
one event, whether or not a line end ever comes. The bytes it holds are the current
partial line plus the event's `data` and `event` fields so far; as soon as they would pass
the cap, the event is reported as `Oversized` and the decoder drops bytes (it keeps none
of them) until the blank line that ends the event. Its cost is linear in the bytes fed:
each chunk is scanned for line ends once per kind (CR, LF), whatever their mix.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event: its `event:` type and its joined `data:` lines."""

    type: str
    data: str


@dataclass(frozen=True, slots=True)
class Oversized:
    """An event that was dropped because it exceeded the cap; `size` is how many bytes of
    it had arrived when it was dropped (a lower bound on its size)."""

    size: int


class Decoder:
    """Feed it bytes, get events.

    Owns the state of one stream: the partial line and the event being assembled, at most
    about `max_event_bytes` of them together (larger events come out as `Oversized` and
    are skipped). `max_event_bytes` may be changed between feeds. `feed()` raises nothing
    on any input; its cost is linear in the input.
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._line = bytearray()  # the line that has not ended yet
        self._line_dropped = False  # bytes of the current line were dropped (skipping)
        self._after_cr = False  # the previous chunk ended in CR: a leading LF is its pair
        self._first_line = True  # a BOM may open the stream's first line only
        self._type = ""
        self._data = bytearray()
        self._has_data = False
        self._size = 0  # bytes held for the event being assembled (data and type)
        self._skipping = False  # inside an oversized event: drop lines until a blank one

    @property
    def held(self) -> int:
        """Bytes held now for the event being assembled, its partial line included."""
        return self._size + len(self._line)

    def feed(self, chunk: bytes) -> list[Event | Oversized]:
        """The events completed by `chunk`, in order."""
        out: list[Event | Oversized] = []
        if not chunk:
            return out
        start = 0
        if self._after_cr and chunk[:1] == b"\n":
            start = 1
        self._after_cr = False
        # The next CR and the next LF, each searched again only once passed, so every
        # byte is scanned at most once per kind (memchr speed); -1: none left.
        cr = chunk.find(b"\r", start)
        lf = chunk.find(b"\n", start)
        while cr >= 0 or lf >= 0:
            end = lf if cr < 0 or 0 <= lf < cr else cr
            self._take(chunk, start, end, out)
            self._end_line(out)
            start = end + 1
            if end == cr:
                if start == len(chunk):
                    self._after_cr = True  # its LF, if any, opens the next chunk
                elif chunk[start] == 0x0A:
                    start += 1
            if 0 <= cr < start:
                cr = chunk.find(b"\r", start)
            if 0 <= lf < start:
                lf = chunk.find(b"\n", start)
        self._take(chunk, start, len(chunk), out)
        return out

    def _take(self, chunk: bytes, start: int, end: int, out: list[Event | Oversized]) -> None:
        """Add chunk[start:end] to the current line, or drop it if that passes the cap."""
        if start >= end:
            return
        if self._skipping:
            self._line_dropped = True
            return
        held = self._size + len(self._line) + (end - start)
        if held > self.max_event_bytes:
            out.append(self._start_skip(held))
            self._line.clear()
            self._line_dropped = True
            return
        self._line += chunk[start:end]

    def _start_skip(self, size: int) -> Oversized:
        self._skipping = True
        self._data.clear()
        self._has_data = False
        self._size = 0
        self._type = ""
        return Oversized(size)

    def _end_line(self, out: list[Event | Oversized]) -> None:
        dropped, self._line_dropped = self._line_dropped, False
        line = bytes(self._line)
        self._line.clear()
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM):]
        if not line and not dropped:
            self._dispatch(out)
            return
        if self._skipping or dropped or line.startswith(b":"):
            return
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            # The line itself fitted, so the event's size stays within the cap.
            self._size += len(value) + 1
            if self._has_data:
                self._data += b"\n"
            self._data += value
            self._has_data = True
        elif field == b"event":
            self._size += len(value)
            self._type = value.decode("utf-8", "replace")
        # id and retry carry nothing agentapi uses (it never sends them); others are ignored.

    def _dispatch(self, out: list[Event | Oversized]) -> None:
        """A blank line: the end of an event (or of a skipped one)."""
        if self._skipping:
            self._skipping = False
        elif self._has_data:
            out.append(Event(self._type or "message", self._data.decode("utf-8", "replace")))
        self._data.clear()
        self._has_data = False
        self._type = ""
        self._size = 0
