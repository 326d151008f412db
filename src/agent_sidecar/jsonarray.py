"""Splits the array under one key of a JSON object into its elements, as the body arrives.

agentapi's GET /messages answers `{"$schema": ..., "messages": [m0, m1, ...]}`
(agentapi-protocol.md §5). Parsed whole, one bad element (an id of 5 000 digits, past
Python's int max-str-digits limit; a field nested 100 000 deep) makes the whole answer
invalid JSON, and every message is lost with it. This splitter finds the elements without
parsing them, so that each is parsed on its own and a bad one is dropped alone.

It tracks only what decides where an element ends: strings (and their escapes) and
bracket depth. Regular expressions skip whatever else lies between, and whole runs of
opening or closing brackets, at C speed, so its cost is linear in the bytes fed however
they are nested, and nothing is recursive. It does not check that the JSON is valid:
whatever is wrong inside an element is for the element's own parser to find.

Memory: it holds the element being collected, up to `max_element_bytes` (a larger one is
dropped as it arrives and reported as `TooLarge`), plus at most one piece fed to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# The next byte that matters, by where the scan is. Runs of brackets are one match each.
_TOP = re.compile(rb'"|[\[{]+|[\]}]+|[,:]')  # in the object, between its members
_NESTED = re.compile(rb'"|[\[{]+|[\]}]+')  # inside a value: only strings and depth count
_ITEMS = re.compile(rb'"|[\[{]+|[\]}]+|,')  # in the array, between and in its elements
# The rest of a string after its opening quote, up to (not including) the closing quote,
# or up to a backslash that is the last byte so far (its escaped byte is still to come).
# Possessive (Python 3.11+): without it `re` keeps backtracking state for every escape,
# about 150 bytes each (300 MB for a string of 2 M escapes); with it, none.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_SPACE = re.compile(rb"[ \t\r\n]*")
_QUOTE = 0x22
_BOM = b"\xef\xbb\xbf"
_MAX_KEY_BYTES = 128  # a key this long, escapes included, is never the one looked for


def _skip(pattern: re.Pattern[bytes], buf: bytearray, pos: int) -> int:
    """Where a pattern that may match nothing (_STRING_REST, _SPACE) stops, from `pos`."""
    match = pattern.match(buf, pos)
    return pos if match is None else match.end()


def _scan_value(buf: bytearray, pos: int, depth: int, level: int) -> tuple[int, int, bool]:
    """Scan the inside of a value (`depth` > `level`) until the depth is back at `level`
    or the bytes run out: (where the scan stopped, the depth there, whether it stopped
    inside a string). The one loop most bytes go through, so kept to local names."""
    search, rest, end_of = _NESTED.search, _STRING_REST.match, len(buf)
    while True:
        match = search(buf, pos)
        if match is None:
            return end_of, depth, False
        at, pos = match.span()
        first = buf[at]
        if first == _QUOTE:
            tail = rest(buf, pos)
            end = pos if tail is None else tail.end()
            if end >= end_of or buf[end] != _QUOTE:
                return end, depth, True
            pos = end + 1
        elif first == 0x5B or first == 0x7B:  # [ {
            depth += pos - at
        elif depth - (pos - at) > level:
            depth -= pos - at
        else:  # this run of closers ends the value: stop where the depth is `level`
            return at + depth - level, level, False


@dataclass(frozen=True, slots=True)
class TooLarge:
    """An element dropped because it is larger than the cap; `size` is how many bytes of
    it had been seen when it was dropped (a lower bound on its size)."""

    size: int


class NoArray(ValueError):
    """The body is not an object holding the array under the key, or it ended before the
    array did."""


class ArraySplitter:
    """Feed it a JSON object's bytes in pieces; get the elements of the array under `key`.

    Owns the scan state of one body. `feed()` returns the elements completed by a piece,
    each as its own bytes (surrounding whitespace removed) or as TooLarge; it raises
    nothing on any input, and its cost is linear in the bytes fed. `close()` raises
    NoArray if the body never had the array or ended inside it. The first array under
    `key` at the top level is split; anything after it in the body is ignored.
    """

    def __init__(self, key: str, max_element_bytes: int) -> None:
        self.key = key
        self.max_element_bytes = max_element_bytes
        self._buf = bytearray()  # bytes not yet scanned, and the element being collected
        self._pos = 0  # where the scan resumes in _buf
        self._phase = "start"  # start | object | value | items | done
        self._depth = 0  # 1 inside the object, 2 inside the array
        self._in_string = False  # the scan stopped inside a string
        self._string_start: int | None = None  # in _buf: a key being read at depth 1
        self._key_lost = False  # that key was too long to keep: it is not the one
        self._last_string: bytes | None = None  # the last string at depth 1: maybe a key
        self._item_start: int | None = None  # in _buf: the element being collected
        self._skipping: int | None = None  # the size of a TooLarge element being skipped
        self._found = False  # the array under `key` was opened
        self._closed = False  # and closed

    def feed(self, data: bytes) -> list[bytes | TooLarge]:
        """The elements that `data` completes, in order."""
        out: list[bytes | TooLarge] = []
        if self._phase == "done" or not data:
            return out
        self._buf += data
        while self._step(out):
            pass
        self._compact(out)
        return out

    def close(self) -> None:
        """Raise NoArray unless the array under `key` was found and closed."""
        if not self._found:
            raise NoArray(f"no {self.key!r} array in a JSON object")
        if not self._closed:
            raise NoArray(f"the body ended inside the {self.key!r} array")

    # -- the scan ------------------------------------------------------------------------

    def _step(self, out: list[bytes | TooLarge]) -> bool:
        """Scan on from _pos; False when the bytes so far are used up."""
        buf = self._buf
        if self._phase == "done":
            return False
        if self._in_string:
            end = _skip(_STRING_REST, buf, self._pos)
            if end >= len(buf) or buf[end] != _QUOTE:
                self._pos = end  # wait for the rest of the string
                return False
            self._in_string = False
            self._pos = end + 1
            self._string_closed(end)
            return True
        if self._phase == "start":
            return self._start()
        if self._phase == "value":
            return self._value()
        level = 2 if self._phase == "items" else 1
        if self._depth > level:
            self._pos, self._depth, self._in_string = _scan_value(
                buf, self._pos, self._depth, level)
            return self._depth == level  # else the bytes ran out, maybe inside a string
        match = (_ITEMS if self._phase == "items" else _TOP).search(buf, self._pos)
        if match is None:
            self._pos = len(buf)
            return False
        at, self._pos = match.start(), match.end()
        first = buf[at]
        if first == _QUOTE:
            if self._phase == "object" and self._depth == 1:
                self._string_start = at
            self._in_string = True
        elif first in b"[{":
            self._depth += match.end() - at
        elif first in b"]}":
            self._close_brackets(at, match.end() - at, out)
        elif first == 0x2C:  # ,
            if self._phase == "items":
                self._end_item(at, out)
                self._phase = "value"  # the next element
            self._last_string = None
        else:  # : between a key and its value, at depth 1
            key, self._last_string = self._last_string, None
            if key is not None and not self._found and self._is_key(key):
                self._phase = "value"
        return True

    def _start(self) -> bool:
        buf = self._buf
        if self._pos == 0:  # a BOM may open the body, nowhere else
            if len(buf) < len(_BOM) and _BOM.startswith(bytes(buf)):
                return False  # maybe the start of one: wait for more
            if buf.startswith(_BOM):
                del buf[:len(_BOM)]
        pos = _skip(_SPACE, buf, self._pos)
        self._pos = pos
        if pos >= len(buf):
            return False
        if buf[pos] != ord("{"):
            self._phase = "done"  # not an object: there is nothing to find
            return False
        self._phase, self._depth, self._pos = "object", 1, pos + 1
        return True

    def _value(self) -> bool:
        """After `key:` (does an array open?) or after a comma in the array (where does
        the next element start?)."""
        buf = self._buf
        pos = _skip(_SPACE, buf, self._pos)
        self._pos = pos
        if pos >= len(buf):
            return False
        if not self._found:
            if buf[pos] != ord("["):
                self._phase = "object"  # the key's value is not an array: look on
                return True
            self._found = True
            self._depth, self._pos = 2, pos + 1
            return True  # in the array; the first element starts after spaces
        self._phase = "items"
        self._item_start = pos
        return True

    def _string_closed(self, end: int) -> None:
        """A string ended at _buf[end]; keep it if it may be a key of the object."""
        start, self._string_start = self._string_start, None
        if start is None:
            return
        lost, self._key_lost = self._key_lost, False
        self._last_string = None if lost else bytes(self._buf[start:end + 1])

    def _is_key(self, raw: bytes) -> bool:
        if b"\\" not in raw:
            return raw[1:-1] == self.key.encode()
        try:
            return bool(json.loads(raw) == self.key)  # an escaped key, short by now
        except ValueError:
            return False

    def _close_brackets(self, at: int, run: int, out: list[bytes | TooLarge]) -> None:
        floor = 2 if self._phase == "items" else 1
        if self._depth - run >= floor:
            self._depth -= run
            return
        # One bracket of the run closes the array (or the object): the one that takes
        # the depth below the floor.
        closing = at + self._depth - floor
        if self._phase == "items":
            self._end_item(closing, out)
            self._closed = True
        self._phase = "done"

    def _end_item(self, end: int, out: list[bytes | TooLarge]) -> None:
        start, self._item_start = self._item_start, None
        skipped, self._skipping = self._skipping, None
        if skipped is not None:
            out.append(TooLarge(skipped))
        elif start is not None:
            with memoryview(self._buf) as view:  # one copy, not a slice and then bytes()
                item = bytes(view[start:end]).strip(b" \t\r\n")
            if len(item) > self.max_element_bytes:
                out.append(TooLarge(len(item)))
            elif item or self._buf[end] == 0x2C:  # `[]` and `[ ]` hold no element
                out.append(item)

    # -- memory ---------------------------------------------------------------------------

    def _compact(self, out: list[bytes | TooLarge]) -> None:
        """Drop the bytes no longer needed: all but the element being collected (within
        its cap) and a key being read."""
        keep = self._pos
        if self._phase == "done":
            keep = len(self._buf)
        elif self._item_start is not None:
            if len(self._buf) - self._item_start > self.max_element_bytes:
                self._skipping = len(self._buf) - self._item_start
                self._item_start = None  # too large: skip the rest of it as it comes
            else:
                keep = self._item_start
        elif self._string_start is not None:
            if len(self._buf) - self._string_start > _MAX_KEY_BYTES:
                self._string_start, self._key_lost = None, True
            else:
                keep = self._string_start
        if keep:
            del self._buf[:keep]
            self._pos -= keep
            if self._item_start is not None:
                self._item_start -= keep
            if self._string_start is not None:
                self._string_start -= keep
