"""serve(settings): wiring, startup order, reload and the graceful shutdown.

Startup: relay socket, then the follower, the uploader and the helpers, each a task owned
by one TaskGroup. Shutdown runs in reverse under one deadline: stop taking sends, stop
following, the final upload from memory, then cancel whatever is left.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from agent_sidecar import __version__, logs
from agent_sidecar.agentapi import AgentAPI
from agent_sidecar.coder import CoderClient
from agent_sidecar.config import RESTART_REQUIRED, Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import CONTENT_TYPE, Metrics
from agent_sidecar.relay import Health, Relay, RelayError
from agent_sidecar.sdnotify import Notifier
from agent_sidecar.sink import Sink
from agent_sidecar.snapshot import Packed
from agent_sidecar.tokens import TokenError, TokenSource
from agent_sidecar.uploader import Policy, Uploader

log = logs.get("daemon")

# A snapshot never holds more than this many characters of history (bytes >= characters).
RETAIN_CHARS = 65536


class StartupError(Exception):
    """The daemon cannot start with this configuration or environment (exit code 2)."""


@dataclass
class Controls:
    """What the outside world (signal handlers, tests, the demo) may ask of a running daemon."""

    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def policy_of(settings: Settings) -> Policy:
    return Policy(
        max_snapshot_bytes=settings.max_snapshot_bytes,
        settle_s=settings.settle_s,
        max_staleness_s=settings.max_staleness_s,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        rejected_backoff_s=settings.rejected_backoff_s,
    )


class Daemon:
    def __init__(
        self,
        settings: Settings,
        controls: Controls,
        *,
        reload_settings: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        on_snapshot: Callable[[Packed, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.controls = controls
        self._reload_settings = reload_settings
        self.notifier = notifier or Notifier({})
        self._on_snapshot = on_snapshot
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.conversation = Conversation(RETAIN_CHARS)
        self.metrics.sse_connected.set_function(lambda: float(self.conversation.connected))
        self.failed = False
        reason = settings.uploads_disabled_reason
        self.tokens: TokenSource | None = None
        if reason is None:
            try:
                token = settings.coder_token.get_secret_value() if settings.coder_token else None
                self.tokens = TokenSource(token, settings.coder_token_file)
            except TokenError as exc:
                raise StartupError(str(exc)) from None
        self.disabled_reason = reason
        self.sink = Sink(settings.sink_dir, settings.sink_name) if settings.sink_dir else None

    # -- status for the relay ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        up = self.uploader
        last = (datetime.fromtimestamp(up.last_success_unix, UTC).isoformat()
                if up.last_success_unix else None)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "shutting_down": self.controls.shutdown.is_set(),
            "agentapi": {
                "url": self.settings.agentapi_url,
                "connected": self.conversation.connected,
                "mode": self.agentapi.state.mode,
                "agent_status": self.conversation.status,
                "messages": self.conversation.count,
                "reconnects": self.agentapi.state.reconnects,
                "last_error": self.agentapi.state.last_error,
            },
            "uploads": {
                "enabled": up.enabled,
                "disabled_reason": self.disabled_reason,
                "state": up.state,
                "last_success_at": last,
                "last_outcome": up.last_outcome,
                "consecutive_failures": up.consecutive_failures,
                "attempts": up.attempts,
                "cap_bytes": up.cap,
            },
            "sink": {
                "path": str(self.sink.path) if self.sink else None,
                "error": self.sink.error if self.sink else None,
            },
            "relay": {"socket": str(self.settings.socket)},
        }

    def health(self) -> Health:
        health = Health()
        if not self.conversation.connected:
            why = self.agentapi.state.last_error or "starting"
            health.critical.append(f"agentapi: not connected ({why})")
        if failing := self.uploader.failing:
            health.critical.append(failing)
        if self.sink and self.sink.error:
            # The sink mirrors snapshots for people; its failure must not get us restarted.
            health.degraded.append(f"sink: {self.sink.error}")
        return health

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        # Two sessions: agentapi's long-lived stream must never hold up an upload.
        async with aiohttp.ClientSession(timeout=timeout) as agent_http, \
                aiohttp.ClientSession(timeout=timeout) as coder_http:
            self.agentapi = AgentAPI(agent_http, s.agentapi_url, max_event_bytes=s.max_event_bytes,
                                     on_event=self.metrics.on_follow_event)
            client = None
            if self.tokens is not None:
                assert s.coder_url is not None
                assert s.task_id is not None
                client = CoderClient(coder_http, s.coder_url, s.task_id, self.tokens,
                                     s.upload_timeout_s)
            self.uploader = Uploader(
                self.conversation, policy_of(s), client, self.sink, self.metrics,
                disabled_reason=self.disabled_reason, on_packed=self._on_snapshot,
            )
            self.relay = Relay(self.agentapi, self.conversation, self.metrics,
                               send_wait_s=s.send_wait_s, status=self.status, health=self.health)
            try:
                await self.relay.start(s.socket)
            except (RelayError, OSError) as exc:
                raise StartupError(str(exc)) from None
            try:
                return await self._supervise()
            finally:
                await self.relay.stop(timeout_s=0.5)

    async def _supervise(self) -> int:
        s = self.settings
        if self.disabled_reason:
            # With a sink this is the deliberate local mode; without one, likely a mistake.
            say = log.info if self.sink else log.warning
            say("uploads_disabled", reason=self.disabled_reason,
                sink=str(self.sink.path) if self.sink else None)
        elif self.uploader.client is not None:
            log.info("uploads_enabled", url=str(self.uploader.client.url))
        metrics_runner = await self._start_metrics_tcp() if s.metrics_addr else None
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(self._guarded("follower", self.agentapi.follow(
                self.conversation, reconnect_initial_s=s.reconnect_initial_s,
                reconnect_max_s=s.reconnect_max_s, poll_interval_s=s.poll_interval_s,
            )))
            uploader = tg.create_task(self._guarded("uploader", self.uploader.run()))
            helpers = [
                tg.create_task(self._guarded("readiness", self._announce_ready())),
                tg.create_task(self._guarded("watchdog", self.notifier.watchdog())),
                tg.create_task(self._guarded("reloader", self._reloader())),
            ]
            if self.tokens is not None:
                helpers.append(tg.create_task(self._guarded("token_watch", self.tokens.watch())))
            await self.controls.shutdown.wait()
            await self._shutdown(follower, uploader, helpers)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        return 1 if self.failed else 0

    async def _shutdown(self, follower: asyncio.Task[None], uploader: asyncio.Task[None],
                        helpers: list[asyncio.Task[None]]) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_s
        log.info("shutting_down", timeout_s=self.settings.shutdown_timeout_s)
        self.notifier.stopping()
        self.relay.close()  # 1. no new sends
        follower.cancel("shutdown: stop following")  # 2. the model is final now
        uploader.cancel("shutdown: final flush takes over")
        loop = asyncio.get_running_loop()
        _, stuck = await asyncio.wait([follower, uploader], timeout=deadline - loop.time())
        if stuck:
            log.error("shutdown_component_stuck", count=len(stuck))
        try:
            await self._final_flush(deadline)  # 3. from memory, whatever agentapi's state
        finally:
            for task in helpers:  # 4. the rest
                task.cancel("shutdown")

    async def _final_flush(self, deadline: float) -> None:
        """The last upload, shielded: a cancel from outside (an application embedding serve()
        shutting down) waits for it; only the deadline cuts it short."""
        loop = asyncio.get_running_loop()
        flush = loop.create_task(self.uploader.flush(), name="agent-sidecar-final-flush")
        cancelled = False
        while not flush.done() and loop.time() < deadline:
            try:
                await asyncio.wait([flush], timeout=deadline - loop.time())
            except asyncio.CancelledError:
                cancelled = True  # noted; re-raised once the flush is over
        if flush.done():
            log.info("final_flush_done", delivered=flush.result(), state=self.uploader.state)
        else:
            flush.cancel("shutdown deadline")
            await asyncio.wait([flush])
            log.error("final_flush_timed_out", timeout_s=self.settings.shutdown_timeout_s,
                      last_outcome=self.uploader.last_outcome)
        if cancelled:
            raise asyncio.CancelledError

    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        """Run a component; a crash starts an orderly shutdown instead of tearing down the group."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("component_crashed", component=name)
            self.failed = True
            self.controls.shutdown.set()

    async def _announce_ready(self) -> None:
        while not self.conversation.connected:
            await self.conversation.wait_changed(self.conversation.version)
        self.controls.ready.set()
        self.notifier.ready(self._status_line())
        log.info("ready", socket=str(self.settings.socket))
        while True:  # keep systemctl status readable
            await self.conversation.wait_changed(self.conversation.version)
            self.notifier.status(self._status_line())
            await asyncio.sleep(1)  # at most one STATUS= a second

    def _status_line(self) -> str:
        up = self.uploader
        following = "following agentapi" if self.conversation.connected else "agentapi unreachable"
        uploads = f"uploads {up.state}" if up.enabled else "uploads off"
        return (f"{following}, {self.conversation.count} messages, "
                f"agent {self.conversation.status or 'unknown'}, {uploads}")

    async def _reloader(self) -> None:
        while True:
            await self.controls.reload.wait()
            self.controls.reload.clear()
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration (SIGHUP); apply what can change live, report the rest."""
        if self.tokens is not None:
            self.tokens.reload()
        if self._reload_settings is None:
            return
        try:
            new = self._reload_settings()
        except Exception as exc:
            log.error("reload_failed", error=str(exc), kept="previous settings")
            return
        old = self.settings
        changed = [n for n in Settings.model_fields if getattr(new, n) != getattr(old, n)]
        need_restart = sorted(n for n in changed if n in RESTART_REQUIRED or n.startswith("coder_"))
        live = sorted(n for n in changed if n not in need_restart)
        self.uploader.policy = policy_of(new)
        if "max_snapshot_bytes" in live:
            self.uploader.cap = new.max_snapshot_bytes
        self.relay.send_wait_s = new.send_wait_s
        if "log_level" in live:
            logs.configure(new.log_level, old.log_format)
        self.settings = new.model_copy(update={n: getattr(old, n) for n in need_restart})
        log.info("config_reloaded", applied=live, need_restart=need_restart)

    async def _start_metrics_tcp(self) -> web.AppRunner:
        assert self.settings.metrics_addr is not None
        host, _, port = self.settings.metrics_addr.rpartition(":")

        async def metrics(_: web.Request) -> web.Response:
            resp = web.Response(body=self.metrics.render())
            resp.headers["Content-Type"] = CONTENT_TYPE
            return resp

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"cannot serve metrics on {self.settings.metrics_addr}: "
                               f"{exc.strerror}") from None
        log.info("metrics_listening", addr=self.settings.metrics_addr)
        return runner


async def serve(
    settings: Settings,
    controls: Controls | None = None,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
    on_snapshot: Callable[[Packed, str], None] | None = None,
) -> int:
    """Run the sidecar until controls.shutdown is set. Returns the exit code (0 or 1).

    Raises StartupError when it cannot start. Embeddable: it installs no signal handlers.
    """
    daemon = Daemon(settings, controls or Controls(), reload_settings=reload_settings,
                    notifier=notifier, on_snapshot=on_snapshot)
    return await daemon.run()

