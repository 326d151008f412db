"""The relay's client: HTTP/1.1 over the Unix socket, on the standard library alone.

`check`, `status` and `send` run on this, and `check` runs every 30 s in every workspace as
a health probe. So it imports neither asyncio nor aiohttp: it is `http.client` with a
connection that dials the Unix socket. That keeps a probe near the cost of the standard
library's own import floor (BENCHMARKS.md, "Client cost") while the HTTP parsing stays the
standard library's, not ours.

Before anything is sent, the server's uid (SO_PEERCRED) must be ours or root's: a socket
in a shared directory could be served by another local user, who would then read the input
or fake the answers.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above any answer of the relay; a bound, not a limit


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


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client's connection, dialling a Unix socket and checking who serves it."""

    def __init__(self, path: str, timeout_s: float | None) -> None:
        super().__init__("agent-sidecar", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            _check_peer(sock, self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _check_peer(sock: socket.socket, path: str) -> None:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    ours = os.getuid()
    if uid not in (0, ours):
        raise ForeignServer(
            f"the socket {path} is served by uid {uid}, not by us (uid {ours}) or root, so "
            "nothing was sent: another user may be posing as the sidecar; check --socket or "
            "AGENT_SIDECAR_SOCKET")


class Connection:
    """One connection to the relay, checked to be served by us or root, for one request,
    all within `timeout_s` (None: no bound)."""

    def __init__(self, path: str, timeout_s: float | None) -> None:
        self.path = path
        if timeout_s is not None and timeout_s <= 0:
            raise Unreachable(f"no time was left to reach the sidecar at {path}")
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._http = _UnixHTTPConnection(path, timeout_s)
        try:
            self._http.connect()
        except TimeoutError:
            raise Unreachable(f"the sidecar at {path} did not answer in "
                              f"{timeout_s:.3g}s") from None
        except ForeignServer:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise Unreachable(f"cannot reach the sidecar at {path}: {reason}; "
                              f"{_hint(exc)}") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bound(self) -> None:
        """Give the next socket operation what is left of the deadline."""
        if self._deadline is None or self._http.sock is None:
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self._http.sock.settimeout(left)

    def send(self, method: str, target: str, body: object = None) -> None:
        """Write the whole request. Failing here, the relay cannot have acted on it."""
        headers = {"Accept": "application/json", "User-Agent": "agent-sidecar-cli",
                   "Connection": "close"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self._bound()
            self._http.request(method, target, body=payload, headers=headers)
        except TimeoutError:
            raise Unreachable(f"the sidecar at {self.path} did not take the request in "
                              f"{self._timeout_s:.3g}s") from None
        except OSError as exc:
            raise Unreachable(f"the sidecar at {self.path} closed the connection: "
                              f"{exc.strerror or exc}") from None

    def receive(self) -> Response:
        """Read the answer. Failing here, the request was sent: its outcome is unknown."""
        try:
            self._bound()
            answer = self._http.getresponse()
            self._bound()
            body = answer.read(MAX_BODY_BYTES + 1)
        except TimeoutError:
            raise NoAnswer(f"the sidecar at {self.path} did not answer in "
                           f"{self._timeout_s:.3g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise NoAnswer(f"the sidecar at {self.path} broke off its answer: {why}") from None
        if len(body) > MAX_BODY_BYTES:
            raise NoAnswer(f"the sidecar at {self.path} answered more than "
                           f"{MAX_BODY_BYTES} bytes")
        headers = {name.lower(): value for name, value in answer.getheaders()}
        return Response(answer.status, headers, body)


def call(path: str, method: str, target: str, body: object = None,
         timeout_s: float | None = 10.0) -> Response:
    """One request and its answer, within `timeout_s` in all."""
    with Connection(path, timeout_s) as conn:
        conn.send(method, target, body)
        return conn.receive()
