"""Terminal progress of a federated run: one line per round and the per-site table.

On a terminal, progress within a round is a spinner. Written to a pipe or a log, the
output has no width to fit: lines are never wrapped and tables never cut site names,
and progress within a long round comes as a plain line at most every
:data:`PLAIN_PROGRESS_S` seconds.
"""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.status import Status
from rich.table import Table

from .report import site_table

__all__ = ["ConsoleReporter", "PLAIN_PROGRESS_S", "make_console", "print_site_table"]

#: Without a terminal, progress within a round is printed when nothing was for this long.
PLAIN_PROGRESS_S = 15.0
#: Width given to output that is not a terminal: wide enough that nothing wraps or is cut.
_UNBOUNDED = 10_000


def make_console() -> Console:
    """A console for fedseg's own output; one without width limits when stdout is not a terminal."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_UNBOUNDED, soft_wrap=True)
    return console


class ConsoleReporter:
    """Prints each round as it completes: time, training loss and Dice per site."""

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.rounds = rounds
        self.console = console or make_console()
        self._status: Status | None = None
        self._printed = time.monotonic()

    def _print(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)
        self._printed = time.monotonic()

    def info(self, text: str) -> None:
        self._clear()
        self._print(f"[dim]{text}[/dim]")

    def step(self, text: str) -> None:
        if not self.console.is_terminal:
            # A log gets a line only while a call runs long, so short rounds stay one line each.
            if time.monotonic() - self._printed >= PLAIN_PROGRESS_S:
                self._print(f"  ... {text}")
            return
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def _clear(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self._clear()
        per_site = "  ".join(f"{r['site']} {r['val_dice']:.3f}" for r in rows)
        loss = f"train loss {summary['train_loss']:.3f}  " if "train_loss" in summary else ""
        if summary.get("stage") == "calibration":
            calibrated = "  ".join(f"{r['site']} {r['personal_val_dice']:.3f}" for r in rows if "personal_val_dice" in r)
            self._print(f"calibration  {summary['seconds']:6.1f} s  val Dice calibrated: {calibrated}")
            return
        self._print(f"round {round_:>3}/{self.rounds}  {summary['seconds']:6.1f} s  {loss}val Dice: {per_site}")


def print_site_table(rows: list[dict[str, Any]], round_: int, title: str, console: Console | None = None) -> None:
    console = console or make_console()
    table_rows = site_table(rows, round_)
    table = Table(title=title)
    for i, header in enumerate(table_rows[0]):
        # Site names are never cut: on a narrow terminal the figure columns give way.
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows[1:]:
        table.add_row(*row)
    console.print(table)
