"""``fedseg run``: the coordinator role. Only click is imported at module level."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fedseg.cli_help import option

__all__ = ["adapt", "run", "plan_from_options"]

# CLI options that map onto plan keys; the rest of the plan comes from --plan or defaults.
_TOP = ("rounds", "image_size", "seed", "timeout_s", "min_nodes", "overlays", "aggregation")
_MODEL = ("width", "depth", "in_channels", "norm")
_TRAIN = ("lr", "batch_size", "local_epochs", "threads")
_FEDMIX = ("lam", "beta", "tau", "adaptive", "box_projection")
_PERSONAL = ("alpha", "mix_epochs", "head_fraction", "finetune_epochs")
#: LC-Fed option name -> its key in plan.lcfed ("alpha" there is the contrastive weight).
_LCFED = {"contrastive_weight": "alpha", "hc_epochs": "hc_epochs"}
_SECAGG = {"secagg_threshold": "threshold", "secagg_clip": "clip"}


def plan_from_options(base: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Overlays the options the user gave on a plan dict (unset options keep the plan's values)."""
    plan = json.loads(json.dumps(base))
    for key in _TOP:
        if options.get(key) is not None:
            plan[key] = options[key]
    for flag in ("full_masks", "secure_aggregation"):
        if options.get(flag):
            plan[flag] = True
    sections = [("model", _MODEL), ("train", _TRAIN), ("fedmix", _FEDMIX), ("personal", _PERSONAL), ("lcfed", _LCFED), ("secagg", _SECAGG)]
    for section, keys in sections:
        names = keys if isinstance(keys, dict) else {k: k for k in keys}
        for name, key in names.items():
            if options.get(name) is not None:
                plan.setdefault(section, {})[key] = options[name]
    if options.get("algorithm"):
        plan["algorithm"] = options["algorithm"]
    width = plan.get("model", {}).get("width")
    if width is not None and "groups" not in plan["model"]:
        plan["model"]["groups"] = min(8, width)
    return plan


@click.command()
@option("--invite", "invites", multiple=True, type=click.Path(path_type=Path), help="A node's invite.json (repeat per node).")
@option("--algorithm", type=click.Choice(["fedavg", "fedmix", "local", "ft", "fedbn", "fedrep", "iopfl", "lcfed"]), default=None,
              show_default="fedavg",
              help="fedavg (pixel-labelled nodes train), fedmix (every label kind trains), or a personalized method: "
                   "local (nothing shared), ft (FedAvg, scored after local fine-tuning), fedbn (norm layers stay local), "
                   "fedrep (head stays local), iopfl (each node also keeps a running mix of its models), "
                   "lcfed (site channel selection and a local head, then head calibration).")
@option("--out", type=click.Path(path_type=Path), show_default="none, required without --resume",
              help="Run directory for checkpoints, metrics, report and plot.")
@option("--resume", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Continue the run in this directory from its last completed round.")
@option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Plan JSON; options below override it, and the defaults shown are the plan's.")
@option("--rounds", type=click.IntRange(1), default=None, show_default="20")
@option("--image-size", type=int, default=None, show_default="128", help="Side in pixels images are resized to.")
@option("--seed", type=int, default=None, show_default="0")
@option("--width", type=int, default=None, show_default="16", help="U-Net channels at the first level.")
@option("--depth", type=int, default=None, show_default="4", help="U-Net down-samplings.")
@option("--in-channels", type=click.Choice(["1", "3"]), default=None, show_default="the nodes' channels",
              help="1 = grey, 3 = RGB. By default every node must hold the same kind; this option converts the others to it.")
@option("--norm", type=click.Choice(["group", "batch"]), default=None, show_default="group", help="U-Net normalization; "
              "batch for IOP-FL's norm-statistics baseline.")
@option("--lr", type=float, default=None, show_default="0.001", help="Adam learning rate.")
@option("--batch-size", type=int, default=None, show_default="8")
@option("--local-epochs", type=float, default=None, show_default="1.0", help="Passes over a node's training split per round.")
@option("--threads", type=int, default=None, show_default="1", help="torch threads per node.")
@option("--timeout-s", type=float, default=None, show_default="900.0", help="How long to wait for one node per step.")
@option("--min-nodes", type=int, default=None, show_default="0 = all", help="Nodes that must answer for a round to count.")
@option("--overlays", type=int, default=None, show_default="0", help="Prediction overlays each node writes into its own workdir per evaluation.")
@option("--aggregation", type=click.Choice(["samples", "uniform"]), default=None, show_default="samples",
        help="Averaging of the shared parameters: by each node's training images, or uniform 1/K.")
@option("--lam", type=float, default=None, show_default="10.0", help="FedMix λ: weight of the loss share in the aggregation weights.")
@option("--beta", type=float, default=None, show_default="1.5", help="FedMix β: exponent on the losses.")
@option("--tau", type=float, default=None, show_default="0.9", help="FedMix τ: agreement needed to accept a pseudo-label.")
@option("--adaptive/--no-adaptive", default=None, show_default="adaptive",
              help="FedMix adaptive aggregation weights (--no-adaptive: plain n_k, the ablation).")
@option("--box-projection", type=float, default=None, show_default="1.0",
        help="FedMix: weight of the loss that a box node's predictions span their boxes, on every box image (0: the paper's FedMix).")
@option("--alpha", type=float, default=None, show_default="0.1", help="IOP-FL: weight of the previous running mix.")
@option("--mix-epochs", type=float, default=None, show_default="0.0", help="IOP-FL: local epochs a node trains a copy of its round's model "
        "before mixing it in, so personalized models specialize (0: the round's model itself).")
@option("--head-fraction", type=float, default=None, show_default="0.2", help="FedRep, LC-Fed: share of each round spent on the head.")
@option("--contrastive-weight", type=float, default=None, show_default="0.1", help="LC-Fed: weight of the contrastive site loss (0 = the ablation).")
@option("--hc-epochs", type=float, default=None, show_default="50.0", help="LC-Fed: local epochs that train the calibration head.")
@option("--finetune-epochs", type=float, default=None, show_default="1.0", help="FT: local fine-tuning epochs before scoring.")
@option("--full-masks", is_flag=True, default=False, help="Benchmark upper bound: nodes whose weak labels came from masks train on the masks.")
@option("--secure-aggregation", is_flag=True, default=False,
              help="The coordinator learns only the weighted sum of the updates (masked, t-of-n recoverable from dropouts).")
@option("--secagg-threshold", type=int, default=None, show_default="0 = a majority", help="Secure aggregation: nodes that must survive to unmask.")
@option("--secagg-clip", type=float, default=None, show_default="8.0",
              help="Secure aggregation: clip bound of update values; clipped values are counted and reported.")
def run(invites: tuple[Path, ...], out: Path | None, resume: Path | None, plan_file: Path | None, **options: Any) -> None:
    """Run federated rounds across the nodes in the invites."""
    from fedseg.protocol.errors import ProtocolError

    if options.get("in_channels") is not None:
        options["in_channels"] = int(options["in_channels"])
    try:
        rows, out_dir, plan = _run(invites, out, resume, plan_file, options)
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    from fedseg.protocol.progress import print_site_table
    from fedseg.protocol.report import best_round

    best = best_round(rows)
    print_site_table(rows, best, f"Per-site test figures at round {best} (best validation Dice)")
    click.echo(f"report: {out_dir / 'report.md'}   curves: {out_dir / 'dice.png'}")


def _run(invites, out, resume, plan_file, options):  # noqa: ANN001, ANN202 - thin glue over typed calls
    from fedseg.protocol.errors import PlanError, ProtocolError
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.progress import ConsoleReporter
    from fedseg.protocol.rounds import run_federation
    from fedseg.protocol.run_store import RunStore
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.syft_transport import SyftTransport

    if resume is not None:
        if invites or plan_file:
            raise ProtocolError("--resume takes the invites and plan from the run directory; do not pass --invite or --plan")
        state, _ = RunStore(resume).load()
        base, invite_paths, out = state.plan, [Path(p) for p in state.invites], resume
    else:
        if not invites:
            raise ProtocolError("give at least one --invite (or --resume RUN_DIR)")
        if out is None:
            raise ProtocolError("give --out RUN_DIR for checkpoints and metrics")
        if (out / "checkpoint.npz").exists():
            raise ProtocolError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        base, invite_paths = {}, [p.resolve() for p in invites]
        if plan_file is not None:
            try:
                base = json.loads(plan_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise PlanError(f"plan {plan_file} cannot be read: {exc}") from None
    plan = Plan.from_dict(plan_from_options(base, options))
    transports = [SyftTransport(load_invite(p), approval_timeout_s=min(plan.timeout_s, 120)) for p in invite_paths]
    # Unless the user or the plan file chose the model's input, the nodes' images decide it.
    chosen = options.get("in_channels") is not None or "in_channels" in base.get("model", {})
    rows = run_federation(plan, transports, out, ConsoleReporter(plan.rounds), [str(p) for p in invite_paths], resume is not None,
                          channels_from_nodes=resume is None and not chosen)
    return rows, out, plan


@click.command()
@option("--invite", "invite", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False), help="The new site's invite.json.")
@option("--from", "run_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="A run directory of `fedseg run`.")
@option("--epochs", type=float, default=None, show_default="10.0", help="Passes over the new site's images.")
@option("--lr", type=float, default=None, show_default="0.001", help="Adam learning rate of the routers and norm parameters.")
@option("--batch-size", type=int, default=None, show_default="8", help="Images per step.")
@option("--routing", type=click.Choice(["softmax", "sigmoid"]), default=None, show_default="softmax", help="Expert weights.")
@option("--threads", type=int, default=None, show_default="1", help="torch threads on the new node.")
@option("--lambda-prior", type=float, default=None, show_default="10.0", help="Weight of the term that keeps the predicted lesion mass where "
        "it was before adapting; 0 is the paper's objective, whose entropy term can erase every lesion.")
@option("--keep-tolerance", type=float, default=None, show_default="0.05", help="Keep the adapted routing unless it agrees with the "
        "experts' majority vote more than this much less (mean Dice) than routing before adaptation.")
def adapt(invite: Path, run_dir: Path, **options: Any) -> None:
    """Adapt a run's models to a new hospital's unlabelled images (IOP-FL test-time routing).

    Sends the global model and each personalized model whose owner allowed it to leave,
    and nothing else; the adapted model stays on the new node, which reports only scores.
    """
    from fedseg.models.errors import ModelError
    from fedseg.models.routing import AdaptConfig
    from fedseg.protocol.adapt import adapt_new_site
    from fedseg.protocol.errors import ProtocolError
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.progress import ConsoleReporter
    from fedseg.protocol.run_store import RunStore
    from fedseg.protocol.syft_transport import SyftTransport

    try:
        settings = AdaptConfig.from_dict({k: v for k, v in options.items() if v is not None}).to_dict()
        state, _ = RunStore(run_dir).load()
        new_site = SyftTransport(load_invite(invite))
        originals = [SyftTransport(load_invite(Path(p))) for p in state.invites]
        outcome = adapt_new_site(run_dir, new_site, originals, settings, ConsoleReporter(rounds=0))
    except (ProtocolError, ModelError) as exc:
        raise click.ClickException(str(exc)) from None
    reply = outcome.reply
    click.echo(f"node {outcome.node} adapted over {reply.experts} experts ({', '.join(outcome.experts)}) "
               f"on {reply.n_images} images: {reply.steps} steps, {reply.seconds:.1f} s; the adapted model stays on the node")
    kept = "the adapted routing" if reply.adapted else "routing before adaptation (adapting did not bring it closer to the experts' majority vote)"
    click.echo(f"the node keeps {kept}: agreement {reply.agreement['adapted']:.4f} adapted, {reply.agreement['before']:.4f} before")
    if not reply.metrics:
        click.echo("the node holds no masks, so it reported no scores")
    for name, m in reply.metrics.items():
        click.echo(f"  {name:<10} Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  ({m['n']} images)")
    click.echo(f"recorded in {run_dir / 'adapt' / (outcome.node + '.json')}")
