"""Which proxy carries a request to coderd: HTTP_PROXY, HTTPS_PROXY and NO_PROXY, read the
way Go's `http.ProxyFromEnvironment` reads them, since that is what the Coder agent, its
CLI and curl in the same workspace do.

- `HTTPS_PROXY` is used for https URLs and `HTTP_PROXY` for http URLs; each is looked up
  upper case first, then lower case, and an empty value counts as unset. There is no
  fall-back from one to the other and no `ALL_PROXY`.
- A value without a scheme (`proxy.corp:3128`) means `http://`.
- `localhost` and loopback addresses are never proxied, whatever NO_PROXY says.
- `NO_PROXY` is a comma-separated list: `*` (no proxy at all), an IP address, a CIDR range,
  or a domain, each optionally with `:port`. `example.com` matches `example.com` and every
  name under it; `.example.com` and `*.example.com` only the names under it.
- A SOCKS proxy (`socks5://`...) is refused: aiohttp speaks HTTP proxies only.

agentapi is local and is never reached through a proxy: only the Coder client uses this.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyError(Exception):
    """A proxy variable names a proxy this client cannot use; the message says which and
    what would work. It never holds the proxy's password."""


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address: never proxied, and never "another machine"."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    # Go's net.IP sees ::ffff:127.0.0.1 as the IPv4 address it maps; ipaddress does not.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def shown(url: URL) -> str:
    """A proxy URL as it may be logged: without its user and password."""
    return str(url.with_user(None)) if url.user or url.password else str(url)


@dataclass(frozen=True)
class _Rule:
    """One NO_PROXY entry."""

    network: IPNetwork | None = None  # an IP address (a /32 or /128) or a CIDR range
    domain: str = ""  # lower case, with a leading "."
    exact_too: bool = False  # the domain itself matches, not only names under it
    port: int | None = None

    def matches(self, host: str, ip: IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip in self.network
        return host.endswith(self.domain) or (self.exact_too and host == self.domain[1:])


def _parse_rule(entry: str) -> _Rule | None:
    entry = entry.strip().lower()
    if not entry:
        return None
    if "/" in entry:
        try:
            return _Rule(network=ipaddress.ip_network(entry, strict=False))
        except ValueError:
            return None
    host, port = entry, None
    if entry.startswith("["):  # [v6] or [v6]:port
        close = entry.find("]")
        if close < 0:
            return None
        host, rest = entry[1:close], entry[close + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif entry.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
        name, _, digits = entry.partition(":")
        if digits.isdigit():
            host, port = name, int(digits)
    if not host:
        return None
    try:
        return _Rule(network=ipaddress.ip_network(host), port=port)
    except ValueError:
        pass
    if host.startswith("*."):
        host = host[1:]
    exact = not host.startswith(".")
    return _Rule(domain=host if not exact else "." + host, exact_too=exact, port=port)


def _lookup(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) for the first of NAME and name that is set and not empty."""
    for variable in (name.upper(), name.lower()):
        value = env.get(variable, "").strip()
        if value:
            return variable, value
    return None


def _parse_proxy(variable: str, value: str) -> URL:
    if "://" not in value:
        value = "http://" + value
    try:
        url = URL(value)
    except ValueError:
        raise ProxyError(f"{variable}: not a URL; expected http://HOST:PORT") from None
    scheme = url.scheme.lower()
    if scheme.startswith("socks"):
        raise ProxyError(
            f"{variable}={shown(url)}: SOCKS proxies are not supported; use an HTTP proxy "
            "(http://HOST:PORT), or exempt the Coder host with NO_PROXY")
    if scheme not in ("http", "https") or not url.host:
        raise ProxyError(f"{variable}={shown(url)}: not an HTTP proxy; expected "
                         "http://HOST:PORT (or https://)")
    return url


@dataclass(frozen=True)
class _Setting:
    """One proxy variable as found: the proxy, or why it cannot be used."""

    variable: str
    proxy: URL | None = None
    error: str | None = None


def _setting(env: Mapping[str, str], name: str) -> _Setting | None:
    found = _lookup(env, name)
    if found is None:
        return None
    try:
        return _Setting(found[0], proxy=_parse_proxy(*found))
    except ProxyError as exc:
        return _Setting(found[0], error=str(exc))


@dataclass(frozen=True)
class Proxies:
    """The proxy settings of one process environment; `for_url()` picks the proxy for a URL.

    Immutable and holds no connection. A proxy variable that cannot be used (SOCKS, not a
    URL) is an error only for a URL it would carry: `for_url()` raises ProxyError then, so
    a start-up check on the Coder URL refuses it, and a SOCKS HTTP_PROXY that only other
    programs use does not stop the sidecar.
    """

    http: _Setting | None = None
    https: _Setting | None = None
    rules: tuple[_Rule, ...] = ()
    bypass_all: bool = False

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Proxies:
        no_proxy = _lookup(env, "no_proxy")
        entries = no_proxy[1].split(",") if no_proxy else []
        return cls(
            http=_setting(env, "http_proxy"),
            https=_setting(env, "https_proxy"),
            rules=tuple(r for r in map(_parse_rule, entries) if r is not None),
            bypass_all=any(e.strip() == "*" for e in entries),
        )

    def for_url(self, url: URL) -> URL | None:
        """The proxy for `url`, or None to connect directly. Raises ProxyError when the
        variable that applies names a proxy this client cannot use."""
        setting = self.https if url.scheme == "https" else self.http
        if setting is None or self.bypass_all or not url.host:
            return None
        host = url.host.lower()  # a trailing dot is kept: Go's NO_PROXY matching keeps it
        if is_loopback(host):
            return None
        try:
            ip: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ip = None
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        if any(rule.matches(host, ip, port) for rule in self.rules):
            return None
        if setting.error is not None:
            raise ProxyError(setting.error)
        return setting.proxy

    def variable_for(self, url: URL) -> str:
        """The environment variable `for_url(url)` takes its proxy from."""
        setting = self.https if url.scheme == "https" else self.http
        if setting is not None:
            return setting.variable
        return "HTTPS_PROXY" if url.scheme == "https" else "HTTP_PROXY"
