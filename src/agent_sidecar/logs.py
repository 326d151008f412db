"""One logging pipeline: our structlog events and every stdlib `logging` record (aiohttp,
asyncio, Python's warnings) go through one handler and the same processors: JSON lines or
console, the repeat limiter, secret redaction, and journald priorities."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from agent_sidecar.redact import REDACTED, Redactor, redact_url

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

redactor = Redactor()


Kind = tuple[str, str, str, str]  # logger, level, event, error
Event = tuple[str, str, str]  # logger, level, event
OTHER = "\x00other"  # the `error` of a window shared by kinds past a bound; no real value


class RepeatLimiter(logging.Filter):
    """Lets one warning or error of a kind through per window; counts the rest.

    A kind is the logger, the level, the event and its `error` field; for a stdlib record,
    the first line of its message template and its exception's type. `error` is meant to be
    a fixed kind (an exception's type, a category), never a peer's text, which goes in
    `detail`. The next one let through after a quiet window carries `suppressed=N`, so
    nothing is hidden silently. It filters the one handler, so our events and stdlib
    records are limited alike.

    Bounded memory, which a flood cannot reset. One event has at most
    `max_errors_per_event` kinds at a time: its further `error` values share one window,
    so an `error` that does carry peer text costs a few lines, not one per peer. At most
    `max_kinds` kinds are kept: windows that have ended are forgotten first, oldest first;
    while every kept window is open, new kinds share one window per level. The windows
    kept are never cleared, so their repeats stay suppressed whatever else is logged. What
    a forgotten window suppressed is counted on the next line of its event let through (for
    the window new kinds share, on its next line). Raises nothing of its own; awaits nothing.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 1024, max_errors_per_event: int = 8) -> None:
        super().__init__()
        self._window_s = window_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._max_errors_per_event = max_errors_per_event
        # When each window opened and what it has suppressed, in the order they opened.
        self._seen: dict[Kind, tuple[float, int]] = {}
        self._errors_of: dict[Event, int] = {}  # kinds kept per event
        # What forgotten windows suppressed, by event, for its next line: at most max_kinds.
        self._carried: dict[Event, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        key = self._window_of(_kind(record), now)
        window = self._seen.get(key)
        if window is not None and now - window[0] < self._window_s:
            self._seen[key] = (window[0], window[1] + 1)  # keeps its place
            return False
        suppressed = self._carried.pop(key[:3], 0)
        if window is not None:
            suppressed += window[1]
            del self._seen[key]  # it opens again now, so it goes last
        elif key[3] != OTHER:
            event = key[:3]
            self._errors_of[event] = self._errors_of.get(event, 0) + 1
        self._seen[key] = (now, 0)
        if suppressed:
            if isinstance(record.msg, dict):  # one of ours: its event dict
                record.msg["suppressed"] = suppressed
            else:
                record.suppressed = suppressed
        return True

    def _window_of(self, key: Kind, now: float) -> Kind:
        """The window a record of kind `key` counts in: its own, unless a bound is reached."""
        if key in self._seen:
            return key
        event: Event = key[:3]
        if (self._errors_of.get(event, 0) >= self._max_errors_per_event
                or len(self._seen) >= self._max_kinds):
            self._forget_ended(now)
        if self._errors_of.get(event, 0) >= self._max_errors_per_event:
            return (*event, OTHER)
        if len(self._seen) >= self._max_kinds:
            return ("", key[1], "", OTHER)
        return key

    def _forget_ended(self, now: float) -> None:
        """Drop the windows that have ended. They are in the order they opened, so the
        ended ones are first; the rest are still open."""
        while self._seen:
            key, (first, suppressed) = next(iter(self._seen.items()))
            if now - first < self._window_s:
                return
            del self._seen[key]
            event = key[:3]
            if suppressed and (event in self._carried or len(self._carried) < self._max_kinds):
                self._carried[event] = self._carried.get(event, 0) + suppressed
            if key[3] != OTHER and event in self._errors_of:
                self._errors_of[event] -= 1
                if not self._errors_of[event]:
                    del self._errors_of[event]


def _kind(record: logging.LogRecord) -> Kind:
    if isinstance(record.msg, dict):
        event, error = record.msg.get("event"), record.msg.get("error", "")
    else:
        event = str(record.msg).partition("\n")[0]  # the template: peers' addresses vary
        kind = record.exc_info[0] if record.exc_info else None
        error = kind.__name__ if kind else ""
    return record.name, record.levelname, str(event), str(error)


def _priority(levelno: int) -> int:
    """The syslog priority of a level: debug 7, info 6, warning 4, error 3, critical 2."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                            (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


def _journald(stream: TextIO) -> bool:
    """Whether `stream` is journald's: JOURNAL_STREAM holds the device and inode of the stream
    systemd connected, which stays true only while nothing has redirected it."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):  # no file behind it, or no such variable
        return False


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler: writes each rendered record, with journald's `<N>` priority prefix on
    every line when the stream is journald's (its SyslogLevelPrefix, on by default)."""

    def __init__(self, stream: TextIO, journald: bool) -> None:
        super().__init__(stream)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if not self._journald:
            return line
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + part for part in line.split("\n"))

    def handleError(self, record: logging.LogRecord) -> None:
        # A record that could not be rendered: say so in one line of the same shape, without
        # its content, which is where the failure lies and may hold a secret.
        failure = sys.exc_info()[0]
        line = json.dumps({"event": "log_record_unrenderable", "level": "error",
                           "logger": record.name,
                           "error": failure.__name__ if failure else "unknown"})
        try:
            self.stream.write(("<3>" if self._journald else "") + line + self.terminator)
            self.flush()
        except Exception:  # noqa: S110 - nowhere left to report to
            pass


def _foreign(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A stdlib record's origin, and the limiter's count (a filter can only set attributes)."""
    record: logging.LogRecord = event_dict["_record"]
    event_dict["logger"] = record.name
    suppressed = getattr(record, "suppressed", 0)
    if suppressed:
        event_dict["suppressed"] = suppressed
    return event_dict


def _walk(value: Any) -> Any:
    if isinstance(value, str):
        return redactor.scrub(value)
    if isinstance(value, dict):
        return {_walk(k): _walk(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v) for v in value)
    return value  # anything else is rendered by repr(), which the line scrub covers


def _redact_event(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Masks secrets in every key and value, before rendering escapes them or cuts them."""
    return {k: _walk(v) for k, v in event_dict.items()}


def _redact_json_line(_: WrappedLogger, __: str, line: str) -> str:
    """Masks what only rendering reveals: reprs of objects, exception texts."""
    return redactor.scrub_escaped(line)


def _redact_console_line(_: WrappedLogger, __: str, line: str) -> str:
    return redactor.scrub(line)


_OURS = "agent_sidecar"  # the stdlib logger under which our events travel
_handler: _Handler | None = None
_timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    limiter: RepeatLimiter | None = None,
) -> None:
    """Route every log record of the process to `stream` (stderr) through one pipeline.

    Replaces what an earlier call set up. Only main() and tests call this.
    """
    global _handler
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Callable[[WrappedLogger, str, EventDict], Any]
    if fmt == "json":
        renderer, redact_line = structlog.processors.JSONRenderer(), _redact_json_line
    else:
        # Tracebacks are plain text, never with locals, whether or not rich is installed:
        # format_exc_info below turns them into text before the renderer sees them, and the
        # renderer's own formatter is plain too.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        redact_line = _redact_console_line
    final: list[Any] = [  # Any: the last two take and give the rendered line
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,  # one field: a JSON line stays one line
        _redact_event,
        renderer,
        redact_line,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            _foreign,
            structlog.processors.add_log_level,
            _timestamper,
        ],
        processors=final,
    )
    handler = _Handler(stream, journald=_journald(stream))
    handler.setFormatter(formatter)
    handler.addFilter(limiter or RepeatLimiter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    _set_thresholds(_LEVELS[level])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamper,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level at once for our events and for stdlib records (a live reload)."""
    _set_thresholds(_LEVELS[level])
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))


def _set_thresholds(level: int) -> None:
    # Our records follow the level. A library's start at warning (or the level, if higher):
    # below that they speak of their own internals (asyncio's choice of selector, watchfiles'
    # polling), which would drown ours at debug.
    logging.getLogger().setLevel(max(level, logging.WARNING))
    logging.getLogger(_OURS).setLevel(level)
    if _handler is not None:
        _handler.setLevel(level)  # also for a library that lowered its own logger's level


_saved_hooks: tuple[Any, Any, Any] | None = None


def capture_uncaught() -> None:
    """Also route through the pipeline what Python would print by itself: an uncaught
    exception (in any thread), an exception ignored in a finalizer, and warnings.

    Process-wide; main() calls it after configure(). reset() undoes it.
    """
    global _saved_hooks
    if _saved_hooks is None:
        _saved_hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    logging.captureWarnings(True)


def _excepthook(kind: type[BaseException], exc: BaseException,
                tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    get("python").critical("uncaught_exception", exc_info=(kind, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get("python").error("thread_exception", thread=args.thread.name if args.thread else None,
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisablehook(args: sys.UnraisableHookArgs) -> None:
    try:
        where = repr(args.object)
    except Exception:
        where = f"<{type(args.object).__name__} object>"
    get("python").error("unraisable_exception", message=args.err_msg or "Exception ignored in",
                        object=where,
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def reset() -> None:
    """Undo configure() and capture_uncaught(); for tests."""
    global _handler, _saved_hooks
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler = None
    root.setLevel(logging.WARNING)
    logging.getLogger(_OURS).setLevel(logging.NOTSET)
    if _saved_hooks is not None:
        sys.excepthook, threading.excepthook, sys.unraisablehook = _saved_hooks
        _saved_hooks = None
        logging.captureWarnings(False)
    structlog.reset_defaults()


def get(name: str) -> FilteringBoundLogger:
    return structlog.get_logger(f"{_OURS}.{name}")  # type: ignore[no-any-return]


def clip(text: str, limit: int) -> str:
    """At most `limit` characters of `text`, redacted first: use it wherever a peer's text is
    cut to fit a log line, so the cut cannot leave an unrecognisable piece of a secret."""
    return redactor.clip(text, limit)


__all__ = ["REDACTED", "Redactor", "RepeatLimiter", "capture_uncaught", "clip", "configure",
           "get", "redact_url", "redactor", "reset", "set_level"]
