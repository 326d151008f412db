"""Prometheus metrics on a private registry, so embedding serve() twice never collides."""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent_sidecar import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


# Upload states, as /status, STATUS= and the metrics show them (see uploader.py).
UPLOAD_STATES = ("idle", "ok", "retrying", "payload_rejected", "too_large", "redirected",
                 "token_rejected", "task_not_found", "tasks_unavailable")


class Metrics:
    """Every metric the sidecar exports, on a registry of its own. Raises nothing."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build = Info("agent_sidecar_build", "Build information.", registry=r)
        self.build.info({"version": __version__})
        self.uploads = Counter(
            "agent_sidecar_uploads", "Snapshot upload attempts by result.", ["result"],
            registry=r,
        )
        self.upload_state = Enum(
            "agent_sidecar_upload_state", "The uploads' state, as /status shows it "
            "(tasks_unavailable: this Coder does not serve Tasks).",
            states=list(UPLOAD_STATES), registry=r,
        )
        self.upload_retries = Counter(
            "agent_sidecar_upload_retries", "Upload attempts that were retries.", registry=r
        )
        self.upload_duration = Histogram(
            "agent_sidecar_upload_duration_seconds", "Duration of one upload attempt.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.last_success = Gauge(
            "agent_sidecar_last_upload_success_timestamp_seconds",
            "Unix time of the last snapshot coderd accepted.", registry=r,
        )
        self.snapshot_bytes = Gauge(
            "agent_sidecar_snapshot_bytes", "Size of the last packed snapshot.", registry=r
        )
        self.snapshot_messages = Gauge(
            "agent_sidecar_snapshot_messages", "Messages in the last packed snapshot.", registry=r
        )
        self.truncations = Counter(
            "agent_sidecar_snapshot_truncations",
            "Packed snapshots whose oldest message is a tail.", registry=r,
        )
        self.sse_reconnects = Counter(
            "agent_sidecar_sse_reconnects", "Reconnects to agentapi's /events.", registry=r
        )
        self.sse_bad_events = Counter(
            "agent_sidecar_sse_bad_events", "agentapi events dropped as invalid or oversized.",
            ["reason"], registry=r,
        )
        self.sse_connected = Gauge(
            "agent_sidecar_sse_connected", "1 while following agentapi.", registry=r
        )
        self.relay_requests = Counter(
            "agent_sidecar_relay_requests", "Relay socket requests by path and status code.",
            ["path", "code"], registry=r,
        )
        self.component_restarts = Counter(
            "agent_sidecar_component_restarts",
            "Components restarted after an unexpected exception.", ["component"], registry=r,
        )
        self.sink_errors = Counter(
            "agent_sidecar_sink_errors", "Failed writes to the sink directory.", registry=r
        )

    def on_follow_event(self, kind: str) -> None:
        if kind == "reconnect":
            self.sse_reconnects.inc()
        else:
            self.sse_bad_events.labels(reason=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The metrics TCP port answers at most this many requests a second, all its connections
# together. Any local user can reach the port, and rendering the registry is the costliest
# thing it does: unpaced, 16 connections pipelining GET /metrics held the daemon at 100%
# CPU. Prometheus scrapes a target every 15 s or more, so 20 a second leaves room for
# several scrapers and a person with curl.
PORT_ANSWERS_PER_S = 20.0
# One rendering of the registry serves the port's answers for this long: a scrape sees
# metrics at most this old, far below any scrape interval.
PORT_CACHE_S = 1.0


class PacedScrapes:
    """The body of the metrics port's answers: at most `per_s` a second, shared by every
    connection, each waiting for its turn (its connection reads nothing more meanwhile:
    aiohttp handles one request of a connection at a time, and queues few), and rendered
    at most once per `cache_s`. The waiting is bounded by the port's connection cap: one
    request a connection waits at a time. Raises nothing but CancelledError."""

    def __init__(self, metrics: Metrics, *, per_s: float = PORT_ANSWERS_PER_S,
                 cache_s: float = PORT_CACHE_S) -> None:
        self._metrics = metrics
        self._interval = 1.0 / per_s
        self._cache_s = cache_s
        self._next_slot = float("-inf")  # loop time of the next free answer slot
        self._body = b""
        self._rendered_at = float("-inf")

    async def body(self) -> bytes:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Reserve the next slot before waiting, so concurrent requests queue one interval
        # apart in the order they arrived, whatever their connection.
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)  # pacing, not synchronisation
        now = loop.time()
        if now - self._rendered_at >= self._cache_s:
            self._body = self._metrics.render()
            self._rendered_at = now
        return self._body
