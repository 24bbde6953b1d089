"""Terminal progress of a federated run: one line per round and the per-site table."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.status import Status
from rich.table import Table

from .report import site_table

__all__ = ["ConsoleReporter", "print_site_table"]


class ConsoleReporter:
    """Prints each round as it completes: time, training loss and Dice per site."""

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.rounds = rounds
        self.console = console or Console(highlight=False)
        self._status: Status | None = None

    def info(self, text: str) -> None:
        self._clear()
        self.console.print(f"[dim]{text}[/dim]")

    def step(self, text: str) -> None:
        # A spinner only on a terminal; logs and CI output get the per-round lines alone.
        if not self.console.is_terminal:
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
            self.console.print(f"calibration  {summary['seconds']:6.1f} s  val Dice calibrated: {calibrated}")
            return
        self.console.print(
            f"round {round_:>3}/{self.rounds}  {summary['seconds']:6.1f} s  {loss}val Dice: {per_site}"
        )


def print_site_table(rows: list[dict[str, Any]], round_: int, title: str, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    table_rows = site_table(rows, round_)
    table = Table(title=title)
    for i, header in enumerate(table_rows[0]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in table_rows[1:]:
        table.add_row(*row)
    console.print(table)
