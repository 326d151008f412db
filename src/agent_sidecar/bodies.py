"""Response bodies read with a cap, compressed or not (issue 15, item 7).

aiohttp decompresses gzip, deflate and br bodies by itself, and how much it inflates at a
time depends on its version. So requests that use these helpers ask for
`auto_decompress=False` and `Accept-Encoding: identity`, and a body a server compresses
anyway is inflated here in steps of at most `STEP` bytes: a zip bomb costs at most the
cap in memory and CPU linear in the cap, never its expanded size. gzip (x-gzip) and
deflate (zlib-wrapped or raw) are understood; other codings are refused.

A compressed body is the one case where a few bytes from the network become a lot of work
at once (about 1000:1 for a zip bomb), so between two inflated steps the event loop gets a
turn: however much a body inflates to, the loop never waits behind more than one STEP of
it. A plain body needs no such turn: each read hands over only what the socket buffered.
Event streams (SSE) are not read here: agentapi never compresses them, and the follower
refuses one that is (agentapi.py).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

STEP = 64 * 1024  # the most one inflate step produces
# Ask servers not to compress; a server that does anyway is still read within the cap.
IDENTITY = {"Accept-Encoding": "identity"}


class BodyError(Exception):
    """A body that cannot be read within its bounds."""


class BodyTooLarge(BodyError):
    """The body, decompressed, is larger than the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"the body is larger than {cap} bytes")
        self.cap = cap


class UnsupportedEncoding(BodyError):
    """A Content-Encoding this module does not decode, or a body it cannot inflate."""


class Inflater:
    """Decodes one body's Content-Encoding in bounded steps.

    Owns one zlib stream at a time (a gzip body may hold several members). `feed()` yields
    pieces of at most STEP bytes and raises UnsupportedEncoding on a corrupt body; the
    constructor raises it for a coding other than identity, gzip, x-gzip or deflate.
    """

    def __init__(self, encoding: str | None) -> None:
        coding = (encoding or "identity").strip().lower()
        if coding in ("", "identity"):
            self._mode: str | None = None
        elif coding in ("gzip", "x-gzip", "deflate"):
            self._mode = "deflate" if coding == "deflate" else "gzip"
        else:
            raise UnsupportedEncoding(f"Content-Encoding {coding[:40]!r} is not supported")
        self._inflate: Any = None
        self._done = False  # a deflate stream ended: what follows is ignored

    @property
    def compressed(self) -> bool:
        return self._mode is not None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._mode is None:
            if data:
                yield data
            return
        try:
            yield from self._inflated(data)
        except zlib.error as exc:
            raise UnsupportedEncoding(f"the {self._mode} body is corrupt: {exc}") from None

    def _inflated(self, data: bytes) -> Iterator[bytes]:
        while data and not self._done:
            if self._inflate is None:
                # deflate is zlib-wrapped by the RFC, raw from some servers: the first byte
                # tells (its low nibble is the zlib method, 8).
                wbits = 31 if self._mode == "gzip" else (15 if data[0] & 0x0F == 8 else -15)
                self._inflate = zlib.decompressobj(wbits)
            while True:
                out = self._inflate.decompress(data, STEP)
                if out:
                    yield out
                if self._inflate.eof:
                    data = self._inflate.unused_data
                    self._inflate = None  # gzip: another member may follow
                    self._done = self._mode == "deflate"
                    break
                data = self._inflate.unconsumed_tail
                if not data and len(out) < STEP:
                    return


async def iter_capped(resp: aiohttp.ClientResponse, cap: int) -> AsyncIterator[bytes]:
    """The body of `resp` as it arrives, decoded, in pieces of at most STEP bytes.

    Raises BodyTooLarge as soon as more than `cap` decoded bytes came (the rest is never
    read), UnsupportedEncoding for a coding it cannot decode, and aiohttp's errors for the
    connection. A compressed body gives the event loop a turn after every piece. `resp`
    must come from a request made with `auto_decompress=False`.
    """
    inflater = Inflater(resp.headers.get("Content-Encoding"))
    declared = resp.content_length
    if declared is not None and declared > cap and not inflater.compressed:
        raise BodyTooLarge(cap)
    total = 0
    async for piece in _pieces(resp, inflater):
        total += len(piece)
        if total > cap:
            raise BodyTooLarge(cap)
        yield piece


async def _pieces(resp: aiohttp.ClientResponse, inflater: Inflater) -> AsyncIterator[bytes]:
    async for raw in resp.content.iter_chunked(STEP):
        for piece in inflater.feed(raw):
            yield piece
            if inflater.compressed:
                # One network chunk can inflate to megabytes: let the loop run between
                # steps, so that a bomb delays nothing else (systemd's watchdog included).
                await asyncio.sleep(0)


async def read_capped(resp: aiohttp.ClientResponse, cap: int, *, truncate: bool = False) -> bytes:
    """The body of `resp`, decoded, at most `cap` bytes.

    Raises BodyTooLarge when there is more (or returns the first `cap` bytes with
    `truncate=True`, for bodies only shown to people), UnsupportedEncoding for a coding it
    cannot decode, and aiohttp's errors for the connection. `resp` must come from a request
    made with `auto_decompress=False`. Like iter_capped, it lets the loop run between the
    inflated steps of a compressed body.
    """
    if not truncate:
        return b"".join([piece async for piece in iter_capped(resp, cap)])
    out = bytearray()
    async for piece in _pieces(resp, Inflater(resp.headers.get("Content-Encoding"))):
        if len(out) + len(piece) >= cap:
            out += piece[: cap - len(out)]
            break
        out += piece
    return bytes(out)
