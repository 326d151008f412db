"""The local sink: each new snapshot written atomically to <dir>/<task-id or local>.json."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from agent_sidecar import logs
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import Metrics
from agent_sidecar.snapshot import pack

log = logs.get("sink")


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


class SinkMirror:
    """With uploads to Coder on, keeps the sink holding the newest snapshot whatever coderd
    answers: a Coder without Tasks, a rejected token or a coderd that is down must not leave
    the local copy behind (in sink-only mode the uploader writes the sink itself).

    `run()` writes after each change, at most once per `settle_s`, until cancelled;
    `write()` writes the newest state now (serve() calls it last at shutdown). Neither
    raises: a failed write is counted and kept in `sink.error` (/healthz: degraded). Like an
    upload, nothing is written before the conversation has a user message, so a fresh agent
    never replaces the history. It owns no task.
    """

    def __init__(self, conversation: Conversation, sink: Sink, settings: Settings,
                 metrics: Metrics) -> None:
        self.conversation = conversation
        self.sink = sink
        self.settings = settings
        self.metrics = metrics

    async def run(self) -> None:
        conv = self.conversation
        while True:
            version = conv.version
            await self.write()
            await conv.wait_changed(version)
            await asyncio.sleep(self.settings.settle_s)  # a burst of changes: one write

    async def write(self) -> None:
        conv = self.conversation
        if not conv.has_user:
            return
        body = pack(conv.messages(), self.settings.max_snapshot_bytes).body
        if not await self.sink.write(body):
            self.metrics.sink_errors.inc()
            log.warning("sink_write_failed", error=self.sink.error)
