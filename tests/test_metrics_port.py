"""The metrics TCP port (`metrics_addr`): the relay's bounds on a listener any local user can
reach. Its connections are capped by metrics_max_connections, idle ones make room, and the
relay's header and idle timeouts apply. Raw TCP clients against serve()."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from pathlib import Path

import pytest
from standins import FakeAgentAPI

from agent_sidecar.metrics import CONTENT_TYPE, PORT_ANSWERS_PER_S, PORT_CACHE_S

from .conftest import until
from .rawhttp import RawClient, request_bytes
from .test_daemon import serving, settings_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(client: RawClient) -> int:
    await client.write(request_bytes("GET", "/metrics"))
    answer = await client.answer(timeout_s=5)
    assert answer.headers["content-type"] == CONTENT_TYPE
    assert b"agent_sidecar_relay_requests_total" in answer.body
    return answer.status


async def test_at_the_metrics_cap_the_oldest_idle_connection_makes_room_for_a_scrape(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With metrics_max_connections idle TCP connections open, a scrape on a new one is
    served: the oldest idle connection is closed for it, the newer one is kept."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}",
                            metrics_max_connections=2)
    async with serving(settings):
        oldest = await RawClient.connect_tcp("127.0.0.1", port)
        newer = await RawClient.connect_tcp("127.0.0.1", port)
        with oldest, newer, await RawClient.connect_tcp("127.0.0.1", port) as scraper:
            assert await scrape(scraper) == 200
            assert await oldest.closed_by_server(timeout_s=2) == b""
            assert newer.quiet_and_open()  # accepted before the scraper: kept


async def test_clients_that_never_read_their_answers_cannot_keep_a_scraper_out(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """With metrics_max_connections connections busy on pipelined scrapes whose answers
    they never read, a new scrape is served: on the metrics port the oldest busy
    connection is closed for it, where the relay would answer 503."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}",
                            metrics_max_connections=2)
    async with serving(settings):
        hogs = [await RawClient.connect_tcp("127.0.0.1", port) for _ in range(2)]
        try:
            for hog in hogs:
                await hog.write(request_bytes("GET", "/metrics") * 50)
                # Its first answer is in: the connection is busy with the other 49.
                assert (await hog.answer(timeout_s=5)).status == 200
            with await RawClient.connect_tcp("127.0.0.1", port) as scraper:
                assert await scrape(scraper) == 200
        finally:
            for hog in hogs:
                hog.close()


async def test_slow_headers_and_idle_connections_on_the_metrics_port_are_timed_out(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """On the metrics port, headers that trickle in are cut off with a 408 after
    relay_header_timeout_s, and a connection that sends nothing is closed after
    relay_idle_timeout_s."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}",
                            relay_header_timeout_s=0.3, relay_idle_timeout_s=1)
    async with serving(settings):
        loop = asyncio.get_running_loop()
        with await RawClient.connect_tcp("127.0.0.1", port) as idle, \
                await RawClient.connect_tcp("127.0.0.1", port) as slow:
            started = loop.time()
            await slow.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")

            async def trickle() -> None:
                while True:
                    await slow.write(b"X")
                    await asyncio.sleep(0.05)  # the attacker's pace

            trickler = asyncio.create_task(trickle())
            try:
                cut = await slow.closed_by_server(timeout_s=5)
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
            assert cut.startswith(b"HTTP/1.1 408 ")
            assert loop.time() - started < 2
            assert await idle.closed_by_server(timeout_s=3) == b""


async def test_metrics_max_connections_changes_on_a_reload(
    agent: FakeAgentAPI, short_dir: Path, log_output: io.StringIO,
) -> None:
    """metrics_max_connections is a live setting: after a reload that raises it from 1 to 3,
    two idle connections and a scrape are served side by side."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}",
                            metrics_max_connections=1)
    raised = settings.model_copy(update={"metrics_max_connections": 3})
    async with serving(settings, reload_settings=lambda: raised) as (controls, served):
        controls.reload.set()
        await until(lambda: '"config_reloaded"' in log_output.getvalue())
        [reloaded] = [json.loads(line) for line in log_output.getvalue().splitlines()
                      if '"config_reloaded"' in line]
        assert reloaded["applied"] == ["metrics_max_connections"]
        first = await RawClient.connect_tcp("127.0.0.1", port)
        second = await RawClient.connect_tcp("127.0.0.1", port)
        with first, second, await RawClient.connect_tcp("127.0.0.1", port) as scraper:
            assert await scrape(scraper) == 200
            assert first.quiet_and_open()
            assert second.quiet_and_open()
        controls.shutdown.set()
        assert await served == 0



@pytest.mark.parametrize(("host", "warned"), [
    ("0.0.0.0", True),  # noqa: S104 - binding every interface is what is tested
    ("127.0.0.1", False), ("localhost", False), ("[::1]", False),
])
async def test_a_metrics_addr_off_loopback_is_warned_of_at_start(
    agent: FakeAgentAPI, short_dir: Path, log_output: io.StringIO, host: str, warned: bool,
) -> None:
    """A metrics_addr bound on an address that is not loopback (0.0.0.0: every interface)
    logs metrics_addr_not_loopback at start, since /metrics then has no auth on the network;
    loopback addresses, and names resolving only to them, log nothing of the kind."""
    if host == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"{host}:{port}")
    async with serving(settings):
        await until(lambda: '"metrics_listening"' in log_output.getvalue())
    events = [json.loads(line) for line in log_output.getvalue().splitlines()
              if '"metrics_addr_not_loopback"' in line]
    if warned:
        [event] = events
        assert event["level"] == "warning"
        assert f"metrics_addr {host}:{port} listens on 0.0.0.0" in event["detail"]
        assert "no authentication" in event["detail"]
    else:
        assert events == []


async def test_pipelined_requests_on_the_metrics_port_are_answered_at_the_paced_rate(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """Four TCP connections each pipelining 100 GET /metrics are answered, all of them
    together, no faster than PORT_ANSWERS_PER_S: 41 answers span at least 40 intervals
    (less a 10% margin), however fast the client asks."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}")
    count = 41
    loop = asyncio.get_running_loop()
    times: list[float] = []
    enough = asyncio.Event()

    async def read(client: RawClient) -> None:
        while True:
            answer = await client.answer(timeout_s=10)
            assert answer.status == 200
            assert b"agent_sidecar_relay_requests_total" in answer.body
            times.append(loop.time())
            if len(times) >= count:
                enough.set()

    async with serving(settings):
        clients = [await RawClient.connect_tcp("127.0.0.1", port) for _ in range(4)]
        readers: list[asyncio.Task[None]] = []
        try:
            for client in clients:
                await client.write(request_bytes("GET", "/metrics") * 100)
            readers = [asyncio.create_task(read(client)) for client in clients]
            async with asyncio.timeout(count / PORT_ANSWERS_PER_S + 10):
                await enough.wait()
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for client in clients:
                client.close()
    span = sorted(times)[count - 1] - min(times)
    assert span >= 0.9 * (count - 1) / PORT_ANSWERS_PER_S, (
        f"{count} answers in {span:.3f}s: faster than {PORT_ANSWERS_PER_S}/s")


async def test_a_scrape_of_the_metrics_port_sees_a_change_within_the_cache_time(
    agent: FakeAgentAPI, short_dir: Path,
) -> None:
    """The port's cached body is fresh enough: a change to the metrics (a relay request)
    shows in the port's scrapes no later than PORT_CACHE_S, plus one paced interval and a
    margin, after it happened."""
    port = free_port()
    settings = settings_for(agent, None, short_dir, metrics_addr=f"127.0.0.1:{port}")
    loop = asyncio.get_running_loop()
    seen = b'path="/livez"'
    async with serving(settings):
        with await RawClient.connect_tcp("127.0.0.1", port) as scraper:
            await scraper.write(request_bytes("GET", "/metrics"))
            assert seen not in (await scraper.answer(timeout_s=5)).body
            with await RawClient.connect(short_dir / "relay.sock") as relay:
                await relay.write(request_bytes("GET", "/livez"))
                assert (await relay.answer(timeout_s=5)).status == 200
            changed_at = loop.time()
            async with asyncio.timeout(PORT_CACHE_S + 5):
                while True:
                    await scraper.write(request_bytes("GET", "/metrics"))
                    if seen in (await scraper.answer()).body:
                        break
            took = loop.time() - changed_at
    assert took <= PORT_CACHE_S + 1 / PORT_ANSWERS_PER_S + 0.5, took
