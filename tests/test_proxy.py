"""Proxies from the environment, read as Go's ProxyFromEnvironment reads them."""

from __future__ import annotations

import pytest
from yarl import URL

from agent_sidecar.proxy import Proxies, ProxyError

PROXY = "http://proxy.corp:3128"


def proxy_for(url: str, **env: str) -> str | None:
    found = Proxies.from_environ(env).for_url(URL(url))
    return None if found is None else str(found)


@pytest.mark.parametrize(("env", "url", "expected"), [
    ({"HTTPS_PROXY": PROXY}, "https://coder.example.com/", PROXY),
    ({"https_proxy": PROXY}, "https://coder.example.com/", PROXY),
    ({"HTTPS_PROXY": PROXY, "https_proxy": "http://lower:1"}, "https://c.example.com/", PROXY),
    ({"HTTPS_PROXY": "", "https_proxy": PROXY}, "https://c.example.com/", PROXY),
    ({"HTTP_PROXY": PROXY}, "https://coder.example.com/", None),  # no fall-back
    ({"HTTPS_PROXY": PROXY}, "http://coder.example.com/", None),
    ({"HTTP_PROXY": PROXY}, "http://coder.example.com/", PROXY),
    ({"HTTP_PROXY": "proxy.corp:3128"}, "http://coder.example.com/", PROXY),  # no scheme
    ({"ALL_PROXY": PROXY}, "http://coder.example.com/", None),  # Go ignores ALL_PROXY
])
def test_which_variable_applies(env: dict[str, str], url: str, expected: str | None) -> None:
    """HTTPS_PROXY for https and HTTP_PROXY for http, upper case first, empty is unset,
    no fall-back between them, and a value without a scheme means http://."""
    assert proxy_for(url, **env) == expected


@pytest.mark.parametrize("url", [
    "http://localhost:3000/", "http://127.0.0.1:3000/", "http://127.8.9.10/",
    "http://[::1]:3000/", "https://LOCALHOST/", "http://[::ffff:127.0.0.1]/",
])
def test_loopback_is_never_proxied(url: str) -> None:
    """localhost and loopback addresses go direct whatever the environment says."""
    assert proxy_for(url, HTTP_PROXY=PROXY, HTTPS_PROXY=PROXY, NO_PROXY="") is None


@pytest.mark.parametrize(("no_proxy", "url", "direct"), [
    ("*", "https://coder.example.com/", True),
    ("coder.example.com", "https://coder.example.com./", False),  # as Go: the dot counts
    ("example.com", "https://example.com/", True),
    ("example.com", "https://coder.example.com/", True),
    ("example.com", "https://notexample.com/", False),
    (".example.com", "https://example.com/", False),
    (".example.com", "https://coder.example.com/", True),
    ("*.example.com", "https://coder.example.com/", True),
    ("*.example.com", "https://example.com/", False),
    ("Example.COM", "https://coder.example.com/", True),
    ("coder.example.com:8443", "https://coder.example.com:8443/", True),
    ("coder.example.com:8443", "https://coder.example.com/", False),
    ("coder.example.com:443", "https://coder.example.com/", True),  # the default port
    ("10.0.0.0/8", "https://10.1.2.3/", True),
    ("10.0.0.0/8", "https://11.1.2.3/", False),
    ("10.1.2.3", "https://10.1.2.3/", True),
    ("10.1.2.3:8080", "http://10.1.2.3:8080/", True),
    ("10.1.2.3:8080", "http://10.1.2.3/", False),
    ("[2001:db8::1]:443", "https://[2001:db8::1]/", True),
    ("2001:db8::/32", "https://[2001:db8::5]/", True),
    (" other.org , example.com ,,", "https://coder.example.com/", True),
    ("garbage/xx, :80", "https://coder.example.com/", False),
])
def test_no_proxy(no_proxy: str, url: str, direct: bool) -> None:
    """NO_PROXY takes *, IPs, CIDR ranges and domains (a bare domain covers its subdomains,
    a leading dot only them), each with an optional port; malformed entries are skipped."""
    for name in ("NO_PROXY", "no_proxy"):
        found = proxy_for(url, HTTPS_PROXY=PROXY, HTTP_PROXY=PROXY, **{name: no_proxy})
        assert (found is None) is direct, name


@pytest.mark.parametrize("value", ["socks5://proxy.corp:1080", "socks5h://u:pw@p:1080",
                                   "SOCKS4://p:1080"])
def test_a_socks_proxy_is_refused_naming_the_variable_and_the_remedy(value: str) -> None:
    """A SOCKS proxy for a URL that would use it is a clear error naming the variable and
    what works instead, never the proxy's password."""
    proxies = Proxies.from_environ({"HTTPS_PROXY": value})
    with pytest.raises(ProxyError) as err:
        proxies.for_url(URL("https://coder.example.com/"))
    message = str(err.value)
    assert message.startswith("HTTPS_PROXY=")
    assert "SOCKS proxies are not supported; use an HTTP proxy (http://HOST:PORT)" in message
    assert "pw" not in message
    # The same variable does not matter to a URL it would not carry.
    assert proxies.for_url(URL("https://127.0.0.1/")) is None
    assert proxies.for_url(URL("http://coder.example.com/")) is None


def test_a_proxy_with_credentials_keeps_them_for_the_connection() -> None:
    """User and password in the proxy URL are kept for Proxy-Authorization."""
    found = Proxies.from_environ({"HTTP_PROXY": "http://u:p%40ss@proxy.corp:3128"}).for_url(
        URL("http://coder.example.com/"))
    assert found is not None
    assert (found.user, found.password) == ("u", "p@ss")
