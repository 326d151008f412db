"""Where the agent token comes from: the environment, or a file that can be rewritten live."""

from __future__ import annotations

import asyncio
from pathlib import Path

import watchfiles

from agent_sidecar import logs

log = logs.get("tokens")


class TokenError(Exception):
    """The token file cannot be read or is empty."""


class TokenSource:
    """Holds the current token; with a file, re-reads it on demand and when it changes.

    `changed` is set whenever the file yields a different token, so a back-off that waits
    for a new token can end at once.
    """

    def __init__(self, token: str | None, path: Path | None) -> None:
        self.path = path
        self._token = token
        self.changed = asyncio.Event()
        if path is not None:
            self._token = self._read()
        if self._token:
            logs.redactor.add(self._token)

    @property
    def token(self) -> str | None:
        return self._token

    def _read(self) -> str:
        assert self.path is not None
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TokenError(f"token file {self.path}: {exc.strerror or exc}") from None
        if not token:
            raise TokenError(f"token file {self.path}: empty")
        return token

    def reload(self) -> bool:
        """Re-read the file. True if the token changed. Keeps the old token on failure."""
        if self.path is None:
            return False
        try:
            token = self._read()
        except TokenError as exc:
            log.warning("token_reload_failed", error=str(exc))
            return False
        if token == self._token:
            return False
        logs.redactor.add(token)
        self._token = token
        self.changed.set()
        log.info("token_reloaded", path=str(self.path))
        return True

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload whenever the file (or its directory entry) changes, until cancelled."""
        if self.path is None:
            return
        # Watch the directory: writers usually replace the file by rename, and Kubernetes
        # secrets swap a symlinked directory, so the file's own inode is not stable.
        directory = self.path.parent
        async for _changes in watchfiles.awatch(
            directory, stop_event=stop, debounce=50, step=20, recursive=False
        ):
            self.reload()
