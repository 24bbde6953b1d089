"""How long LC-Fed's head calibration (HC) needs to train: validation Dice against epochs.

Takes one LC-Fed run of ``bench_personalization.py`` (its shared weights and every node's
head after the last round) and, per site, trains HC from its seeded start for each number
of epochs, exactly as a node does in the calibration stage (:func:`train_hc_round`), then
scores it on the site's validation split beside the stage-1 model.

    python scripts/hc_epochs.py --bench runs/bench_personalization --sites BUSI,Toshiba --epochs 5,10,25,50,100
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from benchlib import say


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, required=True, help="bench_personalization's --out")
    p.add_argument("--variant", default="as-is")
    p.add_argument("--method", default="LC-Fed", help="which LC-Fed run of the benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", default="BUSI,Toshiba")
    p.add_argument("--epochs", default="5,10,25,50,100")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-seed", type=int, default=0, help="as the benchmark was run")
    args = p.parse_args()

    import numpy as np

    from fedseg.models.lcfed import CalibratedUNet, train_hc_round
    from fedseg.models.local_training import evaluate, torch_threads
    from fedseg.models.personalization import local_keys, pull
    from fedseg.node.actions import NodeRuntime, round_seed
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.run_store import RunStore

    job = args.bench / "runs" / args.variant / args.method.replace(" ", "_") / f"seed{args.seed}"
    state, shared = RunStore(job / "run").load()
    plan = Plan.from_dict(state.plan)
    heads = {}
    for site in plan.sites:
        with np.load(job / "nodes" / site / "personal" / f"{state.run_id}.local.npz") as saved:
            heads[site] = {k: saved[k] for k in ("head.weight", "head.bias")}
    epochs = [float(e) for e in args.epochs.split(",")]
    results: dict[str, dict[str, float]] = {}
    for site in args.sites.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rt = NodeRuntime(NodeConfig(name=site, data=str(args.bench / "data" / args.variant / site), labels="pixel",
                                        workdir=tmp, split_seed=args.split_seed))
            images, masks = rt.images("train", plan), rt.masks("train", plan)
            val_images, val_masks = rt.images("val", plan), rt.masks("val", plan)
        others = {s: h for s, h in heads.items() if s != site}
        row: dict[str, float] = {}
        for n in epochs:
            model = plan.build_model(site)  # HC from the plan's seeded start, as on the node
            local = local_keys(model, plan.local_part)
            pull(model, shared, local)
            pull(model, heads[site], frozenset(model.state_dict()) - {"head.weight", "head.bias"})
            result = train_hc_round(model, others, images, masks, replace(plan.train, local_epochs=n, threads=args.threads),
                                    round_seed(plan.seed, plan.rounds + 1, site))
            with torch_threads(args.threads):
                row.setdefault("stage1", evaluate(model, val_images, val_masks)["dice"])
                row[f"{n:g}"] = evaluate(CalibratedUNet(model, others), val_images, val_masks)["dice"]
            say(f"{site}: HC {n:g} epochs ({result.steps} steps, {result.seconds:.1f} s): val Dice {row[f'{n:g}']:.3f} "
                f"(stage 1 {row['stage1']:.3f})")
        results[site] = row
    print(json.dumps({"run": str(job), "rounds": plan.rounds, "val_dice": results}, indent=2))


if __name__ == "__main__":
    main()
