"""Coder's error shape, `{"message": ..., "detail": ...}`, in which the relay gives every
answer that is not a success: as an aiohttp response, and as the raw bytes written on a
connection that has no request to answer (too many connections, headers too slow).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web


def error(status: int, message: str, detail: str = "") -> web.Response:
    """Coder's error shape."""
    body = {"message": message, "detail": detail}
    return web.json_response(body, status=status)


def raw_error(status: int, message: str, detail: str) -> bytes:
    """Coder's error shape as a whole HTTP/1.1 answer that closes the connection."""
    body = json.dumps({"message": message, "detail": detail}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
