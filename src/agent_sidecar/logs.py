"""structlog setup: JSON lines or console, secret redaction, and rate-limited repeats."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from agent_sidecar.redact import redact_url

REDACTED = "**********"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Redactor:
    """Replaces every known secret, wherever it appears, before and after rendering.

    Before rendering it walks the event's values; after rendering it scans the final
    line, which also covers tracebacks and reprs that embed the secret.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        # Very short strings would redact ordinary words; real tokens are UUIDs.
        if len(secret) >= 8:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._walk(v) for v in value)
        return value

    def event(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        if not self._secrets:
            return event_dict
        return {k: self._walk(v) for k, v in event_dict.items()}

    def rendered(self, _: WrappedLogger, __: str, line: str) -> str:
        return self.scrub(line)


class RepeatLimiter:
    """Lets one warning or error of a kind through per window; counts the rest.

    A kind is the level, the event and its `error` field. The next one let through
    after a quiet window carries `suppressed=N`, so nothing is hidden silently.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 1024) -> None:
        self._window_s = window_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def __call__(self, _: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        if method not in ("warning", "error", "critical", "exception"):
            return event_dict
        key = (method, str(event_dict.get("event")), str(event_dict.get("error", "")))
        now = self._clock()
        first, suppressed = self._seen.get(key, (None, 0))
        if first is not None and now - first < self._window_s:
            self._seen[key] = (first, suppressed + 1)
            raise structlog.DropEvent
        if len(self._seen) >= self._max_kinds:
            self._seen.clear()  # bounded memory beats perfect accounting
        self._seen[key] = (now, 0)
        if suppressed:
            event_dict["suppressed"] = suppressed
        return event_dict


redactor = Redactor()


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    limiter: RepeatLimiter | None = None,
) -> None:
    """Configure structlog process-wide. Only main() and tests call this."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Callable[[WrappedLogger, str, EventDict], Any]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        limiter or RepeatLimiter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":  # the console renderer formats exceptions itself
        processors.append(structlog.processors.format_exc_info)
    processors += [redactor.event, renderer, redactor.rendered]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


__all__ = ["REDACTED", "Redactor", "RepeatLimiter", "configure", "get", "redact_url",
           "redactor"]
