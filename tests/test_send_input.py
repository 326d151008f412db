"""The body of POST /send: whatever the bytes, parsing gives an input or a 400, never an
exception. The same bodies over the socket are in test_relay.py."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.send_input import Input, parse_send

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["input", "type", "wait_s", "reply", "x"]),
                            json_values, max_size=5))
def test_parse_send_answers_any_json_object_without_raising(body: dict[str, Any]) -> None:
    """Any JSON object is either a valid input or a 400, never an exception."""
    raw = json.dumps(body).encode()
    parsed = parse_send(raw, 30.0)
    assert isinstance(parsed, Input) or parsed.status == 400


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_parse_send_answers_any_bytes_without_raising(raw: bytes) -> None:
    """Any bytes at all are either a valid input or a 400, never an exception."""
    parsed = parse_send(raw, 30.0)
    assert isinstance(parsed, Input) or parsed.status == 400
