"""How a failed connection is worded: the OS's cause, never a repr or an unknown code."""

from __future__ import annotations

import aiohttp
import pytest

from agent_sidecar import neterrors


async def test_a_name_that_does_not_resolve_is_said_as_a_failed_lookup() -> None:
    """A coderd or agentapi host whose name does not resolve is described by the lookup's
    own words, not os.strerror of getaddrinfo's negative code ("Unknown error -2")."""
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError) as err:
            await http.get("http://agent-sidecar-test.invalid:8080/")
    text = neterrors.describe(err.value)
    assert text.startswith("cannot connect to agent-sidecar-test.invalid:8080: "
                           "name lookup failed: "), text
    assert "Unknown error" not in text


async def test_a_refused_connect_is_said_in_the_errnos_words() -> None:
    """A refused connect reads "Connection refused", as the errno says it, not asyncio's
    "Connect call failed (...)"."""
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError) as err:
            await http.get("http://127.0.0.1:1/")
    assert neterrors.describe(err.value) == "cannot connect to 127.0.0.1:1: Connection refused"
