"""`agent-sidecar snapshot`: read agentapi once, pack, print or upload."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from agent_sidecar import logs
from agent_sidecar.agentapi import AgentAPI, AgentAPIError, AgentAPIUnavailable
from agent_sidecar.coder import CoderClient
from agent_sidecar.config import ConfigError, Settings
from agent_sidecar.conversation import Conversation
from agent_sidecar.daemon import RETAIN_CHARS, policy_of
from agent_sidecar.snapshot import pack
from agent_sidecar.tokens import TokenError, TokenSource
from agent_sidecar.uploader import Uploader

log = logs.get("snapshot")


async def snapshot(settings: Settings, *, output: Path | None, upload: bool,
                   timeout_s: float) -> int:
    """Exit code: 0 done, 1 agentapi unreachable or the upload failed; ConfigError if unset."""
    tokens = None
    if upload:
        if reason := settings.uploads_disabled_reason:
            raise ConfigError(f"cannot upload: {reason}")
        try:
            token = settings.coder_token.get_secret_value() if settings.coder_token else None
            tokens = TokenSource(token, settings.coder_token_file)
        except TokenError as exc:
            raise ConfigError(str(exc)) from None
    async with aiohttp.ClientSession() as session:
        agentapi = AgentAPI(session, settings.agentapi_url)
        try:
            messages = await agentapi.messages(RETAIN_CHARS)
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
        assert tokens is not None
        assert settings.coder_url is not None
        assert settings.task_id is not None
        conversation = Conversation(RETAIN_CHARS)
        conversation.replace(messages, None)
        client = CoderClient(session, settings.coder_url, settings.task_id, tokens,
                             settings.upload_timeout_s)
        uploader = Uploader(conversation, policy_of(settings), client, sink=None)
        if not conversation.has_user:
            print("agent-sidecar: nothing uploaded: the conversation has no user message, "
                  "and uploading it would replace the stored history", file=sys.stderr)
            return 0
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
