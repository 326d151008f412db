"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

from agent_sidecar.config import Settings, env_names

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
