"""`agent-sidecar snapshot`: read agentapi once, pack, print or upload."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent_sidecar.agentapi import AgentAPIError, AgentAPIUnavailable
from agent_sidecar.config import ConfigError, Settings
from agent_sidecar.pipeline import Pipeline, StartupError
from agent_sidecar.snapshot import pack


async def snapshot(settings: Settings, *, output: Path | None, upload: bool,
                   timeout_s: float) -> int:
    """Exit code: 0 done, 1 agentapi unreachable or the upload failed.

    Raises ConfigError when uploading is asked for but not configured, or the token file
    cannot be read. Uses the daemon's own pipeline: the same client, packer and retries.
    """
    if upload and (reason := settings.uploads_disabled_reason):
        raise ConfigError(f"cannot upload: {reason}")
    # Only what this command does: no sink, and no token unless it uploads.
    only = {"sink_dir": None} if upload else {"sink_dir": None, "coder_url": None}
    try:
        pipeline = Pipeline(settings.model_copy(update=only))
    except StartupError as exc:
        raise ConfigError(str(exc)) from None
    async with pipeline:
        conversation = pipeline.conversation
        try:
            messages = await pipeline.agentapi.messages(conversation.retain_chars)
        except (AgentAPIUnavailable, AgentAPIError) as exc:
            print(f"agent-sidecar: cannot read the conversation: {exc}", file=sys.stderr)
            return 1
        packed = pack(messages, settings.max_snapshot_bytes)
        if output is not None:
            await asyncio.to_thread(output.write_bytes, packed.body)
        elif not upload:
            sys.stdout.buffer.write(packed.body + b"\n")
            sys.stdout.flush()
        if not upload:
            return 0
        conversation.replace(messages, None)
        if not conversation.has_user:
            print("agent-sidecar: nothing uploaded: the conversation has no user message, "
                  "and uploading it would replace the stored history", file=sys.stderr)
            return 0
        uploader = pipeline.uploader
        try:
            async with asyncio.timeout(timeout_s):
                delivered = await uploader.flush()
        except TimeoutError:
            delivered = False
        if delivered:
            print(f"agent-sidecar: uploaded {packed.messages} messages, {packed.size} bytes",
                  file=sys.stderr)
            return 0
        print(f"agent-sidecar: upload failed: {uploader.last_outcome or 'timed out'}",
              file=sys.stderr)
        return 1
