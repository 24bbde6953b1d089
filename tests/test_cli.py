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
    for path in (ROOT / "fedseg" / "models").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("fedseg.node", "fedseg.protocol", "syft"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "fedseg" / "protocol").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("fedseg.node")}
        # syft_action's body runs on the node's server, never in the coordinator.
        if path.name != "syft_action.py":
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _options(command, path=()):
    import click

    if isinstance(command, click.Group):
        for name in command.list_commands(None):
            yield from _options(command.get_command(None, name), (*path, name))
    else:
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                yield " ".join(path), param


def test_every_option_with_a_default_shows_it():
    from fedseg.cli import main

    import click

    def off_flag(opt: click.Option) -> bool:
        # A plain on/off flag defaults to off, which its absence already says.
        return opt.is_flag and not opt.secondary_opts and not opt.get_default(click.Context(main), call=False)

    missing = [f"{cmd} {opt.opts[0]}" for cmd, opt in _options(main)
               if not (opt.required or opt.multiple or off_flag(opt) or opt.show_default)]
    assert not missing, f"options whose --help hides their default: {missing}"


def test_run_shows_the_plans_own_defaults():
    """`fedseg run`'s options default to the plan's values: what --help shows must be those."""
    from fedseg.cli import main
    from fedseg.protocol.cli import plan_from_options
    from fedseg.protocol.plan import Plan

    defaults, marker, checked = Plan().to_dict(), 98765.25, 0  # a value no default has
    for cmd, opt in _options(main):
        if cmd != "run" or not isinstance(opt.show_default, str):
            continue
        placed = plan_from_options({}, {opt.name: marker})
        path = [(section, key) for section, values in placed.items() if isinstance(values, dict)
                for key, value in values.items() if value == marker]
        path += [(key, None) for key, value in placed.items() if value == marker]
        if not path or opt.name == "in_channels":  # in_channels: the nodes' own, checked end to end
            continue
        section, key = path[0]
        value = defaults[section] if key is None else defaults[section][key]
        shown = opt.show_default.split(" ")[0]
        expected = {True: opt.name, False: f"no-{opt.name}"}.get(value, str(value)) if isinstance(value, bool) else str(value)
        assert shown == expected, f"run {opt.opts[0]} shows default {shown!r}, the plan's is {expected!r}"
        checked += 1
    assert checked >= 20


def test_adapt_shows_the_adapt_configs_own_defaults():
    from fedseg.cli import main
    from fedseg.models.routing import AdaptConfig

    defaults = AdaptConfig().to_dict()
    shown = {opt.name: opt.show_default for cmd, opt in _options(main) if cmd == "adapt" and opt.name in defaults}
    assert shown and shown == {name: str(defaults[name]) for name in shown}
