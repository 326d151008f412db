"""agent-sidecar: keep Coder's task log snapshot fresh and relay input to the agent."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agent-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
