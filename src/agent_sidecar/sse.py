"""An incremental Server-Sent Events decoder: bytes in, events out.

It splits lines on bytes, so U+2028 inside a UTF-8 data line is never a line break, and
a CR at the end of one chunk pairs with an LF at the start of the next. Each event is
capped in size; an oversized one is skipped whole and reported, never buffered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event: its `event:` type and its joined `data:` lines."""

    type: str
    data: str


@dataclass(frozen=True, slots=True)
class Oversized:
    """An event that was dropped because it exceeded the cap."""

    size: int


class Decoder:
    """Feed it bytes, get events. Holds at most about `max_event_bytes` of one event; larger
    events come out as `Oversized` and are skipped. Raises nothing on any input."""

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no line end
        self._after_cr = False  # the previous chunk ended in CR: a leading LF is its pair
        self._bom_checked = False
        self._type = ""
        self._data: list[bytes] = []
        self._size = 0
        self._skipping = False  # inside an oversized event: drop lines until a blank one

    def feed(self, chunk: bytes) -> list[Event | Oversized]:
        out: list[Event | Oversized] = []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        self._buf += chunk
        if not self._bom_checked and len(self._buf) >= 3:
            if self._buf.startswith(b"\xef\xbb\xbf"):
                del self._buf[:3]
            self._bom_checked = True
        start = 0
        buf = self._buf
        while True:
            cr = buf.find(b"\r", max(start, self._scan))
            lf = buf.find(b"\n", max(start, self._scan))
            if cr < 0 and lf < 0:
                break
            end = cr if lf < 0 or (0 <= cr < lf) else lf
            nxt = end + 1
            if buf[end] == 0x0D:
                if nxt < len(buf):
                    if buf[nxt] == 0x0A:
                        nxt += 1
                else:
                    self._after_cr = True
            self._line(bytes(buf[start:end]), out)
            start = nxt
            self._scan = 0
        del buf[:start]
        self._scan = len(buf)
        if self._pending_size() > self._max:
            # A line that has not ended yet already breaks the cap: stop holding it.
            out.append(self._start_skip(self._pending_size()))
            buf.clear()
            self._scan = 0
        return out

    def _pending_size(self) -> int:
        return 0 if self._skipping else self._size + len(self._buf)

    def _start_skip(self, size: int) -> Oversized:
        self._skipping = True
        self._data.clear()
        self._size = 0
        self._type = ""
        return Oversized(size)

    def _line(self, line: bytes, out: list[Event | Oversized]) -> None:
        if not line:
            if self._skipping:
                self._skipping = False
            elif self._data:
                data = b"\n".join(self._data).decode("utf-8", "replace")
                out.append(Event(self._type or "message", data))
            self._data.clear()
            self._type = ""
            self._size = 0
            return
        if self._skipping or line.startswith(b":"):
            return
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._size += len(value) + 1
            if self._size > self._max:
                out.append(self._start_skip(self._size))
                return
            self._data.append(value)
        elif field == b"event":
            self._type = value.decode("utf-8", "replace")
        # id and retry carry nothing agentapi uses (it never sends them); others are ignored.
