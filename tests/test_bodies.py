"""Bounded decoding of compressed bodies: what comes out, and in pieces of what size."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sidecar.bodies import STEP, Inflater, UnsupportedEncoding


def encode(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    return raw.compress(data) + raw.flush()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000) | st.just(bytes(300_000)),
       coding=st.sampled_from(["gzip", "deflate", "raw"]),
       cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=20))
def test_any_split_inflates_to_the_original_in_bounded_pieces(
    data: bytes, coding: str, cuts: list[int],
) -> None:
    """However the compressed bytes are split, the output is the original, in pieces of at
    most STEP bytes."""
    body = encode(data, coding)
    inflater = Inflater("deflate" if coding == "raw" else coding)
    out: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(body)]:
        out += inflater.feed(body[pos:pos + cut])
        pos += cut
    assert b"".join(out) == data
    assert all(len(piece) <= STEP for piece in out)


def test_gzip_members_follow_one_another() -> None:
    """A gzip body of two members decodes to both, in order."""
    inflater = Inflater("gzip")
    assert b"".join(inflater.feed(gzip.compress(b"one ") + gzip.compress(b"two"))) == b"one two"


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip", "compress"])
def test_other_codings_are_refused_by_name(coding: str) -> None:
    """A coding the sidecar does not decode is refused up front, naming it."""
    with pytest.raises(UnsupportedEncoding, match="is not supported"):
        Inflater(coding)


def test_a_corrupt_body_is_an_error_of_its_own() -> None:
    """Bytes that are not gzip raise UnsupportedEncoding, not zlib.error."""
    with pytest.raises(UnsupportedEncoding, match="corrupt"):
        list(Inflater("gzip").feed(b"not gzip at all"))
