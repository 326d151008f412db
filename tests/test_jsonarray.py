"""Splitting the `messages` array of a /messages body into its elements, fed in pieces."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.jsonarray import ArraySplitter, NoArray, TooLarge

MIB = 1 << 20


def split(body: bytes, cuts: list[int] | None = None, cap: int = MIB,
          key: str = "messages") -> list[bytes | TooLarge]:
    """The elements of `body`, fed in pieces cut at `cuts` (default: byte by byte for
    short bodies, whole otherwise); close() must accept it."""
    splitter = ArraySplitter(key, cap)
    if cuts is None:
        cuts = [1] * len(body) if len(body) < 2000 else [len(body)]
    out: list[bytes | TooLarge] = []
    pos = 0
    for cut in [*cuts, len(body)]:
        out += splitter.feed(body[pos:pos + cut])
        pos += cut
    splitter.close()
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
tricky_text = st.sampled_from(['"', "\\", "[", "]", "{", "}", ",", ":", "messages",
                               '"messages":[1]', "\u2028", "😀", "\\u0022"])


@settings(max_examples=200, deadline=None)
@given(items=st.lists(json_values | tricky_text, max_size=8),
       before=st.dictionaries(st.text(max_size=10) | tricky_text, json_values, max_size=3),
       after=st.dictionaries(st.text(max_size=10) | tricky_text, json_values, max_size=3),
       cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
       indent=st.sampled_from([None, 2]), ascii_=st.booleans())
def test_any_body_split_anywhere_gives_each_element_whole(
    items: list[Any], before: dict[str, Any], after: dict[str, Any], cuts: list[int],
    indent: int | None, ascii_: bool,
) -> None:
    """Whatever the elements, the other members around the array (nested `messages` keys,
    brackets and quotes inside strings included), the spacing and the escaping, and
    wherever the body is cut, each element comes out whole and in order."""
    before.pop("messages", None)
    after.pop("messages", None)
    body = json.dumps({**before, "messages": items, **after}, indent=indent,
                      ensure_ascii=ascii_).encode()
    out = split(body, cuts)
    assert [json.loads(x) for x in out if isinstance(x, bytes)] == items
    assert len(out) == len(items)


def test_an_escaped_key_and_a_bom_are_understood() -> None:
    """A key written with escapes is still the key, and a UTF-8 BOM may open the body."""
    body = b'\xef\xbb\xbf {"\\u006dessages" : [ 1 , "two" ] }'
    assert split(body) == [b"1", b'"two"']


@pytest.mark.parametrize(("body", "elements"), [
    (b'{"messages":[]}', []),
    (b'{"messages":[ ]}', []),
    (b'{"a":{"messages":[9]},"messages":[1]}', [b"1"]),
    (b'{"messages":5,"messages":[1]}', [b"1"]),
    (b'{"messages":[1],"messages":[2]}', [b"1"]),
    (b'{"messages":[[1],[2,[3]]]}', [b"[1]", b"[2,[3]]"]),
    (b'{"messages":[1,,2]}', [b"1", b"", b"2"]),
])
def test_edge_cases(body: bytes, elements: list[bytes]) -> None:
    """Empty arrays hold nothing; only the first array under the key at the top level
    counts; an empty element between commas comes out empty (and fails to parse)."""
    assert split(body) == elements


def test_poison_elements_come_out_alone() -> None:
    """An id of 5 000 digits and a field nested 100 000 deep are each one element, which
    fails to parse on its own; the elements around them come out intact."""
    good = [{"id": i, "content": f"m{i}", "role": "user", "time": "t"} for i in range(3)]
    digits = '{"id":' + "9" * 5000 + ',"content":"x","role":"user","time":"t"}'
    deep = '{"id":7,"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    body = ('{"messages":[' + ",".join([json.dumps(good[0]), digits, json.dumps(good[1]),
                                        deep, json.dumps(good[2])]) + "]}").encode()
    out = split(body, [4096] * (len(body) // 4096))
    assert len(out) == 5
    assert [json.loads(x) for x in (out[0], out[2], out[4]) if isinstance(x, bytes)] == good
    for poison in (out[1], out[3]):
        assert isinstance(poison, bytes)
        with pytest.raises((ValueError, RecursionError)):
            json.loads(poison)


def test_an_element_over_the_cap_is_dropped_as_it_arrives() -> None:
    """A 64 MiB element under a 1 MiB cap comes out as TooLarge while the splitter holds
    little more than the cap; the elements after it come out intact."""
    splitter = ArraySplitter("messages", MIB)
    out = splitter.feed(b'{"messages":[1,{"content":"')
    held = 0
    for _ in range(64):
        out += splitter.feed(b'x\\"' * (MIB // 3))
        held = max(held, len(splitter._buf))
    out += splitter.feed(b'"},2]}')
    splitter.close()
    assert out[0] == b"1"
    assert out[2] == b"2"
    assert isinstance(out[1], TooLarge)
    assert out[1].size > MIB
    assert held <= 2 * MIB + 64


@pytest.mark.parametrize("body", [
    b"",
    b"[1,2]",
    b'"messages"',
    b'{"other":[1]}',
    b'{"messages":[1,2',
    b'{"messages":[1,"2]}',
    b'{"messages": "[1]"}',
])
def test_a_body_without_the_whole_array_is_refused(body: bytes) -> None:
    """No object, no array under the key, or a body that ends inside the array: close()
    raises NoArray (elements already seen may have come out)."""
    splitter = ArraySplitter("messages", MIB)
    splitter.feed(body)
    with pytest.raises(NoArray):
        splitter.close()


@pytest.mark.parametrize("unit", [b"[]", b"[", b"]", b"1,", b'"\\n', b'"",', b"{}", b'{"a":[]},'])
def test_its_cost_is_linear_whatever_the_bytes(unit: bytes) -> None:
    """512 KiB of the worst patterns (brackets alternating or nested 512 Ki deep, commas,
    escapes, empty strings, small elements), fed in 64 KiB pieces, cost a few microseconds
    of CPU per byte at most (about 0.6 here): no input makes the scan worse than linear."""
    inner = unit * ((MIB // 2) // len(unit))
    body = b'{"messages":[' + inner + (b'"' if unit.startswith(b'"\\') else b"") + b"]}"
    splitter = ArraySplitter("messages", 16 * MIB)
    started = time.process_time()
    for pos in range(0, len(body), 65536):
        splitter.feed(body[pos:pos + 65536])
    elapsed = time.process_time() - started
    assert elapsed < len(body) * 4e-6, elapsed
