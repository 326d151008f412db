"""The local sink: each new snapshot written atomically to <dir>/<task-id or local>.json."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path


class Sink:
    """Writes each new snapshot to `<directory>/<name>` atomically (temp file, fsync,
    rename). `write()` never raises: a failure is kept in `error` and returned as False."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self._last: bytes | None = None
        self.error: str | None = None  # the last write failure, cleared by a success

    async def write(self, body: bytes) -> bool:
        """Write `body` unless it is what the file already holds. False on failure."""
        if body == self._last:
            return True
        try:
            # fsync can take a while on a busy disk; keep it off the event loop.
            await asyncio.to_thread(_write_atomic, self.path, body)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            return False
        self._last = body
        self.error = None
        return True


def _write_atomic(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
