"""A failed connection or request, in words a person can act on.

aiohttp's exceptions repr as their internals (`ClientConnectorError(ConnectionKey(host=...,
ssl=True, proxy=None, ...), ConnectionRefusedError(111, ...))`); the cause a person needs is
the operating system's reason and where it happened.
"""

from __future__ import annotations

import os
import socket

import aiohttp


def describe(exc: BaseException) -> str:
    """One line for a failed connection or request: `cannot connect to HOST:PORT: REASON`,
    the OS's reason, or the exception's own message. Never a repr."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {os_reason(exc)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        return _words(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """The operating system's reason for a failed connect, e.g. `Connection refused`."""
    error = exc.os_error
    if not isinstance(error, OSError):
        return str(exc)
    return _words(error)


def _words(error: OSError) -> str:
    """The OS's words for `error`. A failed name lookup (socket.gaierror) carries a
    getaddrinfo code, negative, which os.strerror does not know ("Unknown error -2"): its
    own text is the cause. Otherwise the errno's words, since asyncio words a refused
    connect "Connect call failed (...)"."""
    if isinstance(error, socket.gaierror):
        return f"name lookup failed: {error.strerror or error}"
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or str(error)
