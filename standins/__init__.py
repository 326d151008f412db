"""Stand-ins for agentapi and coderd, for the tests, the benchmarks, CI and deploy/test.

Not part of the wheel: the product ships only the simulated agent that `demo` runs on
(`agent_sidecar.simulator`). These add what a test needs on top of it: fault knobs,
scripted answers, and coderd's log-snapshot endpoint checked in coderd's order.
"""

from standins.agentapi import (
    STABILIZE_FAILURE,
    VERSIONS,
    FakeAgentAPI,
    FakeMessage,
    Version,
    now_rfc3339,
    problem,
    sse_event,
)
from standins.coderd import (
    FakeCoderd,
    Upload,
    coder_error,
    front_body_limit,
    nginx_page,
    redirecting,
)
from standins.proxy import ForwardProxy
from standins.waiting import drop_after_reading, hanging, wait_for_file

__all__ = [
    "STABILIZE_FAILURE",
    "VERSIONS",
    "FakeAgentAPI",
    "FakeCoderd",
    "FakeMessage",
    "ForwardProxy",
    "Upload",
    "Version",
    "coder_error",
    "drop_after_reading",
    "front_body_limit",
    "hanging",
    "nginx_page",
    "now_rfc3339",
    "problem",
    "redirecting",
    "sse_event",
    "wait_for_file",
]
