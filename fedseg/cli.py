"""The ``fedseg`` command: a lazy root so ``fedseg --help`` never imports torch or syft."""
from __future__ import annotations

import importlib
from typing import Any

import click

__all__ = ["main"]

# Each subcommand module imports only click at top level; heavy imports live in callbacks.
SUBCOMMANDS: dict[str, str] = {
    "node": "fedseg.node.cli:node",
    "run": "fedseg.protocol.cli:run",
    "adapt": "fedseg.protocol.cli:adapt",
    "demo": "fedseg.demo:demo",
    "audit": "fedseg.audit_cli:audit",
    "export": "fedseg.export_cli:export",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Any:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="fedseg")
def main() -> None:
    """Federated segmentation: hospitals keep their images; only training updates move."""
