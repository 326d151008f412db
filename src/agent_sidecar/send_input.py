"""The body of `POST /send`: `{"input": str, "type": "user"|"raw", "wait_s": number,
"reply": bool}`, parsed and checked into an `Input`, or the 400 that says what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from agent_sidecar.error_shape import error

MAX_WAIT_S = 3600.0

_SEND_FIELDS = frozenset({"input", "type", "wait_s", "reply"})
_USAGE = ('expected {"input": "text", "type": "user"|"raw", "wait_s": seconds from 0 to '
          f'{MAX_WAIT_S:g}, "reply": true|false}}')


@dataclass(frozen=True)
class Input:
    """One parsed POST /send body."""

    text: str
    kind: Literal["user", "raw"]
    wait_s: float
    reply: bool = False


def parse_send(raw: bytes, default_wait_s: float) -> Input | web.Response:
    """A POST /send body as an Input, or the 400 that says what is wrong with it. Never
    raises, whatever the bytes: nesting, huge numbers and bad text are all a 400."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        return error(400, "The request body is nested too deeply.", _USAGE)
    except ValueError as exc:  # also bad UTF-8 and integers beyond Python's digit limit
        return error(400, "The request body is not valid JSON.", f"{str(exc)[:200]}; {_USAGE}")
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", _USAGE)
    unknown = sorted(set(body) - _SEND_FIELDS)
    if unknown:
        return error(400, f"Unknown field {_show(unknown[0])}.", _USAGE)
    kind = body.get("type", "user")
    if kind not in ("user", "raw"):
        return error(400, "Field 'type' must be \"user\" or \"raw\".", f"got {_show(kind)}")
    text = body.get("input")
    if not isinstance(text, str):
        return error(400, "Field 'input' is required and must be a string.", _USAGE)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return error(400, "Field 'input' must be valid Unicode text.",
                     "it holds a lone surrogate escape such as \\ud800")
    if kind == "user":
        # agentapi rejects surrounding whitespace; trim exactly the set it trims.
        text = text.strip(" \t\n\r\f\v")
    if not text:
        return error(400, "Field 'input' must not be empty.", _USAGE)
    wait_value = body.get("wait_s", default_wait_s)
    wait_s = _seconds(wait_value)
    if wait_s is None:
        return error(400, f"Field 'wait_s' must be a number from 0 to {MAX_WAIT_S:g}.",
                     f"got {_show(wait_value)}")
    reply = body.get("reply", False)
    if not isinstance(reply, bool):
        return error(400, "Field 'reply' must be true or false.", f"got {_show(reply)}")
    if reply and kind == "raw":
        return error(400, "Field 'reply' is only for \"user\" input.",
                     "raw keystrokes start no new message to reply with")
    return Input(text, kind, wait_s, reply)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _show(value: object) -> str:
    """A short, safe rendering of a client's value for an error detail."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to render
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _seconds(value: object) -> float | None:
    """`value` as seconds from 0 to MAX_WAIT_S, or None. Exact for any int, however long."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not 0 <= value <= MAX_WAIT_S:
        return None
    return float(value)
