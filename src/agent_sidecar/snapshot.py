"""pack(): the conversation as the exact body coderd's log-snapshot endpoint accepts.

Pure: no I/O, no clock. It walks back from the newest message and stops at the first that
does not fit, so its cost follows the size of the snapshot, not the length of the history.

What it emits is what coderd's Go decoder accepts (coder-contract.md §4): UTF-8 with no
U+0000 and no lone surrogate, ids within int64, times RFC 3339 as Go reads them. The
conversation model already guarantees the last two; pack() checks them again and leaves
out a message that breaks them (counted in `Packed.skipped`), so that one bad message
can never make coderd refuse the whole body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent_sidecar.conversation import MAX_ID, SENT_ROLES, Message, go_time

# coderd reads the body through http.MaxBytesReader(64*1024): one byte more is refused
# (coder-contract.md §4, coderd/aitasks.go taskSnapshotMaxSize).
CODERD_MAX_BODY_BYTES = 64 * 1024
# Below this a snapshot holds too little to be worth the request.
MIN_SNAPSHOT_BYTES = 1024

_HEAD = b'{"messages":['
_FOOT = b"]}"
# Below this many bytes of room, a tail is more noise than history.
MIN_TAIL_BYTES = 256


@dataclass(frozen=True, slots=True)
class Packed:
    """One snapshot body, ready to upload, with what it holds."""

    body: bytes
    messages: int  # messages in the body, the truncated one included
    truncated: bool  # the oldest message in the body is a tail
    skipped: int = 0  # messages left out because coderd would refuse them (bad id or time)

    @property
    def size(self) -> int:
        return len(self.body)


def marker(cut_chars: int) -> str:
    return f"[agent-sidecar: {cut_chars} earlier characters of this message cut to fit]\n"


def _clean(text: str) -> str:
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from "\ud800" in agentapi's JSON) are not UTF-8; Go would
        # reject the body. Replace them rather than lose the message.
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _encode(message: Message, content: str) -> bytes:
    item = {"id": message.id, "content": content, "role": message.role, "time": message.time}
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sendable(message: Message) -> Message | None:
    """`message` as coderd will accept it, or None if it cannot be."""
    if type(message.id) is not int or not 0 <= message.id <= MAX_ID:
        return None
    time = go_time(message.time)
    if time is None:
        return None
    return message if time == message.time else replace(message, time=time)


def _tail(message: Message, room: int) -> bytes | None:
    """The item with the longest tail of content that fits in `room` bytes, or None."""
    content = _clean(message.content)
    base = len(_encode(message, marker(message.total_chars)))
    if room - base < MIN_TAIL_BYTES:
        return None
    # The encoded size grows with the tail's length, so search it. Slicing a str cuts
    # between code points, never inside one.
    lo, hi = 0, len(content)
    best: bytes | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = content[len(content) - mid:] if mid else ""
        cut = message.cut_chars + len(content) - mid
        item = _encode(message, marker(cut) + kept)
        if len(item) <= room:
            best, lo = item, mid + 1
        else:
            hi = mid - 1
    return best


def pack(messages: Sequence[Message], max_bytes: int) -> Packed:
    """Newest messages whole, then the tail of the first that does not fit, oldest first."""
    room = max_bytes - len(_HEAD) - len(_FOOT)
    items: list[bytes] = []
    truncated = False
    skipped = 0
    for candidate in reversed(messages):
        if candidate.role not in SENT_ROLES:
            continue
        message = _sendable(candidate)
        if message is None:
            skipped += 1
            continue
        separator = 1 if items else 0
        item = _encode(message, _clean(message.content)) if not message.cut_chars else None
        if item is not None and len(item) + separator <= room:
            items.append(item)
            room -= len(item) + separator
            continue
        tail = _tail(message, room - separator)
        if tail is not None:
            items.append(tail)
            truncated = True
        break
    items.reverse()
    body = _HEAD + b",".join(items) + _FOOT
    return Packed(body=body, messages=len(items), truncated=truncated, skipped=skipped)
