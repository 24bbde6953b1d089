"""What every fedseg option's help shows: its default, also where the default is described in words.

Options whose value falls back to the plan or to another option have ``default=None`` and
a ``show_default`` string; click would print that string in parentheses, so this option
class prints it as it prints any other default.
"""
from __future__ import annotations

from typing import Any

import click

__all__ = ["Option", "option"]


class Option(click.Option):
    """A click option that shows a ``show_default`` string as the default itself."""

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


def option(*param_decls: str, **attrs: Any) -> Any:
    """``click.option`` with :class:`Option`."""
    attrs.setdefault("cls", Option)
    return click.option(*param_decls, **attrs)
