"""The agent token: validated and normalised once, the same way from the environment and
from a file; the file is read off the event loop and watched for rewrites."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import watchfiles

from agent_sidecar import logs
from agent_sidecar.aio import Backoff
from agent_sidecar.config import Settings, normalise_token

log = logs.get("tokens")

T = TypeVar("T")

# A read of the token file that takes longer than this (a hung network filesystem) fails;
# the thread doing it is a daemon thread, so it never holds up the process's exit.
TOKEN_READ_TIMEOUT_S = 5.0
# The watcher restarts after an error (its directory removed, say) after this back-off.
WATCH_RETRY_INITIAL_S = 1.0
WATCH_RETRY_MAX_S = 60.0


class TokenError(Exception):
    """The token cannot be used: unreadable, empty, too large, not text, or holding
    anything but printable ASCII. The message names the setting, where it came from and the
    file, never the value."""


def read_token_file(path: Path, max_bytes: int, origin: str) -> str:
    """Blocking: the normalised token in `path`. Only a regular file (a symlink to one is
    fine) of at most `max_bytes` is read, so a FIFO or a device never blocks and a huge
    file is never loaded. Raises TokenError."""
    where = f"coder_token_file {path} ({origin})"
    try:
        # O_NONBLOCK: opening a FIFO with no writer would block forever without it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"{where}: not a regular file ({_kind(info.st_mode)}); "
                             "expected a file holding the agent token")
        if info.st_size > max_bytes:
            raise TokenError(f"{where}: {info.st_size} bytes, over max_token_file_bytes="
                             f"{max_bytes}; expected a file holding the agent token")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:  # the file may grow while it is read
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise TokenError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise TokenError(f"{where}: over max_token_file_bytes={max_bytes}; expected a file "
                         "holding the agent token")
    try:
        text = b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TokenError(f"{where}: not UTF-8 text; expected the agent token "
                         "(printable ASCII, like a UUID)") from None
    try:
        return normalise_token(text)
    except ValueError as exc:
        raise TokenError(f"{where}: {exc}") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


async def off_loop(work: Callable[[], T], timeout_s: float, name: str) -> T:
    """Run blocking `work` on a daemon thread, bounded by `timeout_s` (TimeoutError).

    Not the default executor: a read stuck in the kernel would keep asyncio.run() from
    returning, since it waits for the executor's threads at exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result: tuple[bool, object] = (True, work())
        except Exception as exc:
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, *result)

    threading.Thread(target=run, name=name, daemon=True).start()
    async with asyncio.timeout(timeout_s):
        return await future


class TokenSource:
    """Holds the current agent token, from `settings.coder_token` or `coder_token_file`.

    With a file, `load()` reads it once at start (raises TokenError), `reload()` re-reads
    it on demand and keeps the old token on failure, and `watch()` reloads when the file or
    its directory changes, until cancelled; neither of those raises. Every read is off the
    event loop. `changed` is set whenever a different token is read, so a back-off waiting
    for a new token ends at once. It owns no task; `watch()` is run by the daemon.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.coder_token_file
        secret = settings.coder_token
        # The environment's token is normalised by Settings; the file wins over it.
        self._token = secret.get_secret_value() if secret and self.path is None else None
        self.changed = asyncio.Event()
        if self._token:
            logs.redactor.add(self._token)

    @property
    def token(self) -> str | None:
        return self._token

    async def _read(self) -> str:
        assert self.path is not None
        path, cap = self.path, self.settings.max_token_file_bytes
        origin = f"from {self.settings.origin('coder_token_file')}"
        try:
            return await off_loop(lambda: read_token_file(path, cap, origin),
                                  TOKEN_READ_TIMEOUT_S, "agent-sidecar-token-read")
        except TimeoutError:
            raise TokenError(f"coder_token_file {path} ({origin}): no answer from the "
                             f"filesystem in {TOKEN_READ_TIMEOUT_S:g}s") from None

    async def load(self) -> None:
        """Read the token file, if there is one. Raises TokenError."""
        if self.path is None:
            return
        token = await self._read()
        logs.redactor.add(token)
        self._token = token

    async def reload(self) -> bool:
        """Re-read the file. True if the token changed. Keeps the old token on failure."""
        if self.path is None:
            return False
        try:
            token = await self._read()
        except TokenError as exc:
            log.warning("token_reload_failed", error=str(exc), kept="the previous token")
            return False
        if token == self._token:
            return False
        logs.redactor.add(token)
        self._token = token
        self.changed.set()
        log.info("token_reloaded", path=str(self.path))
        return True

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload whenever the file (or its directory entry) changes, until cancelled or
        `stop` is set. When the watch fails (its directory removed, or missing at start),
        that is logged and the watch restarts after a back-off, re-reading the file: it
        never ends the watch."""
        if self.path is None:
            return
        # Watch the directory: writers usually replace the file by rename, and Kubernetes
        # secrets swap a symlinked directory, so the file's own inode is not stable.
        directory = self.path.parent
        backoff = Backoff()
        while stop is None or not stop.is_set():
            try:
                await self._watch_until_gone(directory, stop, backoff)
                if stop is None or not stop.is_set():
                    raise FileNotFoundError(f"{directory} was removed")
            except Exception as exc:
                delay = backoff.next_delay(WATCH_RETRY_INITIAL_S, WATCH_RETRY_MAX_S)
                log.warning("token_watch_failed", error=f"{type(exc).__name__}: {exc}",
                            directory=str(directory), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                await self.reload()  # whatever changed while nobody watched

    async def _watch_until_gone(self, directory: Path, stop: asyncio.Event | None,
                                backoff: Backoff) -> None:
        """Reload on each change until `stop`, or until `directory` itself is deleted:
        the watch then hears nothing more, even when it is created again."""
        async for changes in watchfiles.awatch(
            directory, stop_event=stop, debounce=50, step=20, recursive=False
        ):
            backoff.reset()
            await self.reload()
            if any(kind is watchfiles.Change.deleted and Path(name) == directory
                   for kind, name in changes):
                return
