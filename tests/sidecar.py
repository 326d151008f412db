"""Run the real `agent-sidecar` process and follow its JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENT_SIDECAR_", "CODER_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(AGENT_SIDECAR_LOG_FORMAT="json", AGENT_SIDECAR_LOG_LEVEL="debug",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def refusals(stderr: str) -> list[str]:
    """Why `run` refused to start, one entry per line it wrote: the `error` of a JSON line
    (its refusals follow the log format), a plain line without its `agent-sidecar: `."""
    out = []
    for line in stderr.splitlines():
        try:
            out.append(str(json.loads(line)["error"]))
        except (ValueError, KeyError, TypeError):
            out.append(line.removeprefix("agent-sidecar: "))
    return out


class Sidecar:
    """`agent-sidecar run` as a child process; its log lines are parsed as they arrive."""

    def __init__(self, *args: str, env: dict[str, str],
                 preexec: Callable[[], None] | None = None) -> None:
        self.args = args
        self.env = env
        self.preexec = preexec
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._new_line = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Sidecar:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_sidecar", "run", *self.args, env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.preexec,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            try:
                self.lines.append(json.loads(text))
            except ValueError:
                self.lines.append({"event": "<not json>", "text": text})
            self._new_line.set()
        self._new_line.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_log(self, predicate: Callable[[dict[str, Any]], bool] | str,
                       timeout_s: float = 10.0, start: int = 0) -> dict[str, Any]:
        """The first log line from index `start` that matches; fail if the process exits."""
        if isinstance(predicate, str):
            name = predicate
            predicate = lambda line: line.get("event") == name  # noqa: E731
        seen = start
        async with asyncio.timeout(timeout_s):
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                assert self.proc is not None
                if self.proc.returncode is not None and self._reader and self._reader.done():
                    raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.raw[-5:]}")
                self._new_line.clear()
                await self._new_line.wait()

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a path on the relay socket; the JSON body (or text) with the status."""
        socket_path = self.env["AGENT_SIDECAR_SOCKET"]
        connector = aiohttp.UnixConnector(path=socket_path)
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.get(f"http://sidecar{path}") as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            if self._reader:
                await self._reader
        return code

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    def _status_kib(self, field: str) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith(field + ":"))

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        return self._status_kib("VmHWM")

    async def __aenter__(self) -> Sidecar:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)
