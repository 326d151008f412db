"""serve(settings): the daemon's lifecycle, and nothing else.

Start-up, in order: build the pipeline, bind the relay socket, the metrics listener, then
one supervised task per component in one TaskGroup. Shutdown runs in reverse under one
deadline (`shutdown_timeout_s`), from a `finally`, so a signal and a cancel take the same
path:
  1. stop taking sends (the relay answers waiting senders 503);
  2. stop following agentapi and the periodic uploads: the model is final now;
  3. the final upload from memory, shielded from a cancel, cut short only by the deadline
     or by `Controls.force` (a second Ctrl+C);
  4. cancel what is left; then close the listeners and the HTTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from agent_sidecar import logs
from agent_sidecar.aio import Backoff, first_of
from agent_sidecar.coder import api_path_warning, plain_http_warning
from agent_sidecar.config import Settings, parse_hostport
from agent_sidecar.metrics import CONTENT_TYPE, PacedScrapes
from agent_sidecar.pipeline import Pipeline, StartupError
from agent_sidecar.redact import redact_url
from agent_sidecar.relay import RelayError
from agent_sidecar.relay_server import BoundedServer, bind_tcp
from agent_sidecar.sdnotify import Notifier
from agent_sidecar.snapshot import Packed

log = logs.get("daemon")

EXIT_OK = 0
EXIT_FORCED = 130  # the shutdown was cut short by a second interrupt
# systemd's STATUS= line is refreshed at most this often; a burst is announced at its end.
STATUS_INTERVAL_S = 1.0
# A component that ran this long before it crashed starts its restart back-off afresh.
HEALTHY_RUN_S = 60.0

__all__ = ["Controls", "StartupError", "serve"]

T = TypeVar("T")


@dataclass
class Controls:
    """What the outside world (signal handlers, an embedding program, tests) may ask of a
    running serve(), and what it announces."""

    shutdown: asyncio.Event = field(default_factory=asyncio.Event)  # stop gracefully
    force: asyncio.Event = field(default_factory=asyncio.Event)  # stop now (second Ctrl+C)
    reload: asyncio.Event = field(default_factory=asyncio.Event)  # SIGHUP
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once following agentapi


async def serve(
    settings: Settings,
    controls: Controls | None = None,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
    on_snapshot: Callable[[Packed, str], None] | None = None,
) -> int:
    """Run the sidecar until `controls.shutdown` is set, or until cancelled.

    Either way the graceful shutdown runs (final upload included) within
    `settings.shutdown_timeout_s`; a cancel that arrives during it waits for it. Returns 0,
    or 130 when `controls.force` cut the shutdown short; after a cancel it raises
    CancelledError once the shutdown is over. Raises StartupError when it cannot start
    (the socket is in use, the token file is unreadable, the metrics port is taken).
    Embeddable: it installs no signal handlers and never configures logging.
    `reload_settings()` is called on `controls.reload` to get the new settings.
    """
    controls = controls or Controls()
    notifier = notifier or Notifier({})
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(Pipeline(settings, on_snapshot=on_snapshot))
        run = _Run(pipeline, controls, notifier, reload_settings)
        notifier.status(pipeline.status_line())
        try:
            await pipeline.relay.start(settings.socket)
        except (RelayError, OSError) as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(run.stop_relay)
        if settings.metrics_addr:
            run.metrics_server = await _serve_metrics(pipeline)
            stack.push_async_callback(run.stop_metrics)
        _log_uploads(pipeline)
        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        run.start(tasks)
        try:
            await first_of(controls.shutdown.wait(), controls.force.wait())
        except asyncio.CancelledError:
            run.cancelled = True  # an embedding program's stop: the same graceful path
        code = await run.shutdown()
        if run.cancelled:
            raise asyncio.CancelledError
    return code


class _Run:
    """The tasks of one serve() and its shutdown."""

    def __init__(self, pipeline: Pipeline, controls: Controls, notifier: Notifier,
                 reload_settings: Callable[[], Settings] | None) -> None:
        self.pipeline = pipeline
        self.controls = controls
        self.notifier = notifier
        self.reload_settings = reload_settings
        self.deadline: float | None = None
        self.cancelled = False  # a cancel arrived; serve() re-raises it after the shutdown
        self.follower: asyncio.Task[None] | None = None
        self.uploader: asyncio.Task[None] | None = None
        self.mirror: asyncio.Task[None] | None = None
        self.helpers: list[asyncio.Task[None]] = []
        self.metrics_server: BoundedServer | None = None

    def start(self, tasks: asyncio.TaskGroup) -> None:
        p = self.pipeline

        def task(name: str, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
            return tasks.create_task(self._supervised(name, work), name=f"agent-sidecar-{name}")

        self.follower = task("follower", lambda: p.agentapi.follow(p.conversation))
        self.uploader = task("uploader", p.uploader.run)
        if p.mirror is not None:
            self.mirror = task("sink_mirror", p.mirror.run)
        p.running.update(follower=self.follower, uploader=self.uploader)
        self.helpers = [
            task("systemd_status", self._keep_status),
            task("watchdog", self.notifier.watchdog),
            task("reloader", self._reloader),
        ]
        if p.tokens is not None:
            self.helpers.append(task("token_watch", p.tokens.watch))
        if p.coder is not None:
            # Read once, for /status and for the words of the Tasks hint; never decides.
            self.helpers.append(task("buildinfo", self._read_buildinfo))

    async def shutdown(self) -> int:
        """Steps 1-4 of the module docstring. Returns the exit code."""
        loop = asyncio.get_running_loop()
        timeout_s = self.pipeline.settings.shutdown_timeout_s
        self.deadline = loop.time() + timeout_s
        log.info("shutting_down", timeout_s=timeout_s)
        self.notifier.stopping()
        self.pipeline.relay.close()  # 1
        stopping = [t for t in (self.follower, self.uploader, self.mirror) if t is not None]
        for t in stopping:  # 2
            t.cancel("shutdown: the model is final")
        self.pipeline.conversation.set_connected(False)  # /status: no longer following
        if stopping:
            _, stuck = await self._absorbing_cancel(asyncio.wait(stopping, timeout=self._left()))
            if stuck:
                log.error("shutdown_component_stuck", count=len(stuck))
        try:
            forced = await self._final_flush()  # 3
        finally:
            for t in self.helpers:  # 4
                t.cancel("shutdown")
        return EXIT_FORCED if forced else EXIT_OK

    async def stop_relay(self) -> None:
        await self.pipeline.relay.stop(timeout_s=self._left())

    async def stop_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop(timeout_s=self._left())

    def _left(self) -> float:
        if self.deadline is None:
            return self.pipeline.settings.shutdown_timeout_s
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def _final_flush(self) -> bool:
        """The last upload, shielded from a cancel; True if `force` cut it short."""
        uploader = self.pipeline.uploader
        attempts, outcomes = uploader.attempts, uploader.outcomes
        flush = asyncio.get_running_loop().create_task(
            self._guard_flush(), name="agent-sidecar-final-flush")
        force = asyncio.ensure_future(self.controls.force.wait())
        try:
            while not flush.done() and not force.done() and self._left() > 0:
                await self._absorbing_cancel(
                    asyncio.wait([flush, force], timeout=self._left(),
                                 return_when=asyncio.FIRST_COMPLETED))
        finally:
            force.cancel()
        if flush.done():
            log.info("final_flush_done", delivered=flush.result(), state=uploader.state)
            return False
        forced = self.controls.force.is_set()
        flush.cancel("forced" if forced else "shutdown deadline")
        await self._absorbing_cancel(asyncio.wait([flush]))
        # Only what this flush itself saw: an attempt cut short has no outcome.
        outcome = (uploader.last_outcome if uploader.outcomes > outcomes
                   else "no attempt finished")
        if forced:
            log.warning("final_flush_forced", outcome=outcome)
        else:
            log.error("final_flush_timed_out", timeout_s=self.pipeline.settings.shutdown_timeout_s,
                      attempts=uploader.attempts - attempts, outcome=outcome)
        return forced

    async def _absorbing_cancel(self, work: Awaitable[T]) -> T:
        """Await `work` to the end even if our task is cancelled meanwhile: during the
        shutdown a cancel has already been acted on. serve() re-raises it at the end."""
        future = asyncio.ensure_future(work)
        while True:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                self.cancelled = True
                if future.done():
                    return future.result()

    async def _guard_flush(self) -> bool:
        try:
            return await self.pipeline.uploader.flush()
        except Exception as exc:
            log.exception("final_flush_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            if self.pipeline.mirror is not None:
                await self.pipeline.mirror.write()  # the sink's last word, whatever coderd's

    async def _supervised(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run a component until cancelled. An unexpected exception is logged, and the
        component restarted after a back-off: one bug must not take the relay down."""
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await work()
                return  # e.g. the watchdog, when systemd asked for none
            except Exception as exc:
                log.exception("component_crashed", component=name,
                              error=f"{type(exc).__name__}: {exc}")
                self.pipeline.metrics.component_restarts.labels(component=name).inc()
            if loop.time() - started >= HEALTHY_RUN_S:
                backoff.reset()
            s = self.pipeline.settings
            await asyncio.sleep(backoff.next_delay(s.reconnect_initial_s, s.reconnect_max_s))

    async def _keep_status(self) -> None:
        """READY=1 once following agentapi, then a STATUS= line that follows every change
        of the conversation and of the uploads, at most one a second, never stale."""
        p, controls = self.pipeline, self.controls
        conv, uploads = p.conversation, p.uploader.changed
        last = None
        while True:
            versions = conv.version, uploads.version
            line = p.status_line()
            if not controls.ready.is_set() and conv.connected:
                controls.ready.set()
                self.notifier.ready(line)
                log.info("ready", socket=str(p.settings.socket))
            elif line != last:
                self.notifier.status(line)
                if controls.ready.is_set():
                    # Coalesce a burst: what changed meanwhile is announced right after.
                    await asyncio.sleep(STATUS_INTERVAL_S)
            last = line
            await first_of(conv.wait_changed(versions[0]), uploads.wait(versions[1]))

    async def _read_buildinfo(self) -> None:
        if self.pipeline.coder is not None:
            await self.pipeline.coder.read_buildinfo()

    async def _reloader(self) -> None:
        while True:
            await self.controls.reload.wait()
            self.controls.reload.clear()
            if self.pipeline.tokens is not None:
                await self.pipeline.tokens.reload()
            if self.reload_settings is None:
                new = self.pipeline.settings
            else:
                try:
                    new = self.reload_settings()
                except Exception as exc:
                    log.error("reload_failed", error=str(exc), kept="previous settings")
                    continue
            self.pipeline.reload(new)
            if self.metrics_server is not None:
                # The pipeline's settings hold only the changes that apply live.
                self.metrics_server.settings = self.pipeline.settings


def _log_uploads(pipeline: Pipeline) -> None:
    reason = pipeline.settings.uploads_disabled_reason
    if reason:
        # With a sink this is the deliberate local mode; without one, likely a mistake.
        say = log.info if pipeline.sink else log.warning
        say("uploads_disabled", reason=reason,
            sink=str(pipeline.sink.path) if pipeline.sink else None)
    elif pipeline.coder is not None:
        log.info("uploads_enabled", url=redact_url(str(pipeline.coder.url)))
        log_url_warnings(pipeline.settings)


def log_url_warnings(settings: Settings) -> None:
    """Warn, once at start-up, when the token would cross the network in clear, or the Coder
    URL looks like an API path rather than the access URL."""
    if settings.coder_url is None:
        return
    if warning := plain_http_warning(settings.coder_url):
        log.warning("coder_url_plain_http", detail=warning)
    if warning := api_path_warning(settings.coder_url):
        log.warning("coder_url_api_path", detail=warning)


async def _serve_metrics(pipeline: Pipeline) -> BoundedServer:
    """/metrics over TCP at `metrics_addr`, with the relay's machinery and bounds: at most
    `metrics_max_connections` connections (idle ones make room), the relay's header, body
    and idle timeouts, and an accept loop that backs off when out of descriptors, so a
    flood of the port cannot starve the relay, agentapi or coderd of descriptors. Its
    answers are paced and their body cached (metrics.PacedScrapes), so a flood of requests
    cannot take the CPU either. Any local
    user can reach a TCP port: no uid is checked here, which is why the port is opt-in.
    Raises StartupError when the address cannot be bound."""
    addr = pipeline.settings.metrics_addr
    assert addr is not None
    host, port = parse_hostport(addr)  # validated with the settings: raises nothing here

    scrapes = PacedScrapes(pipeline.metrics)

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=await scrapes.body())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = BoundedServer(
        app, pipeline.settings, name="metrics", cap_setting="metrics_max_connections",
        max_connections=lambda settings: settings.metrics_max_connections, evict_busy=True)
    try:
        listeners = bind_tcp(host, port)
        bound = [sock.getsockname()[0] for sock in listeners]
        await server.start(listeners)
    except OSError as exc:
        # Which setting, from where, and what would do: "Name or service not known" alone
        # does not say that it is metrics_addr's host that is wrong.
        raise StartupError(
            f"cannot serve metrics on {addr} (metrics_addr, from "
            f"{pipeline.settings.origin('metrics_addr')}): {exc.strerror or exc}; expected "
            f"HOST:PORT with a host of this machine and a free port, like 127.0.0.1:9464"
        ) from None
    log.info("metrics_listening", addr=addr)
    if warning := exposure_warning(addr, bound):
        log.warning("metrics_addr_not_loopback", detail=warning)
    return server


def exposure_warning(addr: str, bound: list[str]) -> str | None:
    """Why `metrics_addr` may be reachable from the network, or None when every address it
    is bound on is a loopback one. Decided on the addresses actually bound, so a host name
    counts for what it resolved to, and 0.0.0.0 or :: (every interface) is never loopback."""
    exposed = [ip for ip in bound if not ipaddress.ip_address(ip.partition("%")[0]).is_loopback]
    if not exposed:
        return None
    return (f"metrics_addr {addr} listens on {', '.join(exposed)}, which is not loopback: "
            "/metrics is reachable from the network, and it has no authentication; use "
            "127.0.0.1:PORT or [::1]:PORT unless other machines must scrape it")
