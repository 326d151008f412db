"""The Coder client: one log-snapshot upload attempt, classified.

The classification follows coderd's handler (coder-contract.md §1): 204 stored; 400 the
payload is wrong; 401 the token is; 404 with "Route not found." means this coderd has no
such endpoint, any other 404 that the task is not this workspace's; 408, 429 and 5xx are
worth retrying; so are network errors and timeouts.
"""

from __future__ import annotations

import email.utils
import enum
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

import aiohttp
from yarl import URL

from agent_sidecar.config import Settings
from agent_sidecar.tokens import TokenSource

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TOKEN_HEADER = "Coder-Session-Token"  # noqa: S105 - a header name, not a secret
TOO_LARGE_DETAIL = "request body too large"
ROUTE_NOT_FOUND = "Route not found."


class Result(enum.Enum):
    """What one upload attempt means for the uploader."""

    ACCEPTED = "accepted"
    RETRY = "retry"
    PAYLOAD_REJECTED = "payload_rejected"
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 - an outcome name
    TASK_NOT_FOUND = "task_not_found"
    NOT_SUPPORTED = "not_supported"


@dataclass(frozen=True)
class Outcome:
    """One classified upload attempt: the result, and coderd's (or a proxy's) words."""

    result: Result
    status: int | None = None  # None: no HTTP answer (network error, timeout)
    message: str = ""
    detail: str = ""
    retry_after_s: float | None = None

    @property
    def too_large(self) -> bool:
        return self.result is Result.PAYLOAD_REJECTED and TOO_LARGE_DETAIL in self.detail

    def describe(self) -> str:
        head = f"HTTP {self.status}" if self.status is not None else "no answer"
        text = ": ".join(p for p in (self.message, self.detail) if p)
        return f"{head}: {text}" if text else head


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _coder_error(body: bytes) -> tuple[str, str]:
    """codersdk.Response's message and detail (with validations), or a proxy's plain text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300], ""
    if not isinstance(data, dict):
        return str(data)[:300], ""
    message = str(data.get("message") or "")
    detail = str(data.get("detail") or "")
    validations = data.get("validations")
    if isinstance(validations, list):
        fields = [f"{v.get('field')}: {v.get('detail')}"
                  for v in validations if isinstance(v, dict)]
        detail = "; ".join(p for p in (detail, *fields) if p)
    return message, detail


def snapshot_url(coder_url: str, task_id: uuid.UUID) -> URL:
    """The log-snapshot URL, joined so that a trailing '/' on CODER_AGENT_URL is harmless."""
    base = URL(coder_url)
    path = base.path.rstrip("/") + f"/api/v2/workspaceagents/me/tasks/{task_id}/log-snapshot"
    return base.with_path(path).with_query(format="agentapi")


class CoderClient:
    """Uploads log snapshots for one task to coderd, one attempt per call.

    `upload()` never raises: every answer, network error and timeout comes back as a
    classified Outcome. The attempt's timeout is read from `settings.upload_timeout_s` at
    each call (a live setting); the URL, from `coder_url` and `task_id`, needs a restart.
    It owns no task and no session.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        tokens: TokenSource,
        now: Callable[[], float] = time.time,
    ) -> None:
        if settings.coder_url is None or settings.task_id is None:
            raise ValueError("a Coder client needs coder_url and task_id")
        self._session = session
        self.settings = settings
        self.url = snapshot_url(settings.coder_url, settings.task_id)
        self.tokens = tokens
        self._now = now

    async def upload(self, body: bytes) -> Outcome:
        timeout_s = self.settings.upload_timeout_s
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.tokens.token:
            headers[TOKEN_HEADER] = self.tokens.token
        try:
            async with self._session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            return Outcome(Result.RETRY, message=f"timed out after {timeout_s:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(Result.RETRY, message=f"network error: {type(exc).__name__}: {exc}")
        return self.classify(status, raw, retry_after)

    def classify(self, status: int, body: bytes, retry_after: str | None = None) -> Outcome:
        if status in (200, 201, 204):
            return Outcome(Result.ACCEPTED, status)
        message, detail = _coder_error(body)
        if status in RETRYABLE_STATUSES or status >= 500:
            wait = parse_retry_after(retry_after, self._now)
            return Outcome(Result.RETRY, status, message, detail, wait)
        if status == 401:
            return Outcome(Result.TOKEN_REJECTED, status, message, detail)
        if status == 404:
            result = Result.NOT_SUPPORTED if message == ROUTE_NOT_FOUND else Result.TASK_NOT_FOUND
            return Outcome(result, status, message, detail)
        # 400, and anything else a proxy invents (403, 413, 3xx): this payload will not do.
        return Outcome(Result.PAYLOAD_REJECTED, status, message, detail)

