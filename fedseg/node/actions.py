"""The node's whitelist: the only actions a coordinator can make a node perform.

Every request arrives as a fedseg frame through the one approved Syft function. It is
parsed, checked against :data:`ACTIONS`, validated, and only then run. Anything else
(an unknown or reply kind, a malformed frame, bad weights) gets an :class:`ErrorReply`
naming the problem, is logged, and changes nothing. Only aggregate numbers and model
weights ever leave: no images, masks or predictions.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.models.device import autocast, describe_device, resolve_device
from fedseg.models.errors import ModelError
from fedseg.models.iopfl import running_mix
from fedseg.models.lcfed import CalibratedUNet, calibration_keeps, lcfed_round, split_heads, train_hc_round
from fedseg.models.local_training import LocalTrainer, arrays_to_state, evaluate, predict, state_to_arrays, torch_threads
from fedseg.models.personalization import LocalPart, fedrep_round, local_keys, pull, push
from fedseg.models.routing import AdaptConfig, adapt, adapt_norm_statistics, has_batch_norm, route_experts
from fedseg.models.test_time import keeps_adaptation, mask_agreement, majority_vote, on_site, tent, uniform_average
from fedseg.models.overlay import overlay_png
from fedseg.models.fedmix import FedMixTrainer, synthesize_box_masks
from fedseg.protocol.audit.log import AUDIT_FILE, AuditLog
from fedseg.protocol.errors import MessageError, PlanError
from fedseg.protocol.files import atomic_write
from fedseg.protocol.identity import fingerprint, load_or_create_identity
from fedseg.protocol.messages import (
    CalibrateRequest,
    AdaptReply,
    AdaptRequest,
    DescribeReply,
    DescribeRequest,
    EXPERT_PREFIX,
    ErrorCode,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    HeadsReply,
    HeadsRequest,
    METRIC_KEYS,
    Message,
    MessageKind,
    PERSONAL_PREFIX,
    SPLITS,
    SecAggKeysRequest,
    SecAggMaskRequest,
    SecAggTrainRequest,
    SecAggUnmaskRequest,
    PersonalReply,
    PersonalRequest,
    TrainReply,
    TrainRequest,
    check_arrays,
    decode,
    encode,
    unpack_experts,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.secagg.protocol import NodeRound
from fedseg.protocol.syft_action import from_payload, to_payload
from fedseg.protocol.wire import decode_frame

from .config import WORKDIR_ENV, NodeConfig
from .datasets import LabelKind, load_arrays, load_weak_labels
from .errors import ActionRefused, NodeError
from .node_log import log, log_to_workdir
from .perimeter.frame_stage import STAGE, TTL_S
from .predict import HEADS_FILE, MODELS_DIR
from .secure_actions import secure_keys, secure_mask, secure_train, secure_unmask
from .site import open_site

__all__ = ["ALL_IMAGES", "COORDINATOR", "Action", "ACTIONS", "NodeRuntime", "handle", "handle_syft_call", "round_seed"]


#: How a node's audit log names its peer; the coordinator logs each node by its name.
COORDINATOR = "coordinator"
#: Every image of the node, all splits together: what a new site adapts on and is scored on.
ALL_IMAGES = "all"


class NodeRuntime:
    """A node's data and identity, loaded once per server process.

    Labels used for training and masks used for scoring are kept apart: a weak-label
    node may hold masks (for benchmarks, or to score), but never trains on them unless
    its weak labels were derived from those masks and the plan asks for the
    ``full_masks`` upper bound.

    Every model the node builds goes through :meth:`place`, onto the device its owner
    chose; the trainers and scorers follow their model's device, and every action runs
    under :meth:`precision`.

    Args:
        config: The node's settings.
        audit: Keep the node's signed audit log of every message (the serving process
            does; tools that only read a node's data do not).

    Raises:
        ModelError: If the configured device is misspelt or absent on this machine, or
            mixed precision is asked for where it cannot run.
    """

    def __init__(self, config: NodeConfig, audit: bool = False) -> None:
        # torch.optim imports torch._dynamo (2 s here) when the first optimizer is built:
        # import it while the node loads its data, not inside its first training round.
        import torch._dynamo  # noqa: F401

        self.config = config
        self.device = resolve_device(config.device, config.amp)
        self.workdir = Path(config.workdir)
        self.labels = LabelKind(config.labels)
        self.index, self.splits = open_site(config)
        self.identity = load_or_create_identity(self.workdir / "identity.key")
        self.fingerprint = fingerprint(self.identity.public_key())
        #: This round's secure-aggregation secrets; in memory only, gone on restart.
        self.secure_round: NodeRound | None = None
        self.audit = AuditLog(self.workdir / AUDIT_FILE, self.identity, config.name) if audit else None
        self._arrays: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self._weak: dict[int, dict[str, np.ndarray]] = {}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def can_score(self) -> bool:
        """Whether this node holds masks to score a model with."""
        return self.index.has_masks

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Moves a model onto this node's device (in place) and returns it."""
        return model.to(self.device)

    def precision(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for the block where the owner chose ``--amp``; else a no-op."""
        return autocast(self.device, self.config.amp)

    @property
    def split_hashes(self) -> dict[str, str]:
        """Each split's SHA-256 of its sorted image file names (``DescribeReply.split_hashes``):
        a run's manifest tells whether two runs saw the same images, though no name leaves the node."""
        return {split: hashlib.sha256("\n".join(sorted(self.index.image_paths[i].name for i in getattr(self.splits, split))).encode()).hexdigest()
                for split in SPLITS}

    @property
    def device_name(self) -> str:
        """The device as the coordinator sees it, e.g. ``"cuda:0 (NVIDIA H200), amp"``."""
        return describe_device(self.device) + (", amp" if self.config.amp else "")

    def _loaded(self, plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
        key = (plan.image_size, plan.model.in_channels)
        if key not in self._arrays:
            self._arrays[key] = load_arrays(self.index, plan.image_size, plan.model.in_channels)
        return self._arrays[key]

    def _select(self, split: str) -> np.ndarray | slice:
        return slice(None) if split == ALL_IMAGES else getattr(self.splits, split)

    def images(self, split: str, plan: Plan) -> torch.Tensor:
        """Images ``(N, C, S, S)`` uint8 of one split (or :data:`ALL_IMAGES`) at the plan's size and channels."""
        return torch.from_numpy(self._loaded(plan)[0][self._select(split)])

    def masks(self, split: str, plan: Plan) -> torch.Tensor:
        """Masks ``(N, 1, S, S)`` of one split (or :data:`ALL_IMAGES`), for scoring (and training on pixel nodes)."""
        masks = self._loaded(plan)[1]
        if masks is None or not self.can_score:
            raise PlanError(f"node {self.name} holds no masks (labels={self.labels.value}); it cannot score a model")
        return torch.from_numpy(masks[self._select(split)])

    def training_labels(self, plan: Plan, seed: int) -> dict[str, torch.Tensor]:
        """The train split's labels as the plan's trainer takes them: ``masks``, ``box_masks`` or ``has_lesion``.

        Raises:
            PlanError: If the plan asks for labels this node does not have.
        """
        if self.labels is LabelKind.NONE:
            raise PlanError(f"node {self.name} has no labels; it cannot train")
        if self.labels is LabelKind.PIXEL:
            return {"masks": self.masks("train", plan)}
        if plan.full_masks:
            if not self.index.labels_from_masks:
                raise PlanError(f"node {self.name} holds real {self.labels.value} labels; full_masks is only for labels derived from masks")
            return {"masks": self.masks("train", plan)}
        if plan.algorithm != "fedmix":
            raise PlanError(f"node {self.name} has {self.labels.value} labels; {plan.algorithm} trains on pixel labels only")
        if plan.image_size not in self._weak:
            self._weak[plan.image_size] = load_weak_labels(self.index, plan.image_size)
        train = getattr(self.splits, "train")
        weak = {k: v[train] for k, v in self._weak[plan.image_size].items()}
        if "box_masks" in weak and self.index.labels_from_masks:
            # Benchmark boxes: a fresh random margin around the tight box every round, as FedMix does.
            weak["box_masks"] = synthesize_box_masks(weak["box_masks"], np.random.default_rng(seed), plan.fedmix.max_box_margin)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weak.items()}

    def model(self, plan: Plan, run_id: str, weights: dict[str, np.ndarray], what: str) -> torch.nn.Module:
        """The plan's model: received shared weights plus this node's own local part.

        The shared weights are checked against the exact shared layout (names, shapes,
        dtype); the local part comes from the node's personal state for this run, or
        from the plan's seeded initialisation before the node's first round.
        """
        model = self.place(plan.build_model(self.name))
        local = local_keys(model, plan.local_part)
        check_arrays(weights, {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in local}, what)
        saved = self.personal(run_id) if local else None
        if saved is not None:
            # The saved file holds exactly the local keys: load them as the "shared" set
            # of the complementary split.
            pull(model, saved, frozenset(model.state_dict()) - local)
        pull(model, weights, local)
        return model

    def keep_personal(self, plan: Plan, run_id: str, model: torch.nn.Module, mixed: torch.nn.Module | None = None) -> None:
        """Saves what this node keeps for itself after training; none of it leaves the node.

        That is the model's local part (FedBN, FedRep, Local; LC-Fed's head and HC) and,
        for IOP-FL, the running mix of ``mixed`` (default ``model``) over the rounds.
        """
        _require_finite(model, f"the model trained in run {run_id}")
        local = local_keys(model, plan.local_part)
        if local:
            self._save(self._personal_path(run_id), {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k in local})
        if plan.algorithm == "iopfl":
            mix = running_mix(self.personal(run_id, "mix"), state_to_arrays(mixed or model), plan.personal.alpha)
            self._save(self._personal_path(run_id, "mix"), mix)

    def keep_models(self, plan: Plan, run_id: str, models: dict[str, torch.nn.Module], extra: dict[str, Any] | None = None) -> None:
        """Keeps models under ``workdir/models/<run>/<name>.npz``, so ``fedseg node predict`` can use them locally.

        Args:
            plan: The run's plan, kept beside them.
            run_id: The run.
            models: File stem ("global", "personalized", "routed") to model.
            extra: Further settings ``node predict`` needs to rebuild a model, kept as
                ``<stem>.json`` per stem.
        """
        folder = self.workdir / MODELS_DIR / _safe(run_id)
        for stem, model in models.items():
            self._save(folder / f"{stem}.npz", state_to_arrays(model))
        for stem, settings in (extra or {}).items():
            atomic_write(folder / f"{stem}.json", json.dumps(settings, sort_keys=True).encode())
        atomic_write(folder / "plan.json", json.dumps(plan.to_dict(), sort_keys=True).encode())

    def keep_heads(self, run_id: str, heads: dict[str, np.ndarray]) -> None:
        """LC-Fed: keeps the other sites' heads that calibrated this node's model, beside it."""
        self._save(self.workdir / MODELS_DIR / _safe(run_id) / HEADS_FILE, heads)

    def optimizer_state(self, run_id: str, round_: int) -> dict[str, Any] | None:
        """The optimizer state this node kept after its latest round of the run before ``round_``.

        Only rounds before ``round_`` count: after a coordinator's resume, the round it
        repeats must not continue from the state that same round left when it was lost.
        None before the node's first round of the run.
        """
        earlier = [r for r in self._optimizer_rounds(run_id) if r < round_]
        if not earlier:
            return None
        return torch.load(io.BytesIO(self._optimizer_path(run_id, max(earlier)).read_bytes()), map_location="cpu", weights_only=True)

    def keep_optimizer_state(self, run_id: str, round_: int, state: dict[str, Any]) -> None:
        """Keeps the optimizer state after ``round_`` beside the personal state; it never leaves the node.

        The state of the round it continued from stays too (a resume that repeats
        ``round_`` needs it); older and later rounds' files are deleted.
        """
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self._optimizer_path(run_id, round_), buf.getvalue())
        rounds = self._optimizer_rounds(run_id)
        keep = {round_, max((r for r in rounds if r < round_), default=round_)}
        for r in rounds:
            if r not in keep:
                self._optimizer_path(run_id, r).unlink(missing_ok=True)

    def _optimizer_rounds(self, run_id: str) -> list[int]:
        prefix = f"{_safe(run_id)}.optim."
        folder = self.workdir / "personal"
        names = [p.name[len(prefix):-3] for p in folder.glob(f"{prefix}*.pt")] if folder.is_dir() else []
        return [int(n) for n in names if n.isdigit()]

    def _optimizer_path(self, run_id: str, round_: int) -> Path:
        return self.workdir / "personal" / f"{_safe(run_id)}.optim.{round_}.pt"

    def personal(self, run_id: str, what: str = "local") -> dict[str, np.ndarray] | None:
        """What this node keeps of a run: its local part ("local") or IOP-FL's running mix
        ("mix"); None before the node's first round."""
        path = self._personal_path(run_id, what)
        if not path.exists():
            return None
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}

    @staticmethod
    def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, buf.getvalue())

    def _personal_path(self, run_id: str, what: str = "local") -> Path:
        return self.workdir / "personal" / f"{_safe(run_id)}.{what}.npz"


def _require_finite(model: torch.nn.Module, what: str) -> None:
    """Refuses to keep or send a model with NaN or Inf values (e.g. trained from absurd weights)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"{what} has NaN or Inf values in {bad[:3]}; nothing was kept or sent")


def round_seed(seed: int, round_: int, node: str) -> int:
    """A per-node, per-round seed, so sites shuffle differently yet reproducibly."""
    return (seed * 1_000_003 + round_ * 7_919 + zlib.crc32(node.encode())) % 2**31


def _describe(rt: NodeRuntime, msg: DescribeRequest) -> DescribeReply:
    size = rt.index.native_size[0] if rt.index.native_size else 0
    return DescribeReply(
        node=rt.name,
        label_kind=rt.labels.value,
        channels=rt.index.channels,
        image_size=size,
        n_train=len(rt.splits.train),
        n_val=len(rt.splits.val),
        n_test=len(rt.splits.test),
        can_score=rt.can_score,
        fingerprint=rt.fingerprint,
        device=rt.device_name,
        split_hashes=rt.split_hashes,
    )


def _train(rt: NodeRuntime, msg: TrainRequest) -> TrainReply:
    plan = Plan.from_dict(msg.plan)
    scores = {}
    if msg.score:
        # The received weights are the global model of the previous round: score them first,
        # exactly as an evaluate request of that round would, then train from them.
        scored = EvaluateRequest(run_id=msg.run_id, round=msg.round - 1, plan=msg.plan, splits=msg.score, overlays=msg.overlays, weights=msg.weights)
        scores = _evaluate(rt, scored).metrics
    model = rt.model(plan, msg.run_id, msg.weights, f"weights of train request round {msg.round}")
    seed = round_seed(plan.seed, msg.round, rt.name)
    images, labels = rt.images("train", plan), rt.training_labels(plan, seed)
    accepted = candidates = 0
    optimizer_state = rt.optimizer_state(msg.run_id, msg.round) if plan.keeps_optimizer else None
    trainer: FedMixTrainer | LocalTrainer | None = None
    if plan.algorithm == "fedmix":
        trainer = FedMixTrainer(model, plan.train, plan.fedmix, optimizer_state)
        result = trainer.train_round(images, **labels, seed=seed)
        accepted, candidates = result.accepted, result.candidates
    elif plan.algorithm == "lcfed":
        result = lcfed_round(model, plan.train, plan.lcfed, plan.personal.head_fraction, images, labels["masks"], seed)
    elif plan.algorithm == "fedrep":
        result = fedrep_round(model, plan.train, images, labels["masks"], seed, plan.personal.head_fraction)
    else:
        trainer = LocalTrainer(model, plan.train, optimizer_state)
        result = trainer.train_round(images, labels["masks"], seed=seed)
    if not math.isfinite(result.mean_loss):
        raise ModelError(f"training from the weights of round {msg.round} gave a non-finite loss ({result.mean_loss}); nothing was kept or sent")
    mixed = None
    if plan.algorithm == "iopfl" and plan.personal.mix_epochs > 0:
        mixed = _fine_tuned(model, plan, plan.personal.mix_epochs, images, labels["masks"], seed + 1)
    rt.keep_personal(plan, msg.run_id, model, mixed)
    if plan.keeps_optimizer and trainer is not None and result.steps:
        rt.keep_optimizer_state(msg.run_id, msg.round, trainer.optimizer_state)
    log.info("round %d node %s: trained %d samples (%d/%d pseudo-labels), loss %.4f, %.1f s",
             msg.round, rt.name, result.n_samples, accepted, candidates, result.mean_loss, result.seconds)
    return TrainReply(
        run_id=msg.run_id,
        round=msg.round,
        n_samples=result.n_samples,
        mean_loss=float(result.mean_loss),
        seconds=float(result.seconds),
        accepted=accepted,
        candidates=candidates,
        weights=push(model, local_keys(model, plan.local_part)),
        scores=scores,
    )


def _plain_train(rt: NodeRuntime, msg: TrainRequest) -> TrainReply:
    if rt.config.require_secure_aggregation:
        raise PlanError(f"node {rt.name} trains only under secure aggregation (its update never leaves unmasked); "
                        "run with fedseg run --secure-aggregation")
    return _train(rt, msg)


def _fine_tuned(model: torch.nn.Module, plan: Plan, epochs: float, images: torch.Tensor, masks: torch.Tensor, seed: int) -> torch.nn.Module:
    """A copy of ``model`` trained ``epochs`` more local epochs on this node's training split."""
    tuned = copy.deepcopy(model)
    LocalTrainer(tuned, replace(plan.train, local_epochs=epochs)).train_round(images, masks, seed=seed)
    return tuned


def _personal_model(rt: NodeRuntime, plan: Plan, msg: EvaluateRequest, global_model: torch.nn.Module) -> torch.nn.Module | None:
    """The node's own model beside the global one, where the algorithm has one (else None)."""
    if plan.algorithm == "ft" and msg.round > 0:
        # FT: the global model fine-tuned on this node's own training split.
        return _fine_tuned(global_model, plan, plan.personal.finetune_epochs, rt.images("train", plan), rt.masks("train", plan),
                           round_seed(plan.seed, msg.round, rt.name) + 1)
    if plan.algorithm == "iopfl":
        mix = rt.personal(msg.run_id, "mix")
        if mix is not None:
            model = rt.place(plan.build_model(rt.name))
            arrays_to_state(model, mix)
            return model
    return None


def _evaluate(rt: NodeRuntime, msg: EvaluateRequest) -> EvaluateReply:
    plan = Plan.from_dict(msg.plan)
    model = rt.model(plan, msg.run_id, msg.weights, f"weights of evaluate request round {msg.round}")
    models = {"": model}
    personal = _personal_model(rt, plan, msg, model)
    if personal is not None:
        models[PERSONAL_PREFIX] = personal
    return _score(rt, plan, msg.run_id, msg.round, msg.splits, msg.overlays, models)


def _score(rt: NodeRuntime, plan: Plan, run_id: str, round_: int, splits: list[str], overlays: int,
           models: dict[str, torch.nn.Module]) -> EvaluateReply:
    """Scores each model (keyed by its metrics prefix) on the splits, keeps them, and answers
    with aggregate figures only."""
    metrics: dict[str, Any] = {}
    with torch_threads(plan.train.threads):
        for split in splits:
            images, masks = rt.images(split, plan), rt.masks(split, plan)
            # One model may stand under two prefixes (LC-Fed's stage-1 model, when HC is dropped): scored once.
            by_model: dict[int, dict[str, Any]] = {}
            for prefix, scored in models.items():
                if id(scored) not in by_model:
                    by_model[id(scored)] = _scores(evaluate(scored, images, masks, batch_size=plan.eval_batch_size))
                metrics[prefix + split] = dict(by_model[id(scored)])
            if overlays:
                _write_overlays(rt, models.get(PERSONAL_PREFIX, models[""]), images[:overlays], masks[:overlays], run_id, round_, split)
    bad = sorted(f"{split}.{k}" for split, values in metrics.items() for k, v in values.items() if not math.isfinite(v))
    if bad:
        # Nothing is kept from weights that cannot even be scored.
        raise ModelError(f"the received weights give non-finite {', '.join(bad)}; nothing was kept")
    # With a local part (FedBN, FedRep, Local, LC-Fed) the model a node runs is already its own.
    own = plan.local_part is not LocalPart.NONE
    kept = {}
    for prefix, scored in models.items():
        if isinstance(scored, CalibratedUNet):
            # Its state is the LC-Fed model's (HC included); the other sites' heads go beside it.
            rt.keep_heads(run_id, scored.heads_arrays())
            scored = scored.model
        kept["personalized" if prefix or own else "global"] = scored
    rt.keep_models(plan, run_id, kept)
    log.info("round %d node %s: evaluated %s", round_, rt.name, metrics)
    return EvaluateReply(run_id=run_id, round=round_, metrics=metrics)


def _scores(m: dict[str, float]) -> dict[str, Any]:
    # Plain floats and ints, as the reply's validation requires, from evaluate's output.
    return {k: int(m[k]) if k == "n" else float(m[k]) for k in METRIC_KEYS}


def _lcfed_plan(message: HeadsRequest | CalibrateRequest) -> Plan:
    plan = Plan.from_dict(message.plan)
    if plan.algorithm != "lcfed":
        raise PlanError(f"{message.KIND} belongs to lcfed's calibration stage, not to {plan.algorithm}")
    return plan


def _heads(rt: NodeRuntime, msg: HeadsRequest) -> HeadsReply:
    _lcfed_plan(msg)
    if not rt.config.share_head:
        raise ActionRefused(ErrorCode.DECLINED.value, f"node {rt.name} does not share its head (its owner started it with --no-share-head)")
    local = rt.personal(msg.run_id)
    if local is None:
        raise PlanError(f"node {rt.name} has not trained in run {msg.run_id}: it has no head to share")
    log.info("round %d node %s: sent its segmentation head for calibration", msg.round, rt.name)
    return HeadsReply(run_id=msg.run_id, round=msg.round, weights={k: local[k] for k in ("head.weight", "head.bias")})


def _calibrate(rt: NodeRuntime, msg: CalibrateRequest) -> EvaluateReply:
    """LC-Fed stage 2: trains HC on the other sites' heads, then scores the stage-1 model and,
    as the personalized one, the calibrated model."""
    plan = _lcfed_plan(msg)
    model = rt.model(plan, msg.run_id, msg.weights, f"weights of calibrate request round {msg.round}")
    heads = split_heads(msg.heads)
    strangers = sorted((set(heads) - set(plan.sites)) | (set(heads) & {rt.name}))
    if strangers:
        raise PlanError(f"calibration heads must come from the other sites of plan.sites, got heads of {strangers}")
    personal: torch.nn.Module = model
    if heads:
        calibrate = replace(plan.train, local_epochs=plan.lcfed.hc_epochs)
        seed = round_seed(plan.seed, msg.round, rt.name)
        result = train_hc_round(model, heads, rt.images("train", plan), rt.masks("train", plan), calibrate, seed)
        rt.keep_personal(plan, msg.run_id, model)
        log.info("round %d node %s: trained HC on the heads of %s, loss %.4f, %.1f s",
                 msg.round, rt.name, sorted(heads), result.mean_loss, result.seconds)
        calibrated = CalibratedUNet(model, heads)
        with torch_threads(plan.train.threads):
            keeps = not len(rt.splits.val) or calibration_keeps(model, calibrated, rt.images("val", plan), rt.masks("val", plan),
                                                                plan.eval_batch_size)
        if keeps:
            personal = calibrated
        else:
            log.warning("round %d node %s: HC scores a lower validation Dice than the stage-1 model, "
                        "so the stage-1 model stays this node's personalized model", msg.round, rt.name)
    return _score(rt, plan, msg.run_id, msg.round, msg.splits, 0, {"": model, PERSONAL_PREFIX: personal})


def _personal(rt: NodeRuntime, msg: PersonalRequest) -> PersonalReply:
    """A node's IOP-FL running mix, only if its owner allowed it to leave (``--share-personalized``)."""
    if not rt.config.share_personalized:
        raise ActionRefused(ErrorCode.DECLINED.value, f"node {rt.name} does not share its personalized model: "
                            "its owner did not start it with --share-personalized")
    mix = rt.personal(msg.run_id, "mix")
    if mix is None:
        raise ActionRefused(ErrorCode.NO_MODEL.value, f"node {rt.name} holds no personalized model of run {msg.run_id} "
                            "(only nodes that trained in an iopfl run keep one)")
    log.info("run %s node %s: shared its personalized model (the owner allows it)", msg.run_id, rt.name)
    return PersonalReply(run_id=msg.run_id, node=rt.name, weights=mix)


def _adapt(rt: NodeRuntime, msg: AdaptRequest) -> AdaptReply:
    """Test-time routing on this node's images; the adapted model stays here, only numbers leave.

    Adaptation sees the images of every split and nothing else. The node then keeps the
    adapted routing, or routing before adaptation, by the label-free rule of
    :func:`~fedseg.models.test_time.keeps_adaptation`. Masks, if the node has them, are
    read only afterwards, to score the received global model, the global model with its
    BatchNorm statistics recomputed here (AdaBN), the kept routed model and, when the
    settings ask for them, the other comparisons of :mod:`fedseg.models.test_time`.
    """
    plan = Plan.from_dict(msg.plan)
    if plan.algorithm == "fedmix":
        raise PlanError("adapt routes over plain U-Nets; fedmix's co-trained pair cannot be routed")
    try:
        config = AdaptConfig.from_dict(msg.adapt)
    except ModelError as exc:
        raise PlanError(f"adapt settings: {exc}") from None
    experts = unpack_experts(msg)
    seed = round_seed(plan.seed, 0, rt.name)
    routed = rt.place(route_experts(plan.model, experts, config.routing, seed))
    images = rt.images(ALL_IMAGES, plan)
    per_epoch = math.ceil(len(images) / config.batch_size)

    def progress(step: int, steps: int, parts: dict[str, float]) -> None:
        if step % per_epoch == 0 or step == steps:
            log.info("run %s node %s: adapting, step %d/%d, entropy %.4f, consistency %.4f",
                     msg.run_id, rt.name, step, steps, parts["entropy"], parts["consistency"])

    before = copy.deepcopy(routed)
    result = adapt(routed, images, config, seed, progress)
    bs = plan.eval_batch_size
    with torch_threads(config.threads):
        if has_batch_norm(before):
            adapt_norm_statistics(before, images, bs)
        # Every expert with the site's statistics: their majority vote is the rule's reference.
        site_experts = {name: on_site(plan.model, arrays, images, bs, rt.device) for name, arrays in experts}
        predicted = {name: predict(model, images, bs) for name, model in site_experts.items()}
        keep, agreement = keeps_adaptation(routed, before, majority_vote(list(predicted.values())), images, config.keep_tolerance, bs)
    global_name = experts[-1][0]
    agreement.update({EXPERT_PREFIX + name: mask_agreement(p, predicted[global_name]) for name, p in predicted.items() if name != global_name})
    kept = routed if keep else before
    log.info("run %s node %s: %s (agreement with the experts' majority vote %.4f adapted, %.4f before, tolerance %.4f)",
             msg.run_id, rt.name, "keeps the adapted routing" if keep else "keeps routing before adaptation",
             agreement["adapted"], agreement["before"], config.keep_tolerance)
    global_model = rt.place(plan.build_model())
    arrays_to_state(global_model, dict(experts[-1][1]))
    rt.keep_models(plan, msg.run_id, {"global": global_model, "routed": kept},
                   {"routed": {"experts": msg.experts, "adapt": config.to_dict(), "adapted": keep}})
    metrics: dict[str, Any] = {}
    if rt.can_score:
        scored = {"global": global_model, "routed": kept}
        if has_batch_norm(global_model):
            scored["norm_stats"] = site_experts[global_name]
        if config.baselines:
            scored.update({"routed_adapted": routed, "routed_before": before,
                           "uniform": on_site(plan.model, uniform_average(experts), images, bs, rt.device)})
            scored.update({EXPERT_PREFIX + name: m for name, m in site_experts.items() if name != global_name})
            tented = copy.deepcopy(global_model)
            tent(tented, images, config, seed)
            scored["tent"] = tented
        masks = rt.masks(ALL_IMAGES, plan)
        with torch_threads(config.threads):
            for name, model in scored.items():
                metrics[name] = _scores(evaluate(model, images, masks, batch_size=bs))
    log.info("run %s node %s: adapted over %d experts (%s) in %d steps, %.1f s; scores %s",
             msg.run_id, rt.name, len(experts), ", ".join(msg.experts), result.steps, result.seconds, metrics)
    return AdaptReply(run_id=msg.run_id, experts=len(experts), n_images=result.n_images, steps=result.steps,
                      seconds=float(result.seconds), mean_loss=float(result.mean_loss), metrics=metrics,
                      adapted=keep, agreement={k: float(v) for k, v in agreement.items()})


def _write_overlays(rt: NodeRuntime, model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, run_id: str, round_: int, split: str) -> None:
    # Overlays show patients' images, so they are written only inside the node's own workdir.
    out = rt.workdir / "overlays" / _safe(run_id) / f"round_{round_:04d}"
    out.mkdir(parents=True, exist_ok=True)
    preds = predict(model, images)
    for i in range(images.shape[0]):
        overlay_png(images[i].numpy(), preds[i].numpy(), masks[i].numpy().astype(bool), out / f"{split}_{i:02d}.png")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64] or "run"


@dataclass(frozen=True)
class Action:
    """One exposed action: the request type it accepts and the function that serves it."""

    request: type[Message]
    run: Callable[[NodeRuntime, Any], Message]


#: The whitelist. Adding an action means one entry here plus one test.
ACTIONS: dict[str, Action] = {
    MessageKind.DESCRIBE.value: Action(DescribeRequest, _describe),
    MessageKind.TRAIN.value: Action(TrainRequest, _plain_train),
    MessageKind.EVALUATE.value: Action(EvaluateRequest, _evaluate),
    MessageKind.HEADS.value: Action(HeadsRequest, _heads),
    MessageKind.CALIBRATE.value: Action(CalibrateRequest, _calibrate),
    MessageKind.SECAGG_KEYS.value: Action(SecAggKeysRequest, secure_keys),
    MessageKind.SECAGG_TRAIN.value: Action(SecAggTrainRequest, lambda rt, msg: secure_train(rt, msg, _train)),
    MessageKind.SECAGG_MASK.value: Action(SecAggMaskRequest, secure_mask),
    MessageKind.SECAGG_UNMASK.value: Action(SecAggUnmaskRequest, secure_unmask),
    MessageKind.PERSONAL.value: Action(PersonalRequest, _personal),
    MessageKind.ADAPT.value: Action(AdaptRequest, _adapt),
}


def handle(rt: NodeRuntime, frame: bytes) -> bytes:
    """Serves one request frame and returns the reply frame, recording both in the audit log.

    Args:
        rt: The node's runtime.
        frame: The request as received.

    Returns:
        The encoded reply: the action's reply, or an ErrorReply naming what was refused.

    Raises:
        AuditError: Only if the audit log cannot be written; then nothing is sent.
    """
    received = rt.audit.record(direction="received", peer=COORDINATOR, frame=frame) if rt.audit is not None else {}
    reply = _serve(rt, frame)
    if rt.audit is not None:
        # An error reply carries no run or round: the log takes them from the request.
        rt.audit.record(direction="sent", peer=COORDINATOR, frame=reply, run_id=received.get("run"), round=received.get("round"))
    return reply


def _serve(rt: NodeRuntime, frame: bytes) -> bytes:
    max_bytes = rt.config.max_message_mb * 2**20
    try:
        kind = decode_frame(frame, max_bytes).kind
        action = ACTIONS.get(kind)
        if action is None:
            exposed = ", ".join(sorted(ACTIONS))
            return _refuse(rt, ErrorCode.NOT_EXPOSED, f"action {kind!r} is not exposed by node {rt.name} (exposed: {exposed})")
        with rt.precision():
            reply = action.run(rt, decode(frame, max_bytes))
        return encode(reply)
    except MessageError as exc:
        code = ErrorCode.BAD_WEIGHTS if "weights" in str(exc) else ErrorCode.BAD_MESSAGE
        return _refuse(rt, code, str(exc))
    except ModelError as exc:
        return _refuse(rt, ErrorCode.BAD_WEIGHTS, str(exc))
    except PlanError as exc:
        return _refuse(rt, ErrorCode.BAD_PLAN, str(exc))
    except ActionRefused as exc:
        return _refuse(rt, ErrorCode(exc.code), str(exc))
    except Exception as exc:  # the node must keep serving whatever one request does
        log.error("node %s: internal error\n%s", rt.name, traceback.format_exc())
        return encode(ErrorReply(code=ErrorCode.INTERNAL.value, message=f"node {rt.name}: internal error: {type(exc).__name__}: {exc}"))


def _refuse(rt: NodeRuntime, code: ErrorCode, message: str) -> bytes:
    log.warning("node %s refused a request (%s): %s", rt.name, code.value, message)
    return encode(ErrorReply(code=code.value, message=message))


_runtime: NodeRuntime | None = None
# The server may serve requests on several threads; one node trains one thing at a time.
_lock = threading.Lock()


def _get_runtime() -> NodeRuntime:
    global _runtime
    if _runtime is None:
        workdir = Path(os.environ[WORKDIR_ENV])
        # First, so that a runtime that cannot load is logged too.
        log_to_workdir(workdir)
        _runtime = NodeRuntime(NodeConfig.load(workdir), audit=True)
    return _runtime


def _node_name() -> str:
    if _runtime is not None:
        return _runtime.name
    try:
        return NodeConfig.load(Path(os.environ[WORKDIR_ENV])).name
    except Exception:  # naming the node must not hide the error being reported
        return "(unconfigured)"


def _unserved(exc: Exception) -> bytes:
    """The reply to a call the node could not serve at all: a typed error naming the cause, logged here.

    ``fedseg node start`` checked the data before serving, so this is data moved or
    changed since (``node_data``), or a fault of the node itself (``internal``).
    """
    name = _node_name()
    if isinstance(exc, NodeError):
        log.error("node %s cannot serve: %s", name, exc)
        return encode(ErrorReply(code=ErrorCode.NODE_DATA.value, message=f"node {name} cannot read its data: {exc}"))
    log.error("node %s cannot serve: internal error\n%s", name, traceback.format_exc())
    return encode(ErrorReply(code=ErrorCode.INTERNAL.value, message=f"node {name}: internal error: {type(exc).__name__}: {exc}"))


def handle_syft_call(site: Any, message: Any) -> dict[str, np.ndarray]:
    """Entry point of the approved Syft function, run inside the node's server process.

    The request frame waits on the node's frame stage, named by the digest the call
    carries; the reply waits there too, until the coordinator fetches it by the digest
    returned here. Whatever goes wrong is answered as a typed :class:`ErrorReply` and
    logged in ``node.log``: an exception escaping to Syft would reach the coordinator
    only as Syft's "please contact the Server Admin", with nothing on the node.

    Args:
        site: The node's site summary asset (Syft requires one private input).
        message: The coordinator's payload (:func:`fedseg.protocol.syft_action.to_payload`).

    Returns:
        The payload naming the staged reply frame.
    """
    if not isinstance(site, np.ndarray):
        # Syft runs approved code a second time against the assets' mock side (here an
        # empty pointer) and discards that result; doing no work there halves a round.
        return {}
    with _lock:
        try:
            t0, c0 = time.perf_counter(), time.thread_time()
            rt = _get_runtime()
            digest = from_payload(message)
            if digest is None:
                reply = _refuse(rt, ErrorCode.BAD_MESSAGE, "payload must be {'sha256': 32 uint8} naming a frame staged on /fedseg/frames")
            elif (frame := STAGE.requests.take(digest)) is None:
                reply = _refuse(rt, ErrorCode.BAD_MESSAGE, f"no staged frame with sha256 {digest}: upload it to /fedseg/frames first (frames wait at most {TTL_S:.0f} s)")
            else:
                reply = handle(rt, frame)
            # Time spent here, so the coordinator can tell Syft's work around the call from fedseg's.
            return to_payload(STAGE.replies.put(reply), (time.perf_counter() - t0, time.thread_time() - c0))
        except Exception as exc:  # the audit log, the runtime's data: whatever it is, the coordinator learns it
            return to_payload(STAGE.replies.put(_unserved(exc)))
