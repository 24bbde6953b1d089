"""``fedseg export``: a run's model as TorchScript plus its input contract and a model card."""
from __future__ import annotations

from pathlib import Path

import click

from fedseg.cli_help import option

__all__ = ["export"]


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path, exists=True, file_okay=False))
@option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="best: the round with the best validation Dice (as report.md chooses); last: the last completed round.")
@option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for model.pt, model.json and MODEL_CARD.md.")
def export(run_dir: Path, which: str, out: Path) -> None:
    """Export a run's global model: TorchScript (loads with torch alone), its preprocessing, a model card."""
    from fedseg.protocol.errors import ProtocolError
    from fedseg.protocol.export import export_run

    try:
        done = export_run(run_dir, which, out)
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported the {which} model of run {done.run_id} (round {done.round}): " + ", ".join(str(p) for p in done.files))
