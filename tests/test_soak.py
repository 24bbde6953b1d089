"""Load: real nodes through many short rounds, with memory and file descriptors flat.

The suite runs a short version; ``python scripts/soak.py`` runs the full one (8 nodes, 30
rounds). Select or skip it with ``-m soak`` / ``-m "not soak"``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


@pytest.mark.soak
def test_short_soak_completes_every_round_without_leaks(federation, tmp_path):
    # The session's nodes, already serving: the suite pays for the rounds, not for starting nodes.
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = subprocess.run([sys.executable, str(SCRIPT), *invites, "--rounds", "8", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "soak.json").read_text())
    checks = report["checks"]
    assert checks["rounds_complete"], result.stdout[-2000:]
    assert checks["fds_pass"], checks["fds"]
    assert checks["rss_pass"], checks["rss"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
