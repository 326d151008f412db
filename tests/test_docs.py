"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

from agent_sidecar.config import Settings, env_names
from agent_sidecar.metrics import UPLOAD_STATES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented_with_its_environment_variables() -> None:
    """The settings table has a row for each setting, naming all its environment variables."""
    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines()
            if line.startswith("| `")}
    for name in Settings.model_fields:
        assert name in rows, name
        for env in env_names(name):
            assert f"`{env}`" in rows[name], env


def test_quick_start_is_two_commands() -> None:
    """The quick start has exactly two commands: the demo, and the tests."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1].strip() for b in section.split("```sh")[1:]]
    commands = [b.split("```")[0].strip() for b in blocks]
    assert len(commands) == 2
    assert commands[0].endswith("agent-sidecar demo")
    assert commands[1].endswith(".venv/bin/pytest")


def section(title: str) -> str:
    """The text of the README section with this title, up to the next one of its level."""
    level = "#" * (len(title) - len(title.lstrip("#")))
    body = README.split(f"\n{title}\n", 1)[1]
    return body.split(f"\n{level} ", 1)[0]


def test_the_version_matrix_says_which_coder_serves_the_endpoint_and_what_happens_on_others(
) -> None:
    """The README's Coder version matrix names each release line, whether it serves the
    log-snapshot endpoint, the CODER_ENABLE_AI_TASKS flag, and the sidecar's state on the
    others; it never advises upgrading."""
    text = section("## Coder versions and modules")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| v")}
    assert set(rows) == {"v2.28 to v2.33", "v2.34 (the ESR, supported until about June 2027), "
                         "v2.35", "v2.36", "v2.37 and later"}
    assert "uploads" in rows["v2.28 to v2.33"]
    assert "CODER_ENABLE_AI_TASKS=true" in rows["v2.36"]
    assert "`tasks_unavailable`" in rows["v2.36"]
    assert "removed" in rows["v2.37 and later"]
    assert "`tasks_unavailable`" in rows["v2.37 and later"]
    for behaviour in ("/healthz` 200", "check` exits 0", "re-checks", "`rejected_backoff_s`",
                      "relaying input", "coderd.version"):
        assert behaviour in text, behaviour
    assert "upgrade" not in README.lower()


def test_every_upload_state_is_documented() -> None:
    """Each upload state /status and the metrics can show is named in the README."""
    text = section("### Health means stored")
    for state in UPLOAD_STATES:
        assert f"`{state}`" in text, state


def test_the_template_wiring_covers_each_module_family_with_advice_that_can_be_followed(
) -> None:
    """Each module family has its wiring: claude-code and codex 4.x (their stop script cannot
    be turned off; the sidecar writes after it), the modules pinned to agentapi module 1.2
    or 2.0 (no snapshot of their own; the sidecar is the only one), and the agentapi module
    used directly (task_log_snapshot = false, and the sidecar wins without it). Turning the
    snapshot off is never advised where it cannot be done."""
    text = section("## Coder versions and modules")
    rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert len(rows) == 3
    wrapped, pinned, direct = rows
    assert "**claude-code 4.x**" in wrapped
    assert "**codex 4.x**" in wrapped
    assert "cannot be turned off" in wrapped
    assert "nothing to turn off" in wrapped
    assert "uploads after the script" in wrapped
    assert "task_log_snapshot = false" not in wrapped
    for module in ("goose", "aider", "auggie", "copilot", "cursor-cli", "opencode", "amp",
                   "kiro"):
        assert module in pinned, module
    assert "2.0.0" in pinned
    assert "1.2.0" in pinned
    assert "no snapshot of their own" in pinned
    assert "the only producer" in pinned
    assert "**the agentapi module used directly** (2.1 and later)" in direct
    assert "set `task_log_snapshot = false`" in direct
    assert "also wins without it" in direct
    # The advice that could not be followed is gone everywhere.
    for line in README.splitlines():
        if "task_log_snapshot = false" in line and "directly" not in line:
            assert "wraps" not in line, line
            assert "claude-code" not in line, line
