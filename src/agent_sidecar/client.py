"""The relay's client: HTTP/1.1 over the Unix socket, on the standard library alone.

`check`, `status` and `send` run on this, and `check` runs every 30 s in every workspace
as a health probe. So it imports neither asyncio nor aiohttp, and not even http.client,
whose email parser and ssl cost more than everything else such a probe does. It speaks
exactly what the relay answers: one request per connection (`Connection: close`), a body
framed by Content-Length, chunks, or the end of the connection.

Before anything is sent, the server's uid (SO_PEERCRED) must be ours or root's: a socket
in a shared directory could be served by another local user, who would then read the input
or fake the answers.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """The exchange failed; the message is one line, fit for a person."""


class Unreachable(ClientError):
    """Nothing was sent: no socket there, nobody listening, no permission, or no answer to
    the connection in time."""


class ForeignServer(Unreachable):
    """The socket is served by another user; nothing was sent to it."""


class NoAnswer(ClientError):
    """The request was sent but no complete answer came: its outcome is unknown."""


class Response:
    """A status, lower-cased headers and the body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body as JSON; a body that is not JSON comes back as {"message": text}."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return {"message": self.body.decode("utf-8", "replace").strip()}


def _hint(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return ("the socket or a directory above it is not ours to open; run as the "
                "daemon's user or root, or see --socket")
    return "is `agent-sidecar run` running (see --socket)?"


class Connection:
    """One connection to the relay, checked to be served by us or root, for one request."""

    def __init__(self, path: str, timeout_s: float | None) -> None:
        self.path = path
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._remaining())
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise Unreachable(f"the sidecar at {path} did not answer in "
                              f"{timeout_s:.3g}s") from None
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise Unreachable(f"cannot reach the sidecar at {path}: {reason}; "
                              f"{_hint(exc)}") from None
        self._sock = sock
        try:
            self._check_peer()
        except BaseException:
            sock.close()
            raise
        self._file = sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _check_peer(self) -> None:
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        ours = os.getuid()
        if uid not in (0, ours):
            raise ForeignServer(
                f"the socket {self.path} is served by uid {uid}, not by us (uid {ours}) or "
                "root, so nothing was sent: another user may be posing as the sidecar; "
                "check --socket or AGENT_SIDECAR_SOCKET")

    def send(self, method: str, target: str, body: object = None) -> None:
        """Write the whole request. Failing here, the relay cannot have acted on it."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {target} HTTP/1.1\r\nHost: agent-sidecar\r\n"
                "User-Agent: agent-sidecar-cli\r\nAccept: application/json\r\n"
                "Connection: close\r\n")
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        try:
            self._sock.settimeout(self._remaining())
            self._sock.sendall(head.encode("ascii") + b"\r\n" + payload)
        except TimeoutError:
            raise Unreachable(f"the sidecar at {self.path} did not take the request in "
                              f"{self._timeout_s:.3g}s") from None
        except OSError as exc:
            raise Unreachable(f"the sidecar at {self.path} closed the connection: "
                              f"{exc.strerror or exc}") from None

    def receive(self) -> Response:
        """Read the answer. Failing here, the request was sent: its outcome is unknown."""
        try:
            return self._receive()
        except TimeoutError:
            raise NoAnswer(f"the sidecar at {self.path} did not answer in "
                           f"{self._timeout_s:.3g}s") from None
        except (OSError, ValueError) as exc:
            raise NoAnswer(f"the sidecar at {self.path} broke off its answer: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None

    def _line(self) -> bytes:
        self._sock.settimeout(self._remaining())
        line = self._file.readline(MAX_HEAD_BYTES + 1)
        if not line.endswith(b"\n"):
            raise ValueError("the connection closed mid-line" if len(line) <= MAX_HEAD_BYTES
                             else "a header line is too long")
        return line.rstrip(b"\r\n")

    def _exactly(self, size: int) -> bytes:
        chunks = []
        while size > 0:
            self._sock.settimeout(self._remaining())
            chunk = self._file.read1(min(size, 1 << 16))
            if not chunk:
                raise ValueError("the connection closed before the body ended")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _receive(self) -> Response:
        version, _, rest = self._line().partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise ValueError("the answer is not HTTP/1.x")
        headers: dict[str, str] = {}
        size = 0
        while line := self._line():
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise ValueError("the answer's headers are too long")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        if status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return Response(status, headers, self._chunked())
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise ValueError(f"unusable Content-Length {length!r}")
            return Response(status, headers, self._exactly(int(length)))
        return Response(status, headers, self._until_closed())

    def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            size = int(size_text, 16)
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise ValueError("the answer is too large")
            body += self._exactly(size)
            if self._line():
                raise ValueError("a chunk does not end where its size says")

    def _until_closed(self) -> bytes:
        body = bytearray()
        while True:
            self._sock.settimeout(self._remaining())
            chunk = self._file.read1(1 << 16)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ValueError("the answer is too large")


def call(path: str, method: str, target: str, body: object = None,
         timeout_s: float | None = 10.0) -> Response:
    """One request and its answer, within `timeout_s` in all."""
    with Connection(path, timeout_s) as conn:
        conn.send(method, target, body)
        return conn.receive()
