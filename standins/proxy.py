"""A forward HTTP proxy stand-in: absolute-form requests in, origin-form requests out.

What a corporate proxy does for plain http (RFC 9112 §3.2.2): the client sends
`POST http://coderd.corp:8080/api/v2/... HTTP/1.1` to the proxy, and the proxy connects to
the origin itself, resolving the name on its side. Names are resolved through `hosts`
only, so a test can give coderd a name the workspace cannot resolve: a request that
arrives at all proves it went through the proxy. CONNECT (for https) is answered 501.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass

from yarl import URL

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization",
                         "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})


@dataclass
class Proxied:
    """One request the proxy received."""

    method: str
    target: str  # the request-target as sent: absolute-form for a proxy
    headers: dict[str, str]
    status: int  # what the proxy answered


class ForwardProxy:
    """A forward proxy on loopback; `hosts` maps "name:port" to the (host, port) to dial.
    With `credentials` set, a request without that Basic Proxy-Authorization gets 407.
    Start it with `async with`."""

    def __init__(self, hosts: dict[str, tuple[str, int]] | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.hosts = dict(hosts or {})
        self.credentials = credentials
        self.requests: list[Proxied] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        method, target, _version = line.split(" ", 2)
        headers: dict[str, str] = {}
        while (raw := (await reader.readline()).decode("latin-1").rstrip("\r\n")):
            name, _, value = raw.partition(":")
            headers[name.strip()] = value.strip()
        lower = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(lower.get("content-length", "0")))
        record = Proxied(method, target, headers, 0)
        self.requests.append(record)
        if method == "CONNECT":
            record.status = 501
            writer.write(_answer(501, "Not Implemented", b"CONNECT is not supported here\n"))
            return
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if lower.get("proxy-authorization") != expected:
                record.status = 407
                writer.write(_answer(407, "Proxy Authentication Required", b"",
                                     'Proxy-Authenticate: Basic realm="proxy"\r\n'))
                return
        url = URL(target)
        origin = self.hosts.get(f"{url.host}:{url.port}")
        if not url.is_absolute() or origin is None:
            record.status = 502
            writer.write(_answer(502, "Bad Gateway", b"<html><body><h1>502 Bad Gateway</h1>"
                                 b"<p>unknown host</p></body></html>\n", "", "text/html"))
            return
        up_reader, up_writer = await asyncio.open_connection(*origin)
        try:
            out = [f"{method} {url.raw_path_qs} HTTP/1.1"]
            out += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]
            out.append("Connection: close")
            up_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            await up_writer.drain()
            response = await up_reader.read()  # Connection: close: the answer ends at EOF
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError):
                await up_writer.wait_closed()
        status_line = response.split(b"\r\n", 1)[0].split(b" ")
        record.status = int(status_line[1]) if len(status_line) > 1 else 0
        writer.write(response)
        await writer.drain()


def _answer(status: int, reason: str, body: bytes, extra: str = "",
            content_type: str = "text/plain") -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + body
