"""A raw HTTP/1.1 client on a Unix socket (or TCP), for what aiohttp's client will not do:
half-close, trickle headers, hang up mid-request, hold a connection idle."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def request_bytes(method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sidecar"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def send_bytes(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return request_bytes("POST", "/send", body, {"Content-Type": "application/json"})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class RawClient:
    """One Unix stream connection driven byte by byte on the running event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = b""

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        return cls(sock)

    @classmethod
    async def connect_tcp(cls, host: str, port: int) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return cls(sock)

    def quiet_and_open(self) -> bool:
        """Right now the server has neither closed the connection nor sent anything on it."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read, and no end of stream either
        except OSError:
            return False  # reset
        return False  # the end of the stream, or bytes

    async def write(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def half_close(self) -> None:
        """Shut down our write side only, as `nc -N` and `socat` do at the end of input."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    async def _fill(self) -> bool:
        chunk = await self._loop.sock_recv(self.sock, 65536)
        self._buffer += chunk
        return bool(chunk)

    async def answer(self, timeout_s: float = 10.0) -> Answer:
        """The next response: status line, headers and a Content-Length body."""
        async with asyncio.timeout(timeout_s):
            while b"\r\n\r\n" not in self._buffer:
                if not await self._fill():
                    raise ConnectionError(f"closed before an answer: {self._buffer!r}")
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(self._buffer) < length:
                if not await self._fill():
                    raise ConnectionError("closed mid-body")
            body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self, timeout_s: float = 10.0) -> bytes:
        """Until the server closes the connection; what it sent meanwhile."""
        async with asyncio.timeout(timeout_s):
            try:
                while await self._fill():
                    pass
            except ConnectionResetError:
                pass
        return self._buffer

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
