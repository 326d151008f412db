"""Logging: one pipeline for our events and stdlib records, JSON lines, redaction of secrets
wherever and however they appear, rate-limited repeats, and journald priorities."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from yarl import URL

from agent_sidecar import logs
from agent_sidecar.redact import MIN_PARTIAL_CHARS, Redactor, redact_url

from .sidecar import Sidecar, clean_env

SECRET = "7d1e4b8a-9c63-4a5e-8f1d-4b700f3c9a52"
# A password with every character that escaping or encoding spells differently.
AWKWARD = "pa\"ss\\wo'rd-1234-\u00fc%@:/"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    logs.reset()


@pytest.fixture(autouse=True)
def _fresh_redactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own secrets, so none leaks into another test's expectations."""
    monkeypatch.setattr(logs, "redactor", Redactor())


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def frozen() -> logs.RepeatLimiter:
    """A limiter whose window never ends, so a test's repeats do not depend on its speed."""
    return logs.RepeatLimiter(window_s=60, clock=lambda: 0.0)


# -- the format ------------------------------------------------------------------------------


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


def test_libraries_speak_from_warning_up_and_ours_from_the_level(stream: io.StringIO) -> None:
    """At debug our debug events are written, a library's debug and info records are not
    (asyncio's selector, watchfiles' polling), and its warnings are."""
    logs.configure("debug", "json", stream=stream)
    logs.get("t").debug("ours")
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    logging.getLogger("watchfiles.main").info("polling")
    logging.getLogger("aiohttp.server").warning("lib_warning")
    assert [line["event"] for line in lines(stream)] == ["ours", "lib_warning"]


def test_set_level_moves_both_thresholds_at_once(stream: io.StringIO) -> None:
    """set_level (the live reload) moves our threshold, and a library's once it is above
    warning; a library that lowered its own logger's level is held to it too."""
    logs.configure("warning", "json", stream=stream)
    logs.get("t").info("quiet")
    logs.set_level("info")
    logs.get("t").info("heard")
    logging.getLogger("lib").info("lib_quiet")
    logging.getLogger("lib").warning("lib_heard")
    logs.set_level("error")
    logs.get("t").warning("quiet_again")
    logging.getLogger("lib").warning("lib_quiet_again")
    chatty = logging.getLogger("chatty")
    chatty.setLevel(logging.DEBUG)
    chatty.warning("chatty_quiet")
    logging.getLogger("lib").error("lib_error")
    assert [line["event"] for line in lines(stream)] == ["heard", "lib_heard", "lib_error"]


def test_set_level_keeps_the_repeat_limiter_s_windows(stream: io.StringIO) -> None:
    """A live level change does not let through the repeats the limiter is holding back."""
    logs.configure("info", "json", stream=stream, limiter=frozen())
    logs.get("t").warning("agentapi_disconnected", error="refused")
    logs.set_level("debug")
    logs.get("t").warning("agentapi_disconnected", error="refused")
    assert [line["event"] for line in lines(stream)] == ["agentapi_disconnected"]


def test_configuring_again_replaces_the_handler(stream: io.StringIO) -> None:
    """A second configure() (tests, a reload) never doubles lines or writes to the old stream."""
    old = io.StringIO()
    logs.configure("info", "json", stream=old)
    logs.configure("info", "json", stream=stream)
    logs.get("t").info("once")
    logging.getLogger("lib").warning("lib_once")
    assert [line["event"] for line in lines(stream)] == ["once", "lib_once"]
    assert old.getvalue() == ""


# -- one pipeline: stdlib records ------------------------------------------------------------


def test_stdlib_records_are_rendered_like_our_events(stream: io.StringIO) -> None:
    """A library's record is one JSON line of our shape, naming its logger, with its
    traceback as text in the `exception` field."""
    logs.configure("info", "json", stream=stream)
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("aiohttp.client").error("request to %s failed", "agentapi",
                                                  exc_info=True)
    text = stream.getvalue()
    assert text.count("\n") == 1
    [line] = lines(stream)
    assert line["event"] == "request to agentapi failed"
    assert line["logger"] == "aiohttp.client"
    assert line["level"] == "error"
    assert "timestamp" in line
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ConnectionResetError: peer went away" in line["exception"]


async def _malformed_request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nNot A Header\r\n\r\n")
        await writer.drain()
        return await reader.read()  # aiohttp logs before it answers and closes
    finally:
        writer.close()
        await writer.wait_closed()


async def test_malformed_http_requests_make_one_rate_limited_json_line(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str],
) -> None:
    """200 malformed requests to a real aiohttp server write one JSON line (the traceback in
    a field), not 200 plain tracebacks; the next after the window counts the 199 dropped."""
    now = [0.0]
    logs.configure("info", "json", stream=stream,
                   limiter=logs.RepeatLimiter(window_s=60, clock=lambda: now[0]))
    runner = web.AppRunner(web.Application(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for _ in range(200):
            assert (await _malformed_request(port)).startswith(b"HTTP/1.0 400")
        now[0] = 61.0
        await _malformed_request(port)
    finally:
        await runner.cleanup()
    records = lines(stream)  # every line is JSON, or this raises
    assert [(r["event"].split(" from ")[0], r["logger"], r.get("suppressed"))
            for r in records] == [
        ("Error handling request", "aiohttp.server", None),
        ("Error handling request", "aiohttp.server", 199),
    ]
    assert "BadHttpMessage" in records[0]["exception"]
    assert capsys.readouterr().err == ""  # nothing went around the pipeline


async def test_asyncio_errors_are_json_lines_and_redacted(stream: io.StringIO) -> None:
    """asyncio's "Exception in callback" and "Task exception was never retrieved" are JSON
    lines with the exception in a field, and the token in them is masked."""
    logs.configure("info", "json", stream=stream, limiter=frozen())
    logs.redactor.add(SECRET)
    loop = asyncio.get_running_loop()
    ran = asyncio.Event()

    def callback() -> None:
        raise ValueError(f"bad token {SECRET}")

    async def task() -> None:
        raise ValueError(f"bad token {SECRET}")

    loop.call_soon(callback)
    loop.call_soon(ran.set)  # callbacks run in order
    await ran.wait()
    failed = asyncio.create_task(task())
    await asyncio.wait([failed])
    del failed  # never retrieved: asyncio reports it when the task is collected
    gc.collect()
    text = stream.getvalue()
    assert SECRET not in text
    records = lines(stream)
    assert [r["logger"] for r in records] == ["asyncio", "asyncio"]
    assert records[0]["event"].startswith("Exception in callback ")
    assert records[1]["event"].startswith("Task exception was never retrieved")
    assert all("ValueError: bad token " + logs.REDACTED in r["exception"] for r in records)


def test_what_python_prints_itself_goes_through_the_pipeline(tmp_path: Path) -> None:
    """After capture_uncaught(), a warning, an exception in a finalizer, a thread's exception
    and the uncaught exception that ends the process are each one redacted JSON line; the
    exit code stays 1."""
    script = textwrap.dedent(f"""
        import threading, warnings
        from agent_sidecar import logs
        logs.configure("info", "json")
        logs.capture_uncaught()
        logs.redactor.add({SECRET!r})
        warnings.warn("deprecated knob {SECRET}", UserWarning, stacklevel=1)
        class Finalizer:
            def __del__(self):
                raise ValueError("finalizer saw {SECRET}")
        Finalizer()
        def work():
            raise OSError("thread saw {SECRET}")
        thread = threading.Thread(target=work, name="worker")
        thread.start()
        thread.join()
        raise RuntimeError("crash with {SECRET}")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, env=clean_env())
    assert proc.returncode == 1
    assert SECRET not in proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(r.get("logger"), r["level"]) for r in records] == [
        ("py.warnings", "warning"), (None, "error"), (None, "error"), (None, "critical")]
    assert "UserWarning: deprecated knob " + logs.REDACTED in records[0]["event"]
    assert records[1]["event"] == "unraisable_exception"
    assert "ValueError: finalizer saw " + logs.REDACTED in records[1]["exception"]
    assert records[2]["event"] == "thread_exception"
    assert records[2]["thread"] == "worker"
    assert "OSError: thread saw " + logs.REDACTED in records[2]["exception"]
    assert records[3]["event"] == "uncaught_exception"
    assert "RuntimeError: crash with " + logs.REDACTED in records[3]["exception"]


async def test_the_daemon_logs_bad_relay_requests_and_its_urls_safely(short_dir: Path) -> None:
    """The real daemon: 200 malformed requests on its relay socket add one JSON line, and the
    URLs it logs at start-up have their userinfo masked."""
    env = clean_env(
        AGENT_SIDECAR_SOCKET=str(short_dir / "s.sock"),
        AGENT_SIDECAR_AGENTAPI_URL="http://agent:agentpass-1234@127.0.0.1:9",
        CODER_AGENT_URL="http://coder:coderpass-5678@127.0.0.1:9/",
        CODER_AGENT_TOKEN=SECRET,
        AGENT_SIDECAR_TASK_ID="0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70",
        AGENT_SIDECAR_LOG_LEVEL="info",
    )
    async with Sidecar(env=env) as sidecar:
        started = await sidecar.wait_log("uploads_enabled")
        await sidecar.wait_log("relay_listening")
        for _ in range(200):
            reader, writer = await asyncio.open_unix_connection(env["AGENT_SIDECAR_SOCKET"])
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nNot A Header\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.0 400")
            writer.close()
        assert await sidecar.stop() == 0
    assert started["url"].startswith("http://" + logs.REDACTED + "@127.0.0.1:9/")
    text = "\n".join(sidecar.raw)
    for secret in ("coderpass-5678", "agentpass-1234", "//coder:", "//agent:", SECRET):
        assert secret not in text
    assert [line for line in sidecar.lines if line["event"] == "<not json>"] == []
    # The relay answers what aiohttp cannot parse itself: one line of its own, no traceback,
    # and nothing through aiohttp's logger.
    bad = [line for line in sidecar.lines if line["event"] == "relay_bad_http"]
    assert len(bad) == 1
    assert "exception" not in bad[0]
    assert [line for line in sidecar.lines if line.get("logger") == "aiohttp.server"] == []


# -- secrets ---------------------------------------------------------------------------------


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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_url_userinfo_is_masked_in_any_position(stream: io.StringIO, fmt: str) -> None:
    """`user:password@` of any URL is masked in messages, values, keys, reprs and tracebacks,
    in both formats, though the password was never registered as a secret."""
    logs.configure("debug", fmt, stream=stream)  # type: ignore[arg-type]
    url = "https://deploy:hunter2pass@coder.example.com:8443/api?x=1"
    log = logs.get("t")
    log.info(f"connecting to {url}", url=url, obj=URL(url), nested={url: [url, (url,)]})
    logging.getLogger("aiohttp.client").warning("redirected to %s", url)
    try:
        raise ConnectionError(f"cannot reach {URL(url)!r}")
    except ConnectionError:
        log.exception("failed")
    text = stream.getvalue()
    assert "hunter2pass" not in text
    assert "deploy" not in text
    assert text.count("https://" + logs.REDACTED + "@coder.example.com:8443/api?x=1") >= 7
    if fmt == "json":
        lines(stream)  # still valid JSON


def test_escaped_and_encoded_forms_of_a_secret_are_masked(stream: io.StringIO) -> None:
    """A secret is masked however a line spells it: as is, JSON-escaped, repr-escaped, both
    (a repr inside a JSON line), percent-encoded, and as a bytes repr."""
    logs.configure("debug", "json", stream=stream)
    logs.redactor.add(AWKWARD)
    log = logs.get("t")
    log.info("raw", value=AWKWARD, body={"password": AWKWARD})
    log.info("repr", value=repr({"password": AWKWARD}), raw=AWKWARD.encode())
    log.info("encoded", url="https://coder.example.com/?password=" + quote(AWKWARD, safe=""))
    try:
        raise PermissionError({"password": AWKWARD})
    except PermissionError:
        log.exception("failed")
    text = stream.getvalue()
    assert len(lines(stream)) == 4  # every line still parses
    spellings = {AWKWARD, json.dumps(AWKWARD)[1:-1], repr(AWKWARD)[1:-1],
                 json.dumps(repr(AWKWARD)[1:-1])[1:-1], quote(AWKWARD, safe=""),
                 json.dumps(repr(AWKWARD.encode())[2:-1])[1:-1]}
    for spelling in spellings:
        assert spelling not in text
    assert "-1234-" not in text


def _pieces(secret: str) -> list[str]:
    n = MIN_PARTIAL_CHARS
    return [secret[:k] for k in range(n, len(secret) + 1)] + \
        [secret[-k:] for k in range(n, len(secret) + 1)]


def test_a_secret_cut_short_leaves_no_long_piece(stream: io.StringIO) -> None:
    """A prefix or suffix of a secret (a value cut to fit) is masked from MIN_PARTIAL_CHARS
    characters on, so no cut leaves that many characters of it in clear."""
    logs.configure("debug", "json", stream=stream)
    logs.redactor.add(SECRET)
    logs.redactor.add(AWKWARD)
    log = logs.get("t")
    for secret in (SECRET, AWKWARD):
        whole = f"Authorization: {secret} (sent)"
        for cut in range(len(whole)):
            log.info("body_cut", head=whole[:cut], tail=whole[cut:])
            log.info(f"message cut {whole[:cut]}")
    text = stream.getvalue()
    wrapping = len("Authorization: ") + len(" (sent)")
    assert len(lines(stream)) == 2 * (len(SECRET) + wrapping) + 2 * (len(AWKWARD) + wrapping)
    decoded = json.dumps(lines(stream))  # every value, decoded, then escaped one way
    for secret in (SECRET, AWKWARD):
        for piece in _pieces(secret):
            assert piece not in text
            assert json.dumps(piece)[1:-1] not in decoded
    assert "Authorization: " + SECRET[:MIN_PARTIAL_CHARS - 1] in text  # short pieces stay


def test_masking_never_cuts_an_escape_in_two(stream: io.StringIO) -> None:
    """A piece of a secret that ends where its escaped spelling and the line's diverge is
    masked up to the last whole escape, so the JSON line stays valid."""
    secret = "s3cr3t-pw\\with-backslash"  # JSON spells the backslash as two characters
    logs.configure("debug", "json", stream=stream)
    logs.redactor.add(secret)
    # bytes are rendered by repr(), so only the scrub of the rendered line sees them
    logs.get("t").info("diverges", value=b's3cr3t-pw"quoted"')
    [line] = lines(stream)
    assert line["value"] == "b'" + logs.REDACTED + '"quoted"\''


def test_clip_masks_before_it_cuts() -> None:
    """clip() cuts text to a limit after masking, so the cut cannot split a secret in two."""
    logs.redactor.add(SECRET)
    clipped = logs.clip(f"detail: {SECRET} and more", 30)
    assert clipped == f"detail: {logs.REDACTED} and more"[:30]


@pytest.mark.parametrize(("text", "masked"), [
    ("http://user:pass@host/", "http://**********@host/"),
    ("https://token@host:8443/x?y=1#z", "https://**********@host:8443/x?y=1#z"),
    ("http://u:p@ss@host", "http://**********@host"),
    ("http://u:p%40ss@[::1]:80/", "http://**********@[::1]:80/"),
    ("see http://a:b@h1/ and ftp://c:d@h2", "see http://**********@h1/ and ftp://**********@h2"),
    ("http://host/path@not-userinfo", "http://host/path@not-userinfo"),
    ("mailto:someone@example.com", "mailto:someone@example.com"),
    ("http://localhost:3284", "http://localhost:3284"),
    ("/run/agent-sidecar/agent-sidecar.sock", "/run/agent-sidecar/agent-sidecar.sock"),
])
def test_redact_url_masks_userinfo_only(text: str, masked: str) -> None:
    """redact_url masks the userinfo of each URL in a text and leaves everything else."""
    assert redact_url(text) == masked


def test_url_credentials_are_masked_outside_urls_too(stream: io.StringIO) -> None:
    """Registering a URL masks its password wherever it appears, and the Basic header a
    client builds from it."""
    logs.configure("debug", "json", stream=stream)
    logs.redactor.add_url("http://deploy:hunter2pass@coder.example.com/")
    logs.get("t").info("auth", login="deploy", password="hunter2pass",
                       header="Basic ZGVwbG95Omh1bnRlcjJwYXNz")
    text = stream.getvalue()
    assert "hunter2pass" not in text
    assert "ZGVwbG95Omh1bnRlcjJwYXNz" not in text


def _fail_with_a_local() -> None:
    hidden_local = "local-value-visible-only-in-locals"  # noqa: F841 - the point of the test
    raise RuntimeError("boom")


def test_tracebacks_never_show_locals_even_with_rich(stream: io.StringIO) -> None:
    """With rich installed, the console format's traceback is still plain and shows no
    locals (rich's default would print them, tokens included)."""
    pytest.importorskip("rich")
    logs.configure("debug", "console", stream=stream)
    try:
        _fail_with_a_local()
    except RuntimeError:
        logs.get("t").exception("crashed")
    text = stream.getvalue()
    assert "local-value-visible-only-in-locals" not in text
    assert "Traceback (most recent call last):" in text
    assert "RuntimeError: boom" in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_tracebacks_are_plain_without_locals(stream: io.StringIO, fmt: str) -> None:
    """A library's traceback goes through the same formatter: plain text, no locals."""
    logs.configure("debug", fmt, stream=stream)  # type: ignore[arg-type]
    try:
        _fail_with_a_local()
    except RuntimeError:
        logging.getLogger("asyncio").exception("Exception in callback")
    text = stream.getvalue()
    assert "Traceback (most recent call last):" in text
    assert "RuntimeError: boom" in text
    assert "local-value-visible-only-in-locals" not in text
    assert "asyncio" in text


# -- the repeat limiter ----------------------------------------------------------------------


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


def test_stdlib_repeats_are_limited_by_their_template(stream: io.StringIO) -> None:
    """A library's repeated error is one kind whatever its arguments (peer addresses vary),
    and a different exception type is another kind."""
    logs.configure("info", "json", stream=stream, limiter=frozen())
    server = logging.getLogger("aiohttp.server")
    for port in range(100):
        try:
            raise ValueError("bad")
        except ValueError:
            server.exception("Error handling request from %s", f"127.0.0.1:{port}")
    try:
        raise KeyError("other")
    except KeyError:
        server.exception("Error handling request from %s", "127.0.0.1:1")
    assert [line["exception"].splitlines()[-1] for line in lines(stream)] == [
        "ValueError: bad", "KeyError: 'other'"]


def test_peer_text_in_error_costs_a_few_lines_per_window_not_one_per_peer(
    stream: io.StringIO,
) -> None:
    """An event whose `error` differs every time (a peer's text where a kind belongs) is let
    through for max_errors_per_event values per window, the rest sharing one window; the
    first after the window counts what was suppressed."""
    now = [0.0]
    logs.configure("info", "json", stream=stream, limiter=logs.RepeatLimiter(
        window_s=60, clock=lambda: now[0], max_errors_per_event=8))
    log = logs.get("t")
    for i in range(300):
        log.warning("peer_said", error=f"peer text {i}")
    log.warning("other_event", error="refused")  # other events keep their own windows
    assert len(lines(stream)) == 8 + 1 + 1
    now[0] = 61.0
    log.warning("peer_said", error="peer text 300")
    last = lines(stream)[-1]
    assert (last["error"], last["suppressed"]) == ("peer text 300", 300 - 9)


def test_a_flood_of_kinds_neither_grows_the_limiter_nor_resets_its_windows(
    stream: io.StringIO,
) -> None:
    """Past max_kinds, new kinds share one window instead of clearing the others: a repeat
    held back before the flood stays held back, the lines stay few and the memory bounded;
    once windows end they are forgotten and new kinds get their own again."""
    now = [0.0]
    limiter = logs.RepeatLimiter(window_s=60, clock=lambda: now[0], max_kinds=16)
    logs.configure("info", "json", stream=stream, limiter=limiter)
    log = logs.get("t")
    log.warning("held_back", error="refused")
    for i in range(5000):
        logging.getLogger("lib").warning(f"template {i}")  # a library's pre-formatted text
    log.warning("held_back", error="refused")
    events = [line["event"] for line in lines(stream)]
    assert events.count("held_back") == 1
    assert len(events) == 1 + 15 + 1  # held_back, the kinds that fit, one shared window
    assert len(limiter._seen) <= 16 + 1
    now[0] = 61.0
    log.warning("new_kind_after_the_window", error="x")
    log.warning("held_back", error="refused")
    assert [line["event"] for line in lines(stream)][-2:] == [
        "new_kind_after_the_window", "held_back"]
    assert lines(stream)[-1]["suppressed"] == 1
    assert len(limiter._seen) <= 16 + 1


# -- journald --------------------------------------------------------------------------------


def _stream_ident(fh: Any) -> str:
    st = os.fstat(fh.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journald_gets_the_syslog_priority_of_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When stderr is journald's stream, each line starts with `<N>`, the level's syslog
    priority, so `journalctl -p warning` finds warnings; the rest of the line is unchanged."""
    with (tmp_path / "journal").open("w") as fh:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_ident(fh))
        logs.configure("debug", "json", stream=fh, limiter=frozen())
        log = logs.get("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        logging.getLogger("aiohttp.server").error("lib_e")
        logs.reset()
    written = (tmp_path / "journal").read_text().splitlines()
    assert [(line[:3], json.loads(line[3:])["event"]) for line in written] == [
        ("<7>", "d"), ("<6>", "i"), ("<4>", "w"), ("<3>", "e"), ("<2>", "c"), ("<3>", "lib_e"),
    ]


def test_journald_prefixes_every_line_of_a_console_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A multi-line console entry keeps its priority on every line journald splits it into."""
    with (tmp_path / "journal").open("w") as fh:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_ident(fh))
        logs.configure("debug", "console", stream=fh)
        try:
            _fail_with_a_local()
        except RuntimeError:
            logs.get("t").exception("crashed")
        logs.reset()
    written = (tmp_path / "journal").read_text().splitlines()
    assert len(written) > 3
    assert all(line.startswith("<3>") for line in written)


@pytest.mark.parametrize("journal_stream", ["other", "unset", "garbage"])
def test_no_priority_prefix_unless_the_stream_is_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal_stream: str,
) -> None:
    """A JOURNAL_STREAM naming another file (inherited, then redirected), none, or a bad
    one: the lines are plain JSON."""
    with (tmp_path / "other").open("w") as other, (tmp_path / "log").open("w") as fh:
        if journal_stream == "other":
            monkeypatch.setenv("JOURNAL_STREAM", _stream_ident(other))
        elif journal_stream == "garbage":
            monkeypatch.setenv("JOURNAL_STREAM", "not:numbers")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        logs.configure("info", "json", stream=fh)
        logs.get("t").warning("w")
        logs.reset()
    [line] = (tmp_path / "log").read_text().splitlines()
    assert json.loads(line)["event"] == "w"
