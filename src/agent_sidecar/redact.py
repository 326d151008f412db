"""Masking secrets in text: URL userinfo, and known secrets in the forms text gives them.

Standard library only, so that `/status`, `config` and a light client can use it without
the logging stack. `logs` applies it to every line it writes.
"""

from __future__ import annotations

import base64
import json
import re
from bisect import bisect_left, bisect_right
from urllib.parse import quote, unquote, urlsplit

REDACTED = "**********"
MIN_SECRET_CHARS = 8  # shorter strings would redact ordinary words; real tokens are UUIDs
MIN_PARTIAL_CHARS = 8  # a secret cut short leaves fewer clear characters than this
MAX_SECRETS = 64  # tokens rotate; keep the newest, so scrubbing stays cheap

# The userinfo of a URL: everything between "://" and the last "@" before the host ends.
# The span stops at what cannot be in an authority (whitespace, "/", "?", "#"), so spans
# never overlap and a line is scanned once. Raw text, and text where backslash escapes
# (JSON, repr) stand for characters: there a quote ends the span and "\x" is one unit, so
# a mask never swallows a JSON string's closing quote.
_RAW_USERINFO = re.compile(r"://[^\s/?#]+@")
_ESCAPED_USERINFO = re.compile(r'://(?:[^\s/?#"\\]|\\[^\snrt])+@')
# One character as text can spell it: an escape sequence, a percent-encoded byte, or itself.
_UNIT = re.compile(r"\\(?:u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|.)|%[0-9A-Fa-f]{2}|.",
                   re.DOTALL)
_USERINFO_SAFE = "!$&'()*+,;="  # sub-delims, which a URL may leave unencoded in userinfo


def redact_url(text: str) -> str:
    """`text` with the userinfo of every URL in it masked: `http://u:p@h/` -> `http://**********@h/`.

    Works on one URL or on any text; everything else is left as it is.
    """
    return _RAW_USERINFO.sub("://" + REDACTED + "@", text)


def _forms(secret: str) -> set[str]:
    """How `secret` can appear in a line: as is, JSON- or repr-escaped (also both, as in a
    repr inside a JSON line), as a bytes repr, and percent-encoded."""
    as_json = json.dumps(secret)[1:-1]
    as_repr = repr(secret)[1:-1]
    as_bytes = repr(secret.encode("utf-8", "surrogateescape"))[2:-1]
    forms = {
        secret, as_json, as_repr, json.dumps(as_repr)[1:-1], repr(as_json)[1:-1],
        as_bytes, json.dumps(as_bytes)[1:-1],
        quote(secret, safe="", errors="surrogateescape"),
        quote(secret, safe=_USERINFO_SAFE, errors="surrogateescape"),
    }
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


class _Form:
    """One spelling of a secret, with the offsets where a cut leaves whole units."""

    __slots__ = ("bounds", "head", "tail", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.bounds = [0]
        for unit in _UNIT.finditer(text):
            self.bounds.append(unit.end())
        # The shortest whole-unit prefix and suffix that are long enough to recognise.
        self.head = text[:next(b for b in self.bounds if b >= MIN_PARTIAL_CHARS
                               or b == len(text))]
        cut = max((b for b in self.bounds if len(text) - b >= MIN_PARTIAL_CHARS), default=0)
        self.tail = text[cut:]

    def spans(self, line: str) -> list[tuple[int, int]]:
        """Where the whole form, or a long enough prefix or suffix of it, appears in `line`."""
        found: list[tuple[int, int]] = []
        text, n = self.text, len(self.text)
        start = line.find(self.head)
        while start != -1:
            end = start + len(self.head)
            k = len(self.head)
            while k < n and end < len(line) and line[end] == text[k]:
                end, k = end + 1, k + 1
            # Never end inside an escape. Bisected: a long secret (a 100 000-character
            # token) has as many bounds, and a line may hold many pieces of it.
            k = self.bounds[bisect_right(self.bounds, k) - 1]
            found.append((start, start + k))
            start = line.find(self.head, start + 1)
        end = line.find(self.tail)
        while end != -1:
            begin = end
            k = n - len(self.tail)  # offset in the form where the match begins
            while k > 0 and begin > 0 and line[begin - 1] == text[k - 1]:
                begin, k = begin - 1, k - 1
            k2 = self.bounds[bisect_left(self.bounds, k)]  # never begin inside an escape
            found.append((begin + (k2 - k), end + len(self.tail)))
            end = line.find(self.tail, end + 1)
        return found


class Redactor:
    """Masks URL userinfo and every registered secret wherever they appear.

    A secret is also found escaped (JSON, repr), percent-encoded, and cut: a prefix or a
    suffix of at least `MIN_PARTIAL_CHARS` characters is masked too, so truncating a line
    or a value never leaves a long recognisable piece of a secret.
    """

    def __init__(self) -> None:
        self._secrets: dict[str, None] = {}  # ordered: the oldest is dropped first
        self._forms: list[_Form] = []

    def add(self, secret: str) -> None:
        """Mask `secret` from now on (ignored if shorter than `MIN_SECRET_CHARS`)."""
        if len(secret) < MIN_SECRET_CHARS or secret in self._secrets:
            return
        self._secrets[secret] = None
        while len(self._secrets) > MAX_SECRETS:
            del self._secrets[next(iter(self._secrets))]
        forms = set().union(*(_forms(s) for s in self._secrets))
        self._forms = [_Form(f) for f in sorted(forms, key=len, reverse=True)]

    def add_url(self, url: str | None) -> None:
        """Mask the credentials of `url`, also outside a URL: the password (or the user when
        there is no password), decoded or not, and the Basic header a client makes of them."""
        if not url:
            return
        try:
            parts = urlsplit(url)
            user, password = parts.username, parts.password
        except ValueError:
            return
        if user is None:
            return
        if password is None:
            self.add(user)
            self.add(unquote(user))
            return
        self.add(password)
        self.add(unquote(password))
        pair = f"{unquote(user)}:{unquote(password)}"
        for encoding in ("latin-1", "utf-8"):
            try:
                self.add(base64.b64encode(pair.encode(encoding)).decode("ascii"))
            except UnicodeEncodeError:
                continue

    def scrub(self, text: str) -> str:
        """`text` with URL userinfo and secrets masked; for raw text (not a JSON line)."""
        return self._secrets_out(_RAW_USERINFO.sub("://" + REDACTED + "@", text))

    def scrub_escaped(self, text: str) -> str:
        """The same for text whose quotes and backslashes are escaped, like a JSON line:
        the result stays valid JSON."""
        return self._secrets_out(_ESCAPED_USERINFO.sub("://" + REDACTED + "@", text))

    def clip(self, text: str, limit: int) -> str:
        """At most `limit` characters of `text`, masked before it is cut (never the reverse,
        which could leave a piece of a secret that is too short to recognise)."""
        return self.scrub(text)[:limit]

    def _secrets_out(self, text: str) -> str:
        if not self._forms:
            return text
        spans = sorted(s for form in self._forms for s in form.spans(text))
        if not spans:
            return text
        out: list[str] = []
        pos = 0
        for start, end in spans:
            if end <= pos:
                continue
            if start >= pos:
                out.append(text[pos:start])
                out.append(REDACTED)
            pos = end
        out.append(text[pos:])
        return "".join(out)


__all__ = ["MIN_PARTIAL_CHARS", "MIN_SECRET_CHARS", "REDACTED", "Redactor", "redact_url"]
