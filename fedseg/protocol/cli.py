"""``fedseg run``: the coordinator role. Only click is imported at module level."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["adapt", "run", "plan_from_options"]

# CLI options that map onto plan keys; the rest of the plan comes from --plan or defaults.
_TOP = ("rounds", "image_size", "seed", "timeout_s", "min_nodes", "overlays")
_MODEL = ("width", "depth", "in_channels", "norm")
_TRAIN = ("lr", "batch_size", "local_epochs", "threads")
_FEDMIX = ("lam", "beta", "tau", "adaptive")
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
        for option, key in names.items():
            if options.get(option) is not None:
                plan.setdefault(section, {})[key] = options[option]
    if options.get("algorithm"):
        plan["algorithm"] = options["algorithm"]
    width = plan.get("model", {}).get("width")
    if width is not None and "groups" not in plan["model"]:
        plan["model"]["groups"] = min(8, width)
    return plan


@click.command()
@click.option("--invite", "invites", multiple=True, type=click.Path(path_type=Path), help="A node's invite.json (repeat per node).")
@click.option("--algorithm", type=click.Choice(["fedavg", "fedmix", "local", "ft", "fedbn", "fedrep", "iopfl", "lcfed"]), default=None,
              help="fedavg (pixel-labelled nodes train), fedmix (every label kind trains), or a personalized method: "
                   "local (nothing shared), ft (FedAvg, scored after local fine-tuning), fedbn (norm layers stay local), "
                   "fedrep (head stays local), iopfl (each node also keeps a running mix of its models), "
                   "lcfed (site channel selection and a local head, then head calibration) [default: fedavg].")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory for checkpoints, metrics, report and plot.")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue the run in this directory from its last completed round.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, help="Plan JSON; options below override it.")
@click.option("--rounds", type=click.IntRange(1), default=None)
@click.option("--image-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--width", type=int, default=None, help="U-Net channels at the first level.")
@click.option("--depth", type=int, default=None, help="U-Net down-samplings.")
@click.option("--in-channels", type=click.Choice(["1", "3"]), default=None, help="1 = grey, 3 = RGB.")
@click.option("--norm", type=click.Choice(["group", "batch"]), default=None, help="U-Net normalization [default: group]; "
              "batch for IOP-FL's norm-statistics baseline.")
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--local-epochs", type=float, default=None)
@click.option("--threads", type=int, default=None, help="torch threads per node.")
@click.option("--timeout-s", type=float, default=None, help="How long to wait for one node per step.")
@click.option("--min-nodes", type=int, default=None, help="Nodes that must answer for a round to count (0 = all).")
@click.option("--overlays", type=int, default=None, help="Prediction overlays each node writes into its own workdir per evaluation.")
@click.option("--lam", type=float, default=None, help="FedMix λ: weight of the loss share in the aggregation weights.")
@click.option("--beta", type=float, default=None, help="FedMix β: exponent on the losses.")
@click.option("--tau", type=float, default=None, help="FedMix τ: agreement needed to accept a pseudo-label.")
@click.option("--adaptive/--no-adaptive", default=None, help="FedMix adaptive aggregation weights (--no-adaptive: plain n_k, the ablation).")
@click.option("--alpha", type=float, default=None, help="IOP-FL: weight of the previous running mix (default 0.1).")
@click.option("--mix-epochs", type=float, default=None, help="IOP-FL: local epochs a node trains a copy of its round's model "
              "before mixing it in, so personalized models specialize (default 0: the round's model itself).")
@click.option("--head-fraction", type=float, default=None, help="FedRep, LC-Fed: share of each round spent on the head (default 0.2).")
@click.option("--contrastive-weight", type=float, default=None, help="LC-Fed: weight of the contrastive site loss (default 0.1; 0 = the ablation).")
@click.option("--hc-epochs", type=float, default=None, help="LC-Fed: local epochs that train the calibration head (default 5).")
@click.option("--finetune-epochs", type=float, default=None, help="FT: local fine-tuning epochs before scoring (default 1).")
@click.option("--full-masks", is_flag=True, default=False, help="Benchmark upper bound: nodes whose weak labels came from masks train on the masks.")
@click.option("--secure-aggregation", is_flag=True, default=False,
              help="The coordinator learns only the weighted sum of the updates (masked, t-of-n recoverable from dropouts).")
@click.option("--secagg-threshold", type=int, default=None, help="Secure aggregation: nodes that must survive to unmask (default: a majority).")
@click.option("--secagg-clip", type=float, default=None, help="Secure aggregation: clip bound of update values (default 8); clipped values are counted and reported.")
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
    rows = run_federation(plan, transports, out, ConsoleReporter(plan.rounds), [str(p) for p in invite_paths], resume is not None)
    return rows, out, plan


@click.command()
@click.option("--invite", "invite", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False), help="The new site's invite.json.")
@click.option("--from", "run_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="A run directory of `fedseg run`.")
@click.option("--epochs", type=float, default=None, help="Passes over the new site's images [default: 10].")
@click.option("--lr", type=float, default=None, help="Adam learning rate of the routers and norm parameters [default: 1e-3].")
@click.option("--batch-size", type=int, default=None, help="Images per step [default: 8].")
@click.option("--routing", type=click.Choice(["softmax", "sigmoid"]), default=None, help="Expert weights [default: softmax].")
@click.option("--threads", type=int, default=None, help="torch threads on the new node [default: 1].")
@click.option("--keep-margin", type=float, default=None, help="Keep the adapted routing only if it agrees with the experts' "
              "majority vote this much more (mean Dice) than routing before adaptation [default: 0.01].")
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
