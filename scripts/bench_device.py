"""Node training throughput per device: images per second of a local round, CPU beside CUDA.

Trains the plan's U-Net as a node does in a FedAvg round (``LocalTrainer`` on the node's
device, each batch moved there from the CPU, augmentation on the CPU, mixed precision
under the node's autocast with ``--amp``), on a synthetic site, or a real site folder
with ``--site``. Every device this machine has is measured in the same run: the CPU and,
where PyTorch sees one, the first CUDA GPU in full and in mixed precision, each with and
without augmentation. One untimed warm-up round, then ``--repeats`` timed rounds each.
It needs neither Syft nor real data, so it runs on a bare GPU machine with PyTorch.

    python scripts/bench_device.py                                    # 128 px, width 16, 64 images
    python scripts/bench_device.py --image-size 256 --images 256 --repeats 3
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, commit_label, git_commit, say, write_results

sys.path.insert(0, str(REPO))


def measure(args: argparse.Namespace, images: Any, masks: Any, device: str, amp: bool, augment: bool) -> dict[str, Any]:
    import torch

    from fedseg.models.device import autocast, resolve_device
    from fedseg.models.local_training import LocalTrainer, torch_threads
    from fedseg.protocol.plan import Plan

    plan = Plan.from_dict({"image_size": args.image_size, "model": {"width": args.width, "depth": args.depth},
                           "train": {"batch_size": args.batch_size, "local_epochs": args.local_epochs, "augment": augment,
                                     "threads": args.threads}})
    where = resolve_device(device, amp)
    model = plan.build_model().to(where)  # as NodeRuntime.place does
    trainer = LocalTrainer(model, plan.train)
    samples = math.ceil(args.local_epochs * len(images))
    seconds = []
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    with torch_threads(args.threads):
        for r in range(args.repeats + 1):  # round 0 warms up (cuDNN autotuning, allocator)
            t0 = time.perf_counter()
            with autocast(where, amp):
                trainer.train_round(images, masks, seed=r)
            if where.type == "cuda":
                torch.cuda.synchronize(where)
            if r:
                seconds.append(time.perf_counter() - t0)
    setting = f"{where}{' amp' if amp else ''}, augment {'on' if augment else 'off'}"
    result = {"setting": setting, "device": str(where), "amp": amp, "augment": augment, "samples_per_round": samples,
              "round_seconds": seconds, "img_per_s": samples / statistics.fmean(seconds),
              "peak_gpu_mb": torch.cuda.max_memory_allocated(where) / 1e6 if where.type == "cuda" else None}
    say(f"{setting}: {result['img_per_s']:.1f} img/s ({', '.join(f'{s:.2f}' for s in seconds)} s per round)")
    return result


def load_site(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, str]:
    import torch

    from fedseg.node.datasets import LabelKind, index_site, load_arrays
    from fedseg.node.synthetic import DEFAULT_SITES, write_site

    site = args.site or write_site(tmp / "site", DEFAULT_SITES[0], n=args.images, size=args.image_size, seed=0)
    index = index_site(site, LabelKind.PIXEL, limit=args.images, group_by=None)
    pixels, masks = load_arrays(index, args.image_size, 3)
    return torch.from_numpy(pixels), torch.from_numpy(masks), str(site if args.site else f"synthetic ({args.images} images)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images per round (a synthetic site of this many, or the first N of --site)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per setting, after one warm-up round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, as the plan's train.threads (a node's default is 1)")
    p.add_argument("--site", type=Path, default=None, help="a real site folder (images/, masks/) instead of the synthetic one")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_device")
    args = p.parse_args()
    if args.images < 3 or args.repeats < 1:
        p.error("--images must be >= 3 and --repeats >= 1")
    import torch

    t0 = time.monotonic()
    devices = [("cpu", False)] + ([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else [])
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        devices.pop()  # --amp needs bfloat16 (see fedseg.models.device.check_amp)
    with tempfile.TemporaryDirectory() as tmp:
        images, masks, data = load_site(args, Path(tmp))
        results = [measure(args, images, masks, d, amp, augment) for d, amp in devices for augment in (True, False)]
    by = {(r["device"].split(":")[0], r["amp"], r["augment"]): r["img_per_s"] for r in results}
    ratios = {}
    for augment in (True, False):
        if ("cuda", False, augment) in by:
            ratios[f"cuda / cpu, augment {'on' if augment else 'off'}"] = by[("cuda", False, augment)] / by[("cpu", False, augment)]
        if ("cuda", True, augment) in by:
            ratios[f"cuda amp / cuda, augment {'on' if augment else 'off'}"] = by[("cuda", True, augment)] / by[("cuda", False, augment)]
    commit = git_commit()
    machine = {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    record = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "data": data,
              "commit": commit, "machine": machine, "results": results, "ratios": ratios}
    lines = [f"# Node training throughput per device (commit {commit_label(commit)})", "",
             f"{data}, {args.image_size} px, U-Net width {args.width} depth {args.depth}, batch {args.batch_size}, "
             f"{args.local_epochs} local epoch(s), {args.threads} CPU thread(s); mean of {args.repeats} rounds after a warm-up. "
             f"CPU: {machine['cpu']} ({machine['nproc']} cores); GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}.", "",
             "| setting | img/s | s per round | peak GPU MB |", "|---|---|---|---|"]
    for r in results:
        peak = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {r['setting']} | {r['img_per_s']:.1f} | {statistics.fmean(r['round_seconds']):.2f} | {peak} |")
    if ratios:
        lines += ["", "| ratio (same run) | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "bench_device", record, "\n".join(lines), [], time.monotonic() - t0)


if __name__ == "__main__":
    main()
