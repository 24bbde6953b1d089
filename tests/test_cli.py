"""The CLI starts fast: ``--help`` never imports torch or syft, and models never import syft."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["node"], ["node", "start"], ["node", "predict"], ["run"], ["adapt"], ["demo"], ["audit"], ["audit", "verify"], ["audit", "report"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "root")
def test_help_imports_neither_torch_nor_syft(args):
    code = (
        "import sys\nfrom fedseg.cli import main\n"
        f"try:\n    main({args + ['--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'syft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout and "HEAVY []" in out.stdout


def test_models_and_protocol_logic_do_not_import_syft():
    code = (
        "import sys\nimport fedseg.models.local_training, fedseg.models.unet, fedseg.protocol.rounds, fedseg.protocol.messages\n"
        "import fedseg.node.actions\nprint('syft' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_dependencies_point_one_way():
    for path in (ROOT / "fedseg" / "models").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("fedseg.node", "fedseg.protocol", "syft"))}
        assert not bad, f"{path.name} imports {bad}"
    for path in (ROOT / "fedseg" / "protocol").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("fedseg.node")}
        # syft_action's body runs on the node's server, never in the coordinator.
        if path.name != "syft_action.py":
            assert not bad, f"{path.name} imports {bad}"
