"""`agent-sidecar demo`: the whole pipeline against a simulated agent, with nothing installed."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp

from agent_sidecar import logs
from agent_sidecar.aio import first_of
from agent_sidecar.config import Settings
from agent_sidecar.daemon import Controls, serve
from agent_sidecar.simulator import SimulatedAgentAPI
from agent_sidecar.snapshot import Packed

PROMPT = "Summarise what this repository does, in three bullet points."


def _reply(prompt: str) -> str:
    box = "┌─ plan " + "─" * 30 + "┐\n│ read README, skim src/, answer │\n└" + "─" * 37 + "┘"
    return (f"{box}\n\nYou asked: {prompt!r}\n\n"
            "• It follows agentapi's conversation over SSE.\n"
            "• It packs it into Coder's 64 KiB log-snapshot body.\n"
            "• It uploads it with retries, and relays input over a private socket.")


def _say(text: str) -> None:
    print(text, flush=True)


async def _send(socket: Path, text: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s, \
            s.post("http://sidecar/send", json={"input": text}) as resp:
        return resp.status, await resp.text()


async def demo(*, once: bool, directory: Path | None, stop: asyncio.Event) -> int:
    directory = directory or Path(tempfile.mkdtemp(prefix="agent-sidecar-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    logs.configure("warning", "console" if sys.stderr.isatty() else "json")
    agent = SimulatedAgentAPI(reply=_reply, chunks=10, chunk_delay_s=0.08, stable_after_s=0.6)
    agent.messages[0].content = "Simulated agent ready. Waiting for a prompt."
    snapshots: asyncio.Queue[Packed] = asyncio.Queue()

    def on_snapshot(packed: Packed, how: str) -> None:
        _say(f"  snapshot {how}: {packed.messages} messages, {packed.size} bytes, "
             f"{'truncated' if packed.truncated else 'not truncated'}")
        snapshots.put_nowait(packed)

    async with agent:
        settings = Settings(
            agentapi_url=agent.url,
            # Never a real Coder from the environment: the demo writes to its sink only.
            coder_url=None, coder_token=None, coder_token_file=None, task_id=None,
            sink_dir=directory / "sink",
            socket=directory / "relay.sock",
            settle_s=0.2,
            max_staleness_s=1.0,
        )
        controls = Controls()
        daemon = asyncio.create_task(serve(settings, controls, on_snapshot=on_snapshot))
        try:
            await first_of(controls.ready.wait(), daemon)
            if daemon.done():
                return daemon.result() or 1
            _say(f"simulated agentapi  {agent.url}")
            _say(f"relay socket        {settings.socket}")
            _say(f"snapshot sink       {settings.sink_dir}/{settings.sink_name}")
            _say(f"sending a prompt through the relay: {PROMPT!r}")
            status, text = await _send(settings.socket, PROMPT)
            if status != 204:
                _say(f"the relay refused the prompt: {status} {text}")
                return 1
            _say("  delivered; the agent is replying")
            if once:
                async with asyncio.timeout(30):
                    await agent.wait_idle()
                    while True:
                        packed = await snapshots.get()
                        if b"relays input over a private socket" in packed.body:
                            break
                _say("the final state of the exchange is in the sink; done")
                return 0
            _say("running until Ctrl+C; try another prompt from a second terminal:")
            _say(f"  agent-sidecar send --socket {settings.socket} 'hello'")
            _say(f"  agent-sidecar status --socket {settings.socket}")
            await first_of(stop.wait(), daemon)
            return 0
        finally:
            controls.shutdown.set()
            code = await daemon
            if code:
                _say(f"the sidecar exited with {code}")
