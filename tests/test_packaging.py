"""What the wheel ships: the product and its type information, never the test stand-ins."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_simulator_but_no_test_stand_in(tmp_path: Path) -> None:
    """`pip wheel` builds a wheel with the package, py.typed and the demo's simulator, and
    without the stand-ins for agentapi and coderd that tests and CI use."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True)
    [wheel] = tmp_path.glob("agent_sidecar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent_sidecar/py.typed" in names
    assert "agent_sidecar/simulator.py" in names
    assert not [n for n in names if n.startswith(("standins/", "tests/")) or "testing" in n]
    for name in names:
        if name.endswith(".py"):
            text = zipfile.ZipFile(wheel).read(name).decode()
            assert "FakeCoderd" not in text, name
            assert "FakeAgentAPI" not in text, name
