"""The real-engine test's stand-ins for agentapi and coderd, as one long-running process.

deploy/test/run.sh runs this as a second systemd unit inside the booted Debian container,
and as the `agent` container under Docker and Compose (the agent's container is where
agentapi lives). It serves, on loopback:

- agentapi (`standins.FakeAgentAPI`) on --agentapi, 127.0.0.1:3284 by default;
- coderd (`standins.FakeCoderd`) on --coderd, accepting the agent token from
  CODER_AGENT_TOKEN (never a flag: argv is world-readable) for the task --task-id;
- a control API on --control, for the test script (deploy/test/ctl.py):
  - GET  /ready                       200 once everything listens;
  - GET  /state                       messages, agent status, what agentapi received, uploads;
  - POST /messages {"role","content"} add a message to the conversation;
  - POST /drop                        cut every /events stream mid-way (a warning in the sidecar);
  - GET  /wait/received?text=T&timeout_s=S
                                      until agentapi has accepted the user input T;
  - GET  /wait/stored?after=UNIX&timeout_s=S
                                      until coderd holds the conversation as the sidecar should
                                      pack it, from a 204 upload that arrived at or after UNIX.
  A wait that times out answers 504 with the state, so the script can say what it saw.

The `standins` package is not in the wheel: the script puts it next to this file (systemd)
or on PYTHONPATH (containers). This process tells systemd it is ready (sd_notify READY=1)
once all three listen, so `systemctl start` returns only then; outside systemd that is a
no-op. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from standins import FakeAgentAPI, FakeCoderd

from agent_sidecar.sdnotify import Notifier
from agent_sidecar.simulator import serve_loopback

MAX_WAIT_S = 120.0


class WatchedAgentAPI(FakeAgentAPI):
    """FakeAgentAPI that also wakes waiters whenever it publishes an event."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.changed = asyncio.Event()

    def publish(self, raw: bytes) -> None:
        super().publish(raw)
        self.changed.set()


class Control:
    """The control API over one agentapi stand-in, one coderd stand-in and one task."""

    def __init__(self, agent: WatchedAgentAPI, coderd: FakeCoderd, task: uuid.UUID) -> None:
        self.agent = agent
        self.coderd = coderd
        self.task = task

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/state", self.state)
        app.router.add_post("/messages", self.add_message)
        app.router.add_post("/drop", self.drop)
        app.router.add_get("/wait/received", self.wait_received)
        app.router.add_get("/wait/stored", self.wait_stored)
        return app

    def snapshot(self) -> dict[str, Any]:
        stored = self.coderd.snapshots.get(self.task)
        return {
            "agentapi": {
                "messages": len(self.agent.messages),
                "status": self.agent.status,
                "subscribers": self.agent.subscribers,
                "received": [list(r) for r in self.agent.received],
            },
            "coderd": {
                "uploads": [{"status": u.status, "wall": u.wall, "bytes": len(u.body)}
                            for u in self.coderd.uploads],
                "stored_messages": None if stored is None else len(json.loads(stored)["messages"]),
                "stored_is_current": stored == self.agent.packed(),
            },
        }

    async def ready(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def state(self, _: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def add_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        message = self.agent.add_message(str(body["role"]), str(body["content"]))
        return web.json_response({"id": message.id, "messages": len(self.agent.messages)})

    async def drop(self, _: web.Request) -> web.Response:
        cut = self.agent.subscribers
        self.agent.drop_subscribers(clean=False)
        return web.json_response({"cut": cut})

    async def wait_received(self, request: web.Request) -> web.Response:
        text = request.query["text"]
        return await self._until(request, self.agent.changed,
                                 lambda: ["user", text] in self.snapshot()["agentapi"]["received"])

    async def wait_stored(self, request: web.Request) -> web.Response:
        after = float(request.query.get("after", "0"))

        def stored() -> bool:
            fresh = any(u.status == 204 and u.wall >= after for u in self.coderd.uploads)
            return fresh and self.coderd.snapshots.get(self.task) == self.agent.packed()

        return await self._until(request, self.coderd.stored, stored)

    async def _until(self, request: web.Request, wake: asyncio.Event,
                     predicate: Callable[[], bool]) -> web.Response:
        timeout_s = min(float(request.query.get("timeout_s", "10")), MAX_WAIT_S)
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    wake.clear()
                    await wake.wait()
        except TimeoutError:
            return web.json_response(self.snapshot(), status=504)
        return web.json_response(self.snapshot())


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace, token: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent_host, agent_port = host_port(args.agentapi)
    coderd_host, coderd_port = host_port(args.coderd)
    control_host, control_port = host_port(args.control)
    task = uuid.UUID(args.task_id)
    agent = WatchedAgentAPI(host=agent_host, port=agent_port)
    async with agent, FakeCoderd(token=token, host=coderd_host, port=coderd_port) as coderd:
        coderd.tasks.add(task)
        runner, _ = await serve_loopback(Control(agent, coderd, task).app(), control_host,
                                         control_port)
        try:
            Notifier().ready(f"agentapi on {args.agentapi}, coderd on {args.coderd}")
            print(f"stand-ins ready: agentapi {agent.url}, coderd {coderd.url}, "
                  f"control http://{args.control}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task-id", required=True, help="the task coderd accepts uploads for")
    parser.add_argument("--agentapi", default="127.0.0.1:3284", metavar="HOST:PORT")
    parser.add_argument("--coderd", default="127.0.0.1:3285", metavar="HOST:PORT")
    parser.add_argument("--control", default="127.0.0.1:3286", metavar="HOST:PORT")
    args = parser.parse_args()
    token = os.environ.get("CODER_AGENT_TOKEN")
    if not token:
        sys.exit("standins_service: set CODER_AGENT_TOKEN (the token coderd accepts)")
    asyncio.run(serve(args, token))


if __name__ == "__main__":
    main()
