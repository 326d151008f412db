"""`agent-sidecar snapshot`: read agentapi once, pack, print or upload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

from agent_sidecar.agentapi import AgentAPIError, AgentAPIUnavailable
from agent_sidecar.coder import tasks_unavailable
from agent_sidecar.config import ConfigError, Settings
from agent_sidecar.daemon import log_url_warnings
from agent_sidecar.pipeline import Pipeline, StartupError
from agent_sidecar.snapshot import pack


async def snapshot(settings: Settings, *, output: Path | None, upload: bool,
                   timeout_s: float) -> int:
    """Exit code: 0 done, 1 agentapi unreachable or the upload failed (Tasks unavailable
    included).

    Raises ConfigError when uploading is asked for but not configured, or the token file
    or the proxy cannot be used. Uses the daemon's own pipeline: the same client (proxies,
    redirects, response caps), packer, cap search and retries.
    """
    if upload and (reason := settings.uploads_disabled_reason):
        raise ConfigError(f"cannot upload: {reason}")
    # Only what this command does: no sink, and no token unless it uploads.
    only = {"sink_dir": None} if upload else {"sink_dir": None, "coder_url": None}
    async with contextlib.AsyncExitStack() as stack:
        try:
            pipeline = await stack.enter_async_context(
                Pipeline(settings.model_copy(update=only)))
        except StartupError as exc:
            raise ConfigError(str(exc)) from None
        if upload:
            log_url_warnings(settings)
        conversation = pipeline.conversation
        try:
            # Into the model, which keeps what a snapshot can use, not the whole history.
            await pipeline.agentapi.read_messages(conversation.retain_chars, conversation.upsert)
        except (AgentAPIUnavailable, AgentAPIError) as exc:
            print(f"agent-sidecar: cannot read the conversation: {exc}", file=sys.stderr)
            return 1
        messages = conversation.messages()
        packed = pack(messages, settings.max_snapshot_bytes)
        if output is not None:
            await asyncio.to_thread(output.write_bytes, packed.body)
        elif not upload:
            sys.stdout.buffer.write(packed.body + b"\n")
            sys.stdout.flush()
        if not upload:
            return 0
        if not conversation.has_user:
            print("agent-sidecar: nothing uploaded: the conversation has no user message, "
                  "and uploading it would replace the stored history", file=sys.stderr)
            return 0
        uploader = pipeline.uploader
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                delivered = await uploader.flush()
        except TimeoutError:
            delivered = False
        if delivered:
            stored = uploader.last_accepted or b""  # smaller than packed if a front said 413
            count = len(json.loads(stored)["messages"]) if stored else 0
            print(f"agent-sidecar: uploaded {count} messages, {len(stored)} bytes",
                  file=sys.stderr)
            return 0
        if uploader.state == "tasks_unavailable" and pipeline.coder is not None:
            coder = pipeline.coder
            if coder.coderd_version is None and deadline > loop.time():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await coder.read_buildinfo()  # only to word the message
            why = tasks_unavailable(coder.coderd_version, coder.buildinfo_missing)
            print(f"agent-sidecar: upload failed: Tasks unavailable "
                  f"({uploader.last_outcome}): {why}; nothing was stored", file=sys.stderr)
            return 1
        print(f"agent-sidecar: upload failed: {uploader.last_outcome or 'timed out'}",
              file=sys.stderr)
        return 1
