"""agent-sidecar: keep Coder's task log snapshot fresh and relay input to the agent.

The embedding API is `serve(settings, controls)` with the `Settings` model:

    from agent_sidecar import Settings, serve
    exit_code = await serve(Settings(agentapi_url="http://localhost:3284"))

`serve()` runs until `controls.shutdown` is set or until its task is cancelled; either way
it makes the graceful shutdown (the final upload included, within `shutdown_timeout_s`)
before it returns or re-raises the cancel. It installs no signal handlers and never
configures logging. These names are resolved on first use, so that the light client
(`check`, `status`, `send`) never imports the daemon's dependencies.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`'s: importing typing is a cost every health probe pays
if TYPE_CHECKING:
    from typing import Any

    from agent_sidecar.config import Settings
    from agent_sidecar.daemon import Controls, serve

__all__ = ["Controls", "Settings", "__version__", "serve"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("agent-sidecar")
        except PackageNotFoundError:  # a source tree that was never installed
            value = "0.0.0+unknown"
    elif name == "Settings":
        from agent_sidecar.config import Settings as value
    elif name in ("serve", "Controls"):
        from agent_sidecar import daemon

        value = getattr(daemon, name)
    else:
        raise AttributeError(f"module 'agent_sidecar' has no attribute {name!r}")
    globals()[name] = value
    return value
