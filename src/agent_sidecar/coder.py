"""The Coder client: one log-snapshot upload attempt, classified; and coderd's build info.

An answer is classified by its HTTP meaning first and by coderd's JSON wording second,
because a proxy or a front can answer instead of coderd (coder-contract.md §1 and §3,
field-notes.md §1):

- 2xx: stored.
- 3xx: a 307 or 308 to the same host is followed with the body, up to MAX_REDIRECTS; the
  port may change only together with an http->https upgrade. Any other redirect (another
  host, a downgrade to http, 301/302/303 on a POST, no usable Location) is not followed,
  and the token never leaves for another host: `redirected`.
- 413 from anyone, or coderd's 400 "request body too large": too large.
- 407 (a proxy wants credentials), 408, 429, 5xx, network errors (a proxy's named as the
  proxy's) and timeouts: retry.
- 401: the token. 404 with coderd's "Route not found." from an authenticated upload: this
  Coder does not serve Tasks (v2.36 with the flag off, v2.37 and later). Any other 404:
  the task is not this workspace's, or (no coderd JSON) the URL does not reach coderd.
- Anything else (400, 403, ...): this payload will not do.

A body that is not coderd's JSON is described by status, content type and first line, cut
short. At most `max_coderd_response_bytes` of any response is read, decompressed or not.
"""

from __future__ import annotations

import asyncio
import codecs
import email.utils
import enum
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC

import aiohttp
from yarl import URL

from agent_sidecar import logs, neterrors
from agent_sidecar.bodies import IDENTITY, UnsupportedEncoding, read_capped
from agent_sidecar.config import Settings
from agent_sidecar.proxy import Proxies, ProxyError, is_loopback, shown
from agent_sidecar.tokens import TokenSource

log = logs.get("coder")

# 407 is the proxy refusing us, as a CONNECT that fails is: not the payload's fault.
RETRYABLE_STATUSES = frozenset({407, 408, 429, 500, 502, 503, 504})
TOKEN_HEADER = "Coder-Session-Token"  # noqa: S105 - a header name, not a secret
LOCATION_CHARS = 200  # of a Location named in a log line, /status or check
STORED = 204  # coderd's only answer to a stored snapshot (coder-contract.md §1, row 12)
TOO_LARGE_DETAIL = "request body too large"
ROUTE_NOT_FOUND = "Route not found."
# Redirects followed in one attempt. A front moves a path once, maybe twice; a loop ends here.
MAX_REDIRECTS = 5
POST_REDIRECTS = frozenset({307, 308})  # the only ones that keep the method and the body
GET_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# How much of a body that is not coderd's JSON is shown: its first line, cut to this.
FIRST_LINE_CHARS = 160
# coderd's message and detail are short; a front that imitates them is cut to this.
MESSAGE_CHARS = 1000
_SCANNED_CHARS = 4096  # only the start of such a body is looked at, so it costs little


class Result(enum.Enum):
    """What one upload attempt means for the uploader."""

    ACCEPTED = "accepted"
    RETRY = "retry"
    PAYLOAD_REJECTED = "payload_rejected"
    TOO_LARGE = "too_large"
    REDIRECTED = "redirected"
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 - an outcome name
    TASK_NOT_FOUND = "task_not_found"
    TASKS_UNAVAILABLE = "tasks_unavailable"


@dataclass(frozen=True)
class Outcome:
    """One classified upload attempt: the result, and coderd's (or a front's) words."""

    result: Result
    status: int | None = None  # None: no HTTP answer (network error, timeout)
    message: str = ""
    detail: str = ""
    retry_after_s: float | None = None
    content_type: str | None = None  # set when the body was not coderd's JSON
    location: str | None = None  # a redirect not followed: where to, without its query
    notes: tuple[str, ...] = ()  # what in the answer was garbage and ignored

    @property
    def too_large(self) -> bool:
        return self.result is Result.TOO_LARGE

    @property
    def from_coderd(self) -> bool:
        """The body was coderd's own JSON answer (codersdk.Response)."""
        return self.status is not None and self.content_type is None

    def describe(self) -> str:
        """One line for a log, /status and /healthz: status, content type and the answer's
        words, redacted (a front may echo the token it was sent, in any shape)."""
        head = f"HTTP {self.status}" if self.status is not None else "no answer"
        if self.status is not None and self.content_type is not None:
            head += f" ({self.content_type or 'no content type'})"
        text = ": ".join(p for p in (self.message, self.detail) if p)
        return logs.redactor.scrub(f"{head}: {text}" if text else head)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) < 16 else float("inf")
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - now())
    except (OverflowError, OSError, ValueError):
        return None


def garbage(value: str, limit: int = 80) -> str:
    """A peer's value as a log may quote it: redacted, cut short, repr'd."""
    return repr(logs.clip(value, limit) + ("..." if len(value) > limit else ""))


def first_line(body: bytes, content_type: str = "") -> str:
    """The first line of a body that has text once markup is removed, redacted and cut
    short. The text is decoded by the charset its Content-Type names (UTF-8 when it names
    none, or one Python does not know); characters that are not printable are dropped."""
    text = body[: _SCANNED_CHARS].decode(_charset(content_type), "replace")
    text = "".join(c if c.isprintable() or c in "\r\n" else " " for c in text)
    for line in text.splitlines():
        words = " ".join(_without_tags(line).split())
        if words:
            # Redacted whatever its length: a front may echo the token it was sent.
            words = logs.redactor.scrub(words)
            return words if len(words) <= FIRST_LINE_CHARS else (
                logs.clip(words, FIRST_LINE_CHARS - 3) + "...")
    return ""


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            try:
                codecs.lookup(charset)
            except LookupError:
                break
            return charset
    return "utf-8"


def _without_tags(line: str) -> str:
    """`line` with every <...> replaced by a space; linear in its length."""
    out: list[str] = []
    inside = False
    for char in line:
        if char == "<":
            inside = True
            out.append(" ")
        elif char == ">" and inside:
            inside = False
        elif not inside:
            out.append(char)
    return "".join(out)


def _coder_error(body: bytes) -> tuple[str, str] | None:
    """codersdk.Response's message and detail (with validations); None if not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return None
    message = logs.clip(data["message"], MESSAGE_CHARS)
    detail = data.get("detail")
    detail = detail if isinstance(detail, str) else ""
    validations = data.get("validations")
    if isinstance(validations, list):
        fields = [f"{v.get('field')}: {v.get('detail')}"
                  for v in validations[:20] if isinstance(v, dict)]
        detail = "; ".join(p for p in (detail, *fields) if p)
    return message, logs.clip(detail, MESSAGE_CHARS)


def redirect_target(url: URL, status: int, location: str | None,
                    method: str) -> tuple[URL | None, str]:
    """Where a redirect of a `method` request to `url` goes, if it is followed; else None
    and why not. Followed: 307/308 (any of GET_REDIRECTS for a GET) to the same host and
    scheme and port, or to the same host over https from http on any port."""
    where = shown_location(url, location)
    allowed = GET_REDIRECTS if method == "GET" else POST_REDIRECTS
    if status not in allowed:
        if status in GET_REDIRECTS:
            return None, (f"a {status} redirect to {where}, not followed for a {method}: only "
                          "307 and 308 keep the method and the body")
        return None, f"a {status} answer (to {where}), not a redirect it follows"
    if not location or not location.strip():
        return None, f"a {status} redirect without a Location header"
    try:
        target = url.join(URL(location.strip()))
    except (ValueError, TypeError):
        return None, f"a {status} redirect to {where}, which is not a URL"
    if target.scheme not in ("http", "https") or not target.host:
        return None, f"a {status} redirect to {where}, which is not an http(s) URL"
    if (target.host or "").lower() != (url.host or "").lower():
        return None, (f"a {status} redirect to {where}, another host: the agent token is "
                      "never sent to another host; set CODER_AGENT_URL to coderd's own URL")
    if url.scheme == "https" and target.scheme == "http":
        return None, (f"a {status} redirect to {where}, from https to plain http: the "
                      "agent token is never sent over it")
    if target.scheme == url.scheme and target.port != url.port:
        return None, (f"a {status} redirect to {where}, another port: the port may change "
                      "only with a move from http to https")
    return target, ""


def shown_location(base: URL, location: str | None) -> str:
    """A Location as it may be logged: resolved, without user, query or fragment, and at
    most LOCATION_CHARS characters."""
    if location is None:
        return "nowhere"
    try:
        target = base.join(URL(location.strip()))
        shown = str(target.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return garbage(location.split("?", 1)[0].split("#", 1)[0])
    return shown if len(shown) <= LOCATION_CHARS else logs.clip(shown, LOCATION_CHARS) + "..."


def snapshot_url(coder_url: str, task_id: uuid.UUID) -> URL:
    """The log-snapshot URL, joined so that a trailing '/' on CODER_AGENT_URL is harmless."""
    return api_url(coder_url, f"workspaceagents/me/tasks/{task_id}/log-snapshot").with_query(
        format="agentapi")


def api_url(coder_url: str, path: str) -> URL:
    base = URL(coder_url)
    return base.with_path(base.path.rstrip("/") + "/api/v2/" + path)


def plain_http_warning(coder_url: str) -> str | None:
    """What to say when the token would go over plain http to another machine, or None."""
    url = URL(coder_url)
    if url.scheme != "http" or is_loopback(url.host or ""):
        return None
    return (f"the agent token goes over plain http to {url.host}: anyone on the path can "
            "read it; use an https CODER_AGENT_URL where you can")


def api_path_warning(coder_url: str) -> str | None:
    """What to say when CODER_AGENT_URL looks like an API path rather than Coder's access
    URL, or None. The paths the sidecar calls are joined below it."""
    url = URL(coder_url)
    if "/api/" not in url.path.rstrip("/") + "/":
        return None
    return (f"CODER_AGENT_URL {url.with_user(None).with_query(None)} has an API path; it "
            "should be Coder's access URL, like https://coder.example.com/, since "
            "/api/v2/... is joined below it")


_VERSION = re.compile(r"v?(\d+)\.(\d+)")


def tasks_unavailable(version: str | None, buildinfo_missing: bool = False) -> str:
    """Why the log-snapshot endpoint is missing, worded for this coderd's version when
    known (field-notes.md §1). The 404 decides that Tasks is unavailable; the version only
    picks the words. Never advice to change Coder's version: Tasks is going away. When
    buildinfo, which every coderd serves, was missing too, the URL itself is in doubt."""
    if buildinfo_missing:
        return ("the log-snapshot endpoint answered 404 \"Route not found.\", and so did "
                "GET /api/v2/buildinfo, which every coderd serves: CODER_AGENT_URL may not "
                "be Coder's access URL (check it), or this Coder does not serve Coder Tasks "
                "(off in v2.36 unless CODER_ENABLE_AI_TASKS=true, removed in v2.37)")
    match = _VERSION.match(version or "")
    minor = int(match.group(2)) if match and match.group(1) == "2" else None
    if minor is not None and minor >= 37:
        return (f"coderd {version} does not serve Coder Tasks or its log-snapshot endpoint: "
                "Tasks was removed in v2.37 (v2.36 serves it only with "
                "CODER_ENABLE_AI_TASKS=true; v2.28 to v2.35 and the v2.34 ESR serve it)")
    if minor == 36:
        return (f"coderd {version} serves Coder Tasks, and its log-snapshot endpoint, only "
                "when an admin sets CODER_ENABLE_AI_TASKS=true (Tasks is removed in v2.37)")
    where = f"coderd {version}" if version else "this coderd"
    return (f"{where} does not serve Coder Tasks or its log-snapshot endpoint: Tasks is "
            "served by v2.28 to v2.35 (and the v2.34 ESR), off in v2.36 unless an admin "
            "sets CODER_ENABLE_AI_TASKS=true, and removed in v2.37 and later")


def tasks_hint(version: str | None, recheck_s: float, buildinfo_missing: bool = False) -> str:
    """The daemon's log hint for Tasks being unavailable: why, and what still works."""
    return (f"{tasks_unavailable(version, buildinfo_missing)}. Snapshots are not stored in "
            "Coder; the sink and the relay keep working, and uploads are re-checked every "
            f"{recheck_s:g}s")


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    note: str | None = None


class CoderClient:
    """Uploads log snapshots for one task to coderd, one attempt per call, and reads
    coderd's public build info.

    `upload()` never raises: every answer, redirect, network error and timeout comes back
    as a classified Outcome. Requests go through the proxy the environment names for their
    URL (`proxies`, see proxy.py), follow only the redirects `redirect_target()` allows,
    and read at most `max_coderd_response_bytes` of an answer. Timeouts and caps are read
    from `settings` at each call (live settings); the URL needs a restart. It owns no task
    and no session: cancelling a call abandons its request.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        tokens: TokenSource,
        *,
        proxies: Proxies | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if settings.coder_url is None or settings.task_id is None:
            raise ValueError("a Coder client needs coder_url and task_id")
        self._session = session
        self.settings = settings
        self.url = snapshot_url(settings.coder_url, settings.task_id)
        self.buildinfo_url = api_url(settings.coder_url, "buildinfo")
        self.tokens = tokens
        self.proxies = proxies if proxies is not None else Proxies.from_environ(os.environ)
        self._now = now
        self.coderd_version: str | None = None  # from GET /api/v2/buildinfo, once read
        self.buildinfo_missing = False  # buildinfo answered 404: is this URL coderd's?

    async def upload(self, body: bytes) -> Outcome:
        timeout_s = self.settings.upload_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._post(body)
        except TimeoutError:
            return Outcome(Result.RETRY, message=f"timed out after {timeout_s:g}s"
                           + self._via(self.url))

    def _via(self, url: URL) -> str:
        """` (through the proxy P, from VARIABLE)`, or "" when `url` goes direct."""
        try:
            proxy = self.proxies.for_url(url)
        except ProxyError:
            return ""
        if proxy is None:
            return ""
        return f" (through the proxy {shown(proxy)}, from {self.proxies.variable_for(url)})"

    async def _post(self, body: bytes) -> Outcome:
        url = self.url
        for hop in range(MAX_REDIRECTS + 1):
            answer = await self._exchange("POST", url, body, with_token=True)
            if isinstance(answer, Outcome):
                return answer
            if answer.status == 407 and (via := self._via(url)):
                return Outcome(Result.RETRY, 407, "the proxy wants credentials (407 Proxy "
                               "Authentication Required): give them in the proxy URL" + via)
            if not 300 <= answer.status < 400:
                return self.classify(answer.status, answer.body, answer.headers, answer.note)
            location = answer.headers.get("Location")
            where = shown_location(url, location)
            target, why = redirect_target(url, answer.status, location, "POST")
            if target is None:
                return Outcome(Result.REDIRECTED, answer.status, why, location=where)
            if hop == MAX_REDIRECTS:
                return Outcome(Result.REDIRECTED, answer.status,
                               f"more than {MAX_REDIRECTS} redirects, the last to {where}",
                               location=where)
            log.debug("upload_redirect_followed", status=answer.status, location=where)
            url = target
        raise AssertionError("unreachable: the last hop returns")

    async def _exchange(self, method: str, url: URL, body: bytes | None, *,
                        with_token: bool) -> _Answer | Outcome:
        """One request and its capped, decoded answer; an Outcome when there is none."""
        try:
            proxy = self.proxies.for_url(url)
        except ProxyError as exc:
            return Outcome(Result.RETRY, message=f"no usable proxy for {url.scheme}: {exc}")
        headers = {"Accept": "application/json", **IDENTITY}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if with_token and self.tokens.token:
            headers[TOKEN_HEADER] = self.tokens.token
        cap = self.settings.max_coderd_response_bytes
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, proxy=proxy,
                allow_redirects=False, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.upload_timeout_s),
            ) as resp:
                try:  # an error body is only shown to people: its first `cap` bytes do
                    data, note = await read_capped(resp, cap, truncate=True), None
                except UnsupportedEncoding as exc:
                    data, note = b"", f"a body that was not decoded: {exc}"
                return _Answer(resp.status, resp.headers, data, note)
        except aiohttp.ClientProxyConnectionError as exc:
            assert proxy is not None
            return Outcome(Result.RETRY, message=(
                f"network error: the proxy {shown(proxy)} (from "
                f"{self.proxies.variable_for(url)}) is unreachable: "
                f"{neterrors.os_reason(exc)}"))
        except aiohttp.ClientHttpProxyError as exc:
            where = shown(proxy) if proxy else "the proxy"
            return Outcome(Result.RETRY, message=(
                f"network error: the proxy {where} refused to connect to {url.host}: "
                f"HTTP {exc.status} {exc.message}"))
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            via = f" (through the proxy {shown(proxy)})" if proxy else ""
            return Outcome(Result.RETRY,
                           message=f"network error{via}: {neterrors.describe(exc)}")

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None = None,
                 note: str | None = None) -> Outcome:
        """The Outcome of one answer (status, decoded body, headers), by HTTP meaning first."""
        headers = headers or {}
        if status == STORED:
            return Outcome(Result.ACCEPTED, status)
        notes: tuple[str, ...] = (note,) if note else ()
        coder = _coder_error(body)
        base = Outcome(Result.PAYLOAD_REJECTED, status)
        if coder is not None:
            base = replace(base, message=coder[0], detail=coder[1])
        else:
            ctype = headers.get("Content-Type", "").split(";", 1)[0].strip()[:80]
            base = replace(base, message=note or first_line(body, headers.get("Content-Type", "")),
                           content_type=ctype)
        if 200 <= status < 300:
            # coderd stores a snapshot with 204 and no body; another success (a sign-in page
            # with 200, a queue's 202) was written by something in front of it, and nothing
            # says the snapshot is stored. Retried, so health turns once it lasts.
            return replace(base, result=Result.RETRY, notes=(
                *notes, f"coderd answers {STORED} to a stored snapshot; this {status} came "
                "from something in front of it"))
        if status == 413 or (status == 400 and TOO_LARGE_DETAIL in base.detail):
            return replace(base, result=Result.TOO_LARGE, notes=notes)
        if 300 <= status < 400:
            return replace(base, result=Result.REDIRECTED, notes=notes,
                           location=shown_location(self.url, headers.get("Location")))
        if status in RETRYABLE_STATUSES or status >= 500:
            value = headers.get("Retry-After")
            wait = parse_retry_after(value, self._now)
            if value is not None and wait is None:
                notes += (f"ignored Retry-After {garbage(value)}: expected seconds or an "
                          "HTTP date",)
            return replace(base, result=Result.RETRY, retry_after_s=wait, notes=notes)
        if status == 401:
            return replace(base, result=Result.TOKEN_REJECTED, notes=notes)
        if status == 404 and coder is not None and base.message == ROUTE_NOT_FOUND:
            # chi answers this only after /me's auth passed: the route is not registered.
            return replace(base, result=Result.TASKS_UNAVAILABLE, notes=notes)
        if status == 404:
            return replace(base, result=Result.TASK_NOT_FOUND, notes=notes)
        return replace(base, notes=notes)

    async def read_buildinfo(self) -> str | None:
        """GET /api/v2/buildinfo (public: no token); coderd's version, also kept in
        `coderd_version`, or None when it does not say. Never raises."""
        timeout_s = self.settings.upload_timeout_s
        url = self.buildinfo_url
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    exchanged = await self._exchange("GET", url, None, with_token=False)
                    if isinstance(exchanged, Outcome):
                        log.info("coderd_buildinfo_unavailable", error=exchanged.message)
                        return None
                    answer = exchanged
                    target, _why = redirect_target(url, answer.status,
                                                   answer.headers.get("Location"), "GET")
                    if target is None:
                        break
                    url = target
        except TimeoutError:
            log.info("coderd_buildinfo_unavailable", error=f"timed out after {timeout_s:g}s")
            return None
        version = None
        if answer.status == 200:
            try:
                data = json.loads(answer.body)
            except (ValueError, RecursionError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("version"), str):
                version = "".join(c for c in data["version"][:64] if c.isprintable()) or None
        if version is None:
            self.buildinfo_missing = answer.status == 404
            log.info("coderd_buildinfo_unavailable", status=answer.status)
            return None
        self.coderd_version = version
        log.info("coderd_version", version=version)
        return version

