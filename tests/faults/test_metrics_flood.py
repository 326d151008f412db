"""Fault injection: a local user flooding the metrics TCP port of the real `agent-sidecar run`
with idle and slow connections, at a low descriptor limit, cannot take the relay, the
uploads or the CPU with it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import select
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from standins import FakeAgentAPI, FakeCoderd

from tests.faults.test_faults import converged, cpu_seconds, env_for, low_fd_limit, sidecar
from tests.sidecar import Sidecar

pytestmark = pytest.mark.faults

FLOOD = 600  # what exhausted the daemon's descriptors in the QA pass
BATCH = 50  # below the listen backlog (128)
CAP = 16  # metrics_max_connections


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flood:
    """TCP connections to one port that never send a byte, and which of them the server has
    closed (an end of stream, a reset: it writes nothing to an idle connection)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: dict[int, socket.socket] = {}
        self.closed: set[int] = set()
        self._poller = select.poll()

    def open(self, count: int) -> None:
        """Open `count` more at once: non-blocking connects, as fast as the kernel takes them."""
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", self.port)) in (0, errno.EINPROGRESS)
            self.socks[sock.fileno()] = sock
            self._poller.register(sock, select.POLLIN)

    @property
    def still_open(self) -> int:
        return len(self.socks) - len(self.closed)

    def wait_until_open_at_most(self, count: int, deadline: float) -> bool:
        """Block until the server has closed all but `count`, or the deadline (monotonic)."""
        while self.still_open > count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, _events in self._poller.poll(left * 1000):
                self._poller.unregister(fd)
                self.closed.add(fd)
        return True

    def flood(self, count: int, timeout_s: float) -> None:
        """Open `count`, in batches below the listen backlog, each once the server has taken
        the one before (all but CAP closed), so that none is still in the kernel's queue
        when the test goes on. A server that stops accepting costs `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        for _ in range(0, count, BATCH):
            self.open(BATCH)
            self.wait_until_open_at_most(CAP, deadline)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


async def slowloris(port: int, every_s: float) -> tuple[float, bytes]:
    """A client trickling a header byte every `every_s`; how long the server let it, and
    what the server sent before it closed the connection."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)

    async def trickle() -> None:
        with contextlib.suppress(OSError):  # until the server closes the connection
            while True:
                await loop.sock_sendall(sock, b"X")
                await asyncio.sleep(every_s)  # the attacker's pace

    with sock:
        async with asyncio.timeout(10):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            started = loop.time()
            await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\n")
            trickler = asyncio.create_task(trickle())
            answer = b""
            try:
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await loop.sock_recv(sock, 4096):
                        answer += chunk
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
        return loop.time() - started, answer


async def probe(process: Sidecar, path: str) -> int:
    """The status of GET `path` on the relay socket, which must answer within a second."""
    async with asyncio.timeout(1):
        status, _ = await process.get(path)
    return status


async def test_a_metrics_port_flood_leaves_the_relay_uploads_and_cpu_alone(
    agent: FakeAgentAPI, coderd: FakeCoderd, short_dir: Path,
) -> None:
    """With 128 descriptors, 600 idle TCP connections and two slowloris clients on the
    metrics port leave /livez and /healthz answering within a second and uploads flowing;
    the slow headers and the idle connections are closed by their timeouts, the CPU stays
    low, and the metrics port serves again afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port = free_port()
    env = env_for(short_dir, coderd, AGENT_SIDECAR_SETTLE_S="0",
                  AGENT_SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}",
                  AGENT_SIDECAR_METRICS_MAX_CONNECTIONS=str(CAP),
                  AGENT_SIDECAR_RELAY_HEADER_TIMEOUT_S="1",
                  AGENT_SIDECAR_RELAY_IDLE_TIMEOUT_S="2")
    async with sidecar(agent, env, preexec=low_fd_limit) as process:
        assert process.proc is not None
        agent.add_message("user", "before the flood")
        await converged(coderd, agent)
        cpu_before = cpu_seconds(process.proc.pid)
        held = Flood(port)
        await asyncio.to_thread(held.flood, FLOOD, 5.0)
        slow: list[asyncio.Task[tuple[float, bytes]]] = []
        try:
            # The flood has been taken in: no connection of it arrives after these.
            slow = [asyncio.create_task(slowloris(port, every_s)) for every_s in (0.1, 0.5)]
            statuses = []
            for i in range(3):
                statuses += [await probe(process, "/livez"), await probe(process, "/healthz")]
                agent.add_message("user", f"during the flood {i}")
                await converged(coderd, agent, timeout_s=5)
            cut = [await task for task in slow]
            # The last CAP of the flood were never evicted: their idle timeout closes them.
            all_closed = await asyncio.to_thread(
                held.wait_until_open_at_most, 0, time.monotonic() + 5)
        finally:
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            held.close()
        cpu = cpu_seconds(process.proc.pid) - cpu_before
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            scraped = resp.status, await resp.text()
    print(f"cpu {cpu:.2f}s; slowloris cut after {[round(t, 2) for t, _ in cut]}s")
    assert process.events("metrics_connections_at_limit"), "the flood did not reach the cap"
    assert statuses == [200] * 6
    for took, answer in cut:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert took < 3
    assert all_closed, f"{held.still_open} idle connections outlived their idle timeout"
    assert cpu < 3, cpu
    assert scraped[0] == 200
    assert "agent_sidecar_uploads_total" in scraped[1]
