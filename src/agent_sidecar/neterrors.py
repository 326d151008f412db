"""A failed connection or request, in words a person can act on.

aiohttp's exceptions repr as their internals (`ClientConnectorError(ConnectionKey(host=...,
ssl=True, proxy=None, ...), ConnectionRefusedError(111, ...))`); the cause a person needs is
the operating system's reason and where it happened.
"""

from __future__ import annotations

import os

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
        return os.strerror(exc.errno) if exc.errno else str(exc.strerror)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """The operating system's reason for a failed connect, e.g. `Connection refused`."""
    error = exc.os_error
    if not isinstance(error, OSError):
        return str(exc)
    # asyncio words a refused connect "Connect call failed (...)": the errno says it plainly.
    return os.strerror(error.errno) if error.errno else (error.strerror or str(error))
