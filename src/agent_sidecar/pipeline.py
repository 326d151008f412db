"""The pipeline: every component of the sidecar, built once from Settings.

    agentapi /events -> follower -> conversation -> uploader -> Coder client -> coderd
                                       ^                  \\-> sink
    relay socket /send -> relay -------/-> agentapi POST /message

`Pipeline` builds the components and holds them; it runs nothing. `daemon.serve()` runs
them, `snapshot --upload` uses the uploader once, and the demo, the benchmarks and the
tests build it the same way. It also owns what reads across components: `status()`,
`health()`, the systemd status line, and `reload()`, with the explicit set of settings that
can change while it runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from agent_sidecar import __version__, logs
from agent_sidecar.agentapi import AgentAPI
from agent_sidecar.coder import CoderClient
from agent_sidecar.config import Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.metrics import Metrics
from agent_sidecar.proxy import Proxies, ProxyError
from agent_sidecar.redact import redact_url
from agent_sidecar.relay import Health, Relay, RelayError
from agent_sidecar.sink import Sink, SinkMirror
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, Packed
from agent_sidecar.tokens import TokenError, TokenSource
from agent_sidecar.unix_socket import check_socket_path
from agent_sidecar.uploader import Uploader

log = logs.get("pipeline")

# Settings that take effect while running: every component reads them at each use.
LIVE_SETTINGS = frozenset({
    "max_snapshot_bytes", "settle_s", "max_staleness_s", "shutdown_timeout_s",
    "upload_timeout_s", "retry_initial_s", "retry_max_s", "rejected_backoff_s",
    "reconnect_initial_s", "reconnect_max_s", "poll_interval_s", "max_event_bytes",
    "max_agentapi_response_bytes", "agentapi_timeout_s", "send_wait_s", "send_timeout_s",
    "acp_turn_timeout_s", "relay_max_connections", "relay_header_timeout_s",
    "relay_body_timeout_s", "relay_idle_timeout_s", "metrics_max_connections",
    "unhealthy_after_s", "reupload_settle_s", "reupload_min_interval_s",
    "max_coderd_response_bytes", "max_token_file_bytes",
})
# Settings of the process, not of the pipeline: the program that owns logging applies them
# (main() sets log_level on SIGHUP); serve() never reconfigures process-wide logging. The
# log format is fixed at start: changing it needs a restart.
PROCESS_SETTINGS = frozenset({"log_level"})


class StartupError(Exception):
    """The sidecar cannot start with this configuration or environment (exit code 2)."""


@dataclass(frozen=True)
class Reloaded:
    """What a reload did with each changed setting."""

    applied: list[str]  # in effect now
    need_restart: list[str]  # kept at their old values until a restart
    for_process: list[str]  # left to the program that owns the process (logging)


class Pipeline:
    """Every component, built once from `settings`; see the module docstring.

    Construct it inside a running event loop (it opens two aiohttp sessions) and enter it
    with `async with` (which reads the token file, off the event loop) or close it with
    `aclose()`. Raises StartupError when the proxy for coderd cannot be used (at
    construction) or the token file cannot be used (on entering). It starts no task and
    binds no socket: `serve()` does both. `on_snapshot(packed, how)` is called after each
    snapshot coderd (or, without Coder, the sink) accepted.
    """

    def __init__(self, settings: Settings, *,
                 on_snapshot: Callable[[Packed, str], None] | None = None) -> None:
        self.settings = settings
        self.started = time.monotonic()
        # The relay's answers and the logs mask the configured URLs' passwords, also when
        # serve() is embedded without main()'s logging set-up (the token is registered by
        # the TokenSource, as it reads each one).
        for url in (settings.coder_url, settings.agentapi_url):
            logs.redactor.add_url(url)
        self.metrics = Metrics()
        # A snapshot never holds more characters than coderd's byte limit.
        self.conversation = Conversation(CODERD_MAX_BODY_BYTES)
        self.metrics.sse_connected.set_function(lambda: float(self.conversation.connected))
        self.tokens = TokenSource(settings) if settings.uploads_disabled_reason is None else None
        self.proxies = coder_proxies(settings, os.environ)
        self.sink = Sink(settings.sink_dir, settings.sink_name) if settings.sink_dir else None
        # Two sessions: agentapi's long-lived stream must never hold up an upload.
        self.agent_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.agentapi_timeout_s))
        self.coder_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.upload_timeout_s))
        # agentapi is local: its session never uses a proxy (trust_env stays off).
        self.agentapi = AgentAPI(self.agent_http, settings,
                                 on_event=self.metrics.on_follow_event)
        self.coder = (CoderClient(self.coder_http, settings, self.tokens, proxies=self.proxies)
                      if self.tokens is not None else None)
        # With Coder, the sink holds the newest snapshot whatever coderd answers (without
        # Coder, the sink is the uploader's destination).
        self.mirror = (SinkMirror(self.conversation, self.sink, settings, self.metrics)
                       if self.sink is not None and self.coder is not None else None)
        self.uploader = Uploader(self.conversation, settings, self.coder,
                                 self.sink if self.coder is None else None,
                                 self.metrics, agentapi_gone=self.agentapi.state.gone,
                                 on_packed=on_snapshot)
        # What serve() runs, by name, so that /livez can tell a task that stopped.
        self.running: dict[str, asyncio.Task[None]] = {}
        self.relay = Relay(self.agentapi, self.conversation, self.metrics, settings,
                           status=self.status, health=self.health, live=self.stopped)

    async def aclose(self) -> None:
        await self.agent_http.close()
        await self.coder_http.close()

    async def __aenter__(self) -> Pipeline:
        if self.tokens is not None:
            try:
                await self.tokens.load()
            except TokenError as exc:
                await self.aclose()
                raise StartupError(str(exc)) from None
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- what the relay serves -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """GET /status: what every component is doing. Never holds the token; peers' texts
        in it (errors, outcomes) are scrubbed by the relay as it answers."""
        up = self.uploader
        last = (datetime.fromtimestamp(up.last_success_unix, UTC).isoformat()
                if up.last_success_unix else None)
        follow = self.agentapi.state
        age = up.oldest_unstored_age_s
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "shutting_down": self.relay.closing,
            "agentapi": {
                "url": redact_url(self.settings.agentapi_url),
                "connected": self.conversation.connected,
                "mode": follow.mode,
                "agent_status": self.conversation.status,
                "messages": self.conversation.count,
                "reconnects": follow.reconnects,
                "last_error": follow.last_error,
                "transport": follow.transport,
                "agent_type": follow.agent_type,
            },
            "uploads": {
                "enabled": up.client is not None,
                "disabled_reason": self.settings.uploads_disabled_reason,
                "state": up.state,
                "last_success_at": last,
                "last_outcome": up.last_outcome,
                "consecutive_failures": up.consecutive_failures,
                "attempts": up.attempts,
                "reuploads": up.reuploads,
                "cap_bytes": up.cap,
                "oldest_unstored_age_s": None if age is None else round(age, 3),
            },
            "coderd": {
                "version": self.coder.coderd_version if self.coder else None,
            },
            "sink": {
                "path": str(self.sink.path) if self.sink else None,
                "error": self.sink.error if self.sink else None,
            },
            "relay": {
                "socket": str(self.settings.socket),
                # send_wait_s, send_timeout_s (acp_turn_timeout_s under ACP), answer_margin_s,
                # queue_length, connections, max_connections
                **self.relay.status_fields(),
            },
        }

    def health(self) -> Health:
        """GET /healthz: critical reasons make it 503; degraded ones are reported with 200."""
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

    def stopped(self) -> list[str]:
        """GET /livez: the tasks that never end on their own but have ended (the follower
        and the uploader are supervised, so this means the supervision itself is gone)."""
        if self.relay.closing:
            return []
        return [f"{name}: stopped" for name, task in self.running.items() if task.done()]

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        conv, up = self.conversation, self.uploader
        if not conv.connected and conv.status is None:
            return f"waiting for agentapi at {redact_url(self.settings.agentapi_url)}"
        following = "following agentapi" if conv.connected else "agentapi unreachable"
        uploads = f"uploads {up.state}" if up.client is not None else "uploads off"
        return (f"{following}, {conv.count} messages, "
                f"agent {conv.status or 'unknown'}, {uploads}")

    # -- reload ----------------------------------------------------------------------------

    def reload(self, new: Settings) -> Reloaded:
        """Apply the live settings of `new` to every component; keep the others as they are.

        Logs and returns what was done with each change. The token file is re-read by
        `tokens.reload()`, which the daemon awaits before this.
        """
        old = self.settings
        changed = [n for n in Settings.model_fields if getattr(new, n) != getattr(old, n)]
        applied = sorted(n for n in changed if n in LIVE_SETTINGS)
        for_process = sorted(n for n in changed if n in PROCESS_SETTINGS)
        need_restart = sorted(set(changed) - set(applied) - set(for_process))
        effective = old.model_copy(update={n: getattr(new, n) for n in applied})
        self.settings = effective
        self.agentapi.settings = effective
        if self.coder is not None:
            self.coder.settings = effective
        if self.tokens is not None:
            self.tokens.settings = effective
        self.uploader.reconfigure(effective)
        self.relay.settings = effective
        if self.mirror is not None:
            self.mirror.settings = effective
        # A change that is not in effect is worth a warning: it shows at every log level.
        say = log.warning if need_restart else log.info
        say("config_reloaded", applied=applied, need_restart=need_restart,
            for_process=for_process)
        return Reloaded(applied, need_restart, for_process)


def coder_proxies(settings: Settings, environ: Mapping[str, str]) -> Proxies:
    """The proxies coderd requests use. Raises StartupError when the proxy the environment
    names for the Coder URL is one this client cannot use, such as SOCKS. (One named only
    for the https form of an http URL is left to the redirect that would need it: that
    upload fails, retryably, naming the proxy.)"""
    proxies = Proxies.from_environ(environ)
    if settings.coder_url is not None and settings.uploads_disabled_reason is None:
        try:
            proxies.for_url(URL(settings.coder_url))
        except ProxyError as exc:
            raise StartupError(f"proxy for coderd: {exc}") from None
    return proxies


async def check(settings: Settings) -> None:
    """Every start-up check of `run` that needs no socket bound and no peer up: the proxy
    for coderd, the token file's readability and validity, and the socket path (the
    per-uid directory's owner, mode and symlink checks, the path's length, a parent that
    can be created, nothing but a socket there). `agent-sidecar config` runs it. Raises
    StartupError.

    What `run` alone checks is what is "in use": a socket another daemon serves, and the
    metrics port, so that `config` can vet a configuration next to a running daemon."""
    coder_proxies(settings, os.environ)
    if settings.uploads_disabled_reason is None:
        try:
            await TokenSource(settings).load()
        except TokenError as exc:
            raise StartupError(str(exc)) from None
    try:
        check_socket_path(settings.socket)
    except RelayError as exc:
        raise StartupError(str(exc)) from None
