"""Logging: JSON lines, redaction of the token wherever it appears, rate-limited repeats."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from agent_sidecar import logs

SECRET = "7d1e4b8a-9c63-4a5e-8f1d-4b700f3c9a52"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_tty(stream: io.StringIO) -> None:
    """auto renders one JSON object per line when the stream is not a TTY."""
    logs.configure("info", "auto", stream=stream)
    logs.get("t").info("hello", n=1)
    [line] = lines(stream)
    assert line["event"] == "hello"
    assert line["n"] == 1
    assert line["level"] == "info"


def test_level_filters(stream: io.StringIO) -> None:
    """Events below the configured level are not written."""
    logs.configure("warning", "json", stream=stream)
    logs.get("t").info("quiet")
    logs.get("t").warning("loud")
    assert [line["event"] for line in lines(stream)] == ["loud"]


def test_token_is_redacted_everywhere(stream: io.StringIO) -> None:
    """The token is replaced in values, nested values, messages and tracebacks."""
    logs.configure("debug", "json", stream=stream)
    logs.redactor.add(SECRET)
    log = logs.get("t")
    log.info(f"token {SECRET}", header={"Coder-Session-Token": SECRET}, items=[SECRET])
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        log.exception("boom")
    text = stream.getvalue()
    assert SECRET not in text
    assert text.count(logs.REDACTED) >= 4


def test_repeats_are_rate_limited_and_counted(stream: io.StringIO) -> None:
    """Identical warnings pass once per window; the next one reports how many were dropped."""
    now = [0.0]
    logs.configure("info", "json", stream=stream,
                   limiter=logs.RepeatLimiter(window_s=60, clock=lambda: now[0]))
    log = logs.get("t")
    for _ in range(1000):
        log.warning("peer_down", error="refused")
    log.warning("other", error="x")
    log.info("info_is_never_limited")
    log.info("info_is_never_limited")
    now[0] = 61.0
    log.warning("peer_down", error="refused")
    events = [(line["event"], line.get("suppressed")) for line in lines(stream)]
    assert events == [
        ("peer_down", None),
        ("other", None),
        ("info_is_never_limited", None),
        ("info_is_never_limited", None),
        ("peer_down", 999),
    ]
