"""A faithful Python model of the agentapi module's shutdown snapshot.

coder/registry `registry/coder/modules/agentapi/scripts/agentapi-shutdown.sh`:
1. `curl /messages` once, at stop; `jq '.messages |= .[-10:]'` keeps the last 10 messages
   (and the `$schema` field) in jq's pretty-printed form;
2. while `wc -c` of that file is over 65 536 bytes and more than one message is left, drop
   the oldest;
3. with one message left, keep its last 57 344 characters (jq slices by code point) behind
   `[...content truncated, showing last 56KB...]\\n\\n`; if still too big, give up;
4. POST the file once with curl, no retry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_PAYLOAD_SIZE = 65536
MAX_MESSAGE_CONTENT = 57344
MAX_MESSAGES = 10
MARKER = "[...content truncated, showing last 56KB...]\n\n"


@dataclass(frozen=True)
class BaselineResult:
    body: bytes | None  # None: the script gave up, nothing was uploaded
    messages: list[dict[str, Any]]


def jq_pretty(document: dict[str, Any]) -> bytes:
    """jq's default output: 2-space indent, raw UTF-8, DEL escaped, a trailing newline."""
    text = json.dumps(document, indent=2, ensure_ascii=False).replace("\x7f", "\\u007f")
    return (text + "\n").encode("utf-8")


def shutdown_snapshot(messages_response: bytes) -> BaselineResult:
    document = json.loads(messages_response)
    document["messages"] = document["messages"][-MAX_MESSAGES:]
    if not document["messages"]:
        return BaselineResult(None, [])
    body = jq_pretty(document)
    while len(body) > MAX_PAYLOAD_SIZE:
        if len(document["messages"]) == 1:
            content = document["messages"][0]["content"]
            if len(content) > MAX_MESSAGE_CONTENT:
                document["messages"][0]["content"] = MARKER + content[-MAX_MESSAGE_CONTENT:]
            body = jq_pretty(document)
            if len(body) > MAX_PAYLOAD_SIZE:
                return BaselineResult(None, [])
            break
        document["messages"] = document["messages"][1:]
        body = jq_pretty(document)
    return BaselineResult(body, document["messages"])
