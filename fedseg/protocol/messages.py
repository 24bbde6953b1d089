"""Declared, versioned message types exchanged between a coordinator and a node.

Decoding parses the frame, types it into the declared dataclass, then runs
``validate()``. An unknown kind or version, a missing or extra field, a value of the
wrong type, or a non-finite tensor is rejected with a :class:`MessageError` naming it;
nothing is coerced. A reply is either its kind's reply type or an :class:`ErrorReply`,
so it carries a payload or an error, never both.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, get_type_hints

import numpy as np

from .errors import MessageError
from .wire import DEFAULT_MAX_BYTES, decode_frame, encode_frame

__all__ = [
    "Arrays",
    "MessageKind",
    "ErrorCode",
    "Message",
    "DescribeRequest",
    "DescribeReply",
    "TrainRequest",
    "TrainReply",
    "EvaluateRequest",
    "EvaluateReply",
    "HeadsRequest",
    "HeadsReply",
    "CalibrateRequest",
    "PersonalRequest",
    "PersonalReply",
    "AdaptRequest",
    "AdaptReply",
    "ADAPT_MODELS",
    "EXPERT_PREFIX",
    "ErrorReply",
    "SecAggKeysRequest",
    "SecAggKeysReply",
    "SecAggTrainRequest",
    "SecAggTrainReply",
    "SecAggMaskRequest",
    "SecAggMaskReply",
    "SecAggUnmaskRequest",
    "SecAggUnmaskReply",
    "METRIC_KEYS",
    "SPLITS",
    "PERSONAL_PREFIX",
    "MESSAGE_TYPES",
    "TYPE_BY_KIND",
    "declared_fields",
    "encode",
    "decode",
    "check_arrays",
    "pack_experts",
    "unpack_experts",
]

Arrays = dict[str, np.ndarray]
#: Aggregate metrics a node may report per split; nothing per image ever leaves.
METRIC_KEYS = frozenset({"dice", "iou", "assd", "hd95", "loss", "n"})
SPLITS = ("train", "val", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: An evaluate reply may also score the node's personalized model, as "personal_val" etc.
PERSONAL_PREFIX = "personal_"
#: The models an adapt reply may score on the new site's images, by name: "routed" is the
#: one the node keeps; the others are comparisons (the last five only when asked for).
ADAPT_MODELS = ("global", "norm_stats", "routed", "routed_adapted", "routed_before", "tent", "uniform")
#: Prefix of an expert's score in an adapt reply: "expert:<name>", with the site's statistics.
EXPERT_PREFIX = "expert:"


class MessageKind(StrEnum):
    DESCRIBE = "describe"
    DESCRIBE_REPLY = "describe_reply"
    TRAIN = "train"
    TRAIN_REPLY = "train_reply"
    EVALUATE = "evaluate"
    EVALUATE_REPLY = "evaluate_reply"
    HEADS = "heads"
    HEADS_REPLY = "heads_reply"
    CALIBRATE = "calibrate"
    SECAGG_KEYS = "secagg_keys"
    SECAGG_KEYS_REPLY = "secagg_keys_reply"
    SECAGG_TRAIN = "secagg_train"
    SECAGG_TRAIN_REPLY = "secagg_train_reply"
    SECAGG_MASK = "secagg_mask"
    SECAGG_MASK_REPLY = "secagg_mask_reply"
    SECAGG_UNMASK = "secagg_unmask"
    SECAGG_UNMASK_REPLY = "secagg_unmask_reply"
    PERSONAL = "personal"
    PERSONAL_REPLY = "personal_reply"
    ADAPT = "adapt"
    ADAPT_REPLY = "adapt_reply"
    ERROR = "error"


class ErrorCode(StrEnum):
    BAD_MESSAGE = "bad_message"
    NOT_EXPOSED = "not_exposed"
    BAD_PLAN = "bad_plan"
    BAD_WEIGHTS = "bad_weights"
    #: The node's owner chose not to send what was asked (``--no-share-head``, no
    #: ``--share-personalized``).
    DECLINED = "declined"
    #: The node holds no such model, e.g. it never trained in that run.
    NO_MODEL = "no_model"
    #: The node's own data can no longer be read as it was at start (moved or changed since).
    NODE_DATA = "node_data"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Message:
    """Base of every message type; subclasses declare KIND and their fields."""

    KIND: ClassVar[MessageKind]
    SCHEMA_VERSION: ClassVar[int] = 1
    #: Declared fields that carry key material; the audit log records only their size.
    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def validate(self) -> None:
        """Checks constraints beyond field types; raises MessageError naming the field."""
        for field_name in _schema(type(self))[1]:
            for name, arr in getattr(self, field_name).items():
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise MessageError(f"{self.KIND}: tensor {field_name}/{name} has NaN or Inf values")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """Field name to annotated type, and the names of the tensor fields."""
    hints = {f.name: get_type_hints(cls, globals())[f.name] for f in fields(cls)}
    return hints, frozenset(n for n, t in hints.items() if t == Arrays)


def _check_splits(kind: str, name: str, splits: list) -> None:
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise MessageError(f"{kind}: field {name} must be distinct names from {SPLITS}, got {splits}")


def _check_overlays(kind: str, overlays: int) -> None:
    if not 0 <= overlays <= 64:
        raise MessageError(f"{kind}: field overlays must be in [0, 64], got {overlays}")


def _check_finite(kind: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise MessageError(f"{kind}: field {name} must be finite, got {value}")


@dataclass(frozen=True)
class DescribeRequest(Message):
    KIND: ClassVar[MessageKind] = MessageKind.DESCRIBE
    run_id: str


@dataclass(frozen=True)
class DescribeReply(Message):
    """Counts and kinds only: a node never describes itself with pixels.

    ``can_score`` says whether the node holds masks to score a model with (a weak-label
    node may keep them for evaluation only). ``device`` is where it trains, e.g.
    ``"cpu"`` or ``"cuda:0 (NVIDIA H200), amp"``. ``split_hashes`` identifies each
    split's images without naming them: the SHA-256 hex digest of its image file names,
    sorted, one per line (UTF-8, no final newline).
    """

    KIND: ClassVar[MessageKind] = MessageKind.DESCRIBE_REPLY
    node: str
    label_kind: str
    channels: int
    image_size: int
    n_train: int
    n_val: int
    n_test: int
    can_score: bool
    fingerprint: str
    device: str = "cpu"
    split_hashes: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("n_train", "n_val", "n_test", "channels", "image_size"):
            if getattr(self, name) < 0:
                raise MessageError(f"{self.KIND}: field {name} must be >= 0")
        for split, digest in self.split_hashes.items():
            if split not in SPLITS or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise MessageError(f"{self.KIND}: split_hashes must map splits {list(SPLITS)} to SHA-256 hex digests, got {split!r}: {digest!r}")


@dataclass(frozen=True)
class TrainRequest(Message):
    """The global weights to train from.

    ``score`` names the splits on which the node first scores those very weights (the
    global model after round ``round - 1``), as an evaluate request would, and
    ``overlays`` how many overlays it writes per split then: the evaluation of a round
    rides on the next round's request, so the weights cross once and each node gets one
    call per round. Empty ``score``: training only.
    """

    KIND: ClassVar[MessageKind] = MessageKind.TRAIN
    run_id: str
    round: int
    plan: dict
    weights: Arrays
    score: list = field(default_factory=list, kw_only=True)
    overlays: int = field(default=0, kw_only=True)

    def validate(self) -> None:
        super().validate()
        if self.round < 1:
            raise MessageError(f"{self.KIND}: field round must be >= 1, got {self.round}")
        if self.score:
            _check_splits(self.KIND, "score", self.score)
        _check_overlays(self.KIND, self.overlays)


@dataclass(frozen=True)
class TrainReply(Message):
    """A node's trained weights and the only scalars it declares about its round.

    ``accepted``/``candidates`` count FedMix pseudo-labels on a weak-label node (0/0 on a
    pixel node); ``n_samples`` 0 means the node trained nothing this round.
    """

    KIND: ClassVar[MessageKind] = MessageKind.TRAIN_REPLY
    run_id: str
    round: int
    n_samples: int
    mean_loss: float
    seconds: float
    accepted: int
    candidates: int
    weights: Arrays
    #: The request's ``score``: metrics of the received weights, as in an :class:`EvaluateReply`.
    scores: dict = field(default_factory=dict, kw_only=True)

    def validate(self) -> None:
        super().validate()
        _check_declared_round(self)


def _check_declared_round(reply: TrainReply | SecAggTrainReply) -> None:
    """The scalars a node declares about its training round, plain or secure, and its scores."""
    _check_scores(reply.KIND, reply.scores)
    if reply.n_samples < 0:
        raise MessageError(f"{reply.KIND}: field n_samples must be >= 0, got {reply.n_samples}")
    if not 0 <= reply.accepted <= reply.candidates:
        raise MessageError(f"{reply.KIND}: need 0 <= accepted <= candidates, got {reply.accepted} of {reply.candidates}")
    _check_finite(reply.KIND, "mean_loss", reply.mean_loss)
    _check_finite(reply.KIND, "seconds", reply.seconds)


@dataclass(frozen=True)
class EvaluateRequest(Message):
    KIND: ClassVar[MessageKind] = MessageKind.EVALUATE
    run_id: str
    round: int
    plan: dict
    splits: list
    overlays: int
    weights: Arrays

    def validate(self) -> None:
        super().validate()
        if self.round < 0:
            raise MessageError(f"{self.KIND}: field round must be >= 0, got {self.round}")
        _check_splits(self.KIND, "splits", self.splits)
        _check_overlays(self.KIND, self.overlays)


@dataclass(frozen=True)
class EvaluateReply(Message):
    KIND: ClassVar[MessageKind] = MessageKind.EVALUATE_REPLY
    run_id: str
    round: int
    metrics: dict

    def validate(self) -> None:
        _check_scores(self.KIND, self.metrics)


def _check_scores(kind: str, metrics: dict) -> None:
    """Per split (maybe also as ``personal_<split>``), exactly the aggregate metric keys."""
    for split, values in metrics.items():
        if split.removeprefix(PERSONAL_PREFIX) not in SPLITS:
            raise MessageError(f"{kind}: metrics[{split!r}] must hold exactly {sorted(METRIC_KEYS)}")
        _check_metrics(kind, split, values)


def _check_metrics(kind: str, name: str, values: Any) -> None:
    if not isinstance(values, dict) or set(values) != METRIC_KEYS:
        raise MessageError(f"{kind}: metrics[{name!r}] must hold exactly {sorted(METRIC_KEYS)}")
    for key, v in values.items():
        if type(v) not in (int, float):
            raise MessageError(f"{kind}: metrics[{name!r}][{key!r}] must be a number")
        _check_finite(kind, f"metrics[{name!r}][{key!r}]", v)


@dataclass(frozen=True)
class PersonalRequest(Message):
    """Asks a node for its personalized model of a run, to route over on a new site.

    The node refuses with ``declined`` unless its owner started it with
    ``--share-personalized``.
    """

    KIND: ClassVar[MessageKind] = MessageKind.PERSONAL
    run_id: str


@dataclass(frozen=True)
class PersonalReply(Message):
    KIND: ClassVar[MessageKind] = MessageKind.PERSONAL_REPLY
    run_id: str
    node: str
    weights: Arrays


@dataclass(frozen=True)
class AdaptRequest(Message):
    """The routing set and the adaptation settings, for a new site's node.

    ``experts`` names the K + 1 models, the global model last; ``weights`` holds expert
    i's tensor ``key`` as ``"i/key"`` (:func:`pack_experts`). Nothing else leaves the
    federation: no data, no other node's updates.
    """

    KIND: ClassVar[MessageKind] = MessageKind.ADAPT
    run_id: str
    plan: dict
    adapt: dict
    experts: list
    weights: Arrays

    def validate(self) -> None:
        super().validate()
        if not self.experts or any(not isinstance(e, str) or not e for e in self.experts) or len(set(self.experts)) != len(self.experts):
            raise MessageError(f"{self.KIND}: field experts must be distinct non-empty names, got {self.experts}")
        per_expert = [0] * len(self.experts)
        for key in self.weights:
            index, _, name = key.partition("/")
            if not index.isdigit() or int(index) >= len(self.experts) or not name:
                raise MessageError(f"{self.KIND}: tensor weights/{key} is not 'i/name' with i < {len(self.experts)}")
            per_expert[int(index)] += 1
        empty = [e for e, n in zip(self.experts, per_expert) if n == 0]
        if empty:
            raise MessageError(f"{self.KIND}: experts {empty} have no tensors")


@dataclass(frozen=True)
class AdaptReply(Message):
    """What leaves the new site after adapting: counts, losses and, if it holds masks, scores.

    ``metrics`` maps a model name from :data:`ADAPT_MODELS` (or :data:`EXPERT_PREFIX` and
    an expert's name) to Dice, IoU, loss and n over all the site's images; it is empty on a
    node without masks. ``adapted`` says whether the node kept the adapted routing (else
    routing before adaptation), and ``agreement`` holds the label-free figures it decided
    on and each expert's agreement with the global model, in [0, 1].
    """

    KIND: ClassVar[MessageKind] = MessageKind.ADAPT_REPLY
    run_id: str
    experts: int
    n_images: int
    steps: int
    seconds: float
    mean_loss: float
    metrics: dict
    adapted: bool
    agreement: dict

    def validate(self) -> None:
        for name in ("experts", "n_images", "steps"):
            if getattr(self, name) < 0:
                raise MessageError(f"{self.KIND}: field {name} must be >= 0, got {getattr(self, name)}")
        _check_finite(self.KIND, "seconds", self.seconds)
        _check_finite(self.KIND, "mean_loss", self.mean_loss)
        for name, values in self.metrics.items():
            if name not in ADAPT_MODELS and not name.startswith(EXPERT_PREFIX):
                raise MessageError(f"{self.KIND}: metrics[{name!r}] is not one of {ADAPT_MODELS} or {EXPERT_PREFIX}<expert>")
            _check_metrics(self.KIND, name, values)
        for name, v in self.agreement.items():
            if type(v) is not float or not 0 <= v <= 1:
                raise MessageError(f"{self.KIND}: agreement[{name!r}] must be a float in [0, 1], got {v!r}")


@dataclass(frozen=True)
class HeadsRequest(Message):
    """LC-Fed stage 2: asks a node for its segmentation head, to calibrate the others."""

    KIND: ClassVar[MessageKind] = MessageKind.HEADS
    run_id: str
    round: int
    plan: dict


@dataclass(frozen=True)
class HeadsReply(Message):
    """A node's 1x1 head (``head.weight``, ``head.bias``): the one local part that may leave
    it, and only under LC-Fed; never features or predictions."""

    KIND: ClassVar[MessageKind] = MessageKind.HEADS_REPLY
    run_id: str
    round: int
    weights: Arrays


@dataclass(frozen=True)
class CalibrateRequest(Message):
    """LC-Fed stage 2: the final shared weights plus the other sites' heads, keyed
    ``<site>/head.weight`` and ``<site>/head.bias``. The node trains its HC on them, keeps
    it, and answers with an :class:`EvaluateReply`. No heads means HC runs without this
    node (it declined to share its own): it scores its stage-1 model as its personalized one."""

    KIND: ClassVar[MessageKind] = MessageKind.CALIBRATE
    run_id: str
    round: int
    plan: dict
    splits: list
    weights: Arrays
    heads: Arrays

    def validate(self) -> None:
        super().validate()
        _check_splits(self.KIND, "splits", self.splits)


@dataclass(frozen=True)
class ErrorReply(Message):
    KIND: ClassVar[MessageKind] = MessageKind.ERROR
    code: str
    message: str

    def validate(self) -> None:
        if self.code not in set(ErrorCode):
            raise MessageError(f"{self.KIND}: unknown error code {self.code!r}")


# Secure aggregation (fedseg.protocol.secagg.protocol has the protocol). Keys, sealed
# shares and revealed shares travel as base64 strings in declared fields; the only
# tensors are the masked uint32 updates, under the shared parameters' names and shapes.


def _check_names(kind: str, name: str, values: Any) -> None:
    if not isinstance(values, (list, dict)) or not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
        raise MessageError(f"{kind}: field {name} must hold distinct node names")


def _check_texts(kind: str, name: str, mapping: dict) -> None:
    _check_names(kind, name, mapping)
    if not all(isinstance(v, str) for v in mapping.values()):
        raise MessageError(f"{kind}: field {name} must map node names to base64 strings")


@dataclass(frozen=True)
class SecAggKeysRequest(Message):
    """Asks a node for fresh signed round keys (its first secure round in a session)."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_KEYS
    run_id: str
    round: int


@dataclass(frozen=True)
class SecAggKeysReply(Message):
    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_KEYS_REPLY
    run_id: str
    round: int
    keys: dict


@dataclass(frozen=True)
class SecAggTrainRequest(TrainRequest):
    """A train request that also hands every node the round's signed keys and threshold."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_TRAIN
    roster: dict
    threshold: int

    def validate(self) -> None:
        super().validate()
        _check_names(self.KIND, "roster", self.roster)
        if not 2 <= self.threshold <= len(self.roster):
            raise MessageError(f"{self.KIND}: field threshold must be in [2, {len(self.roster)}], got {self.threshold}")


@dataclass(frozen=True)
class SecAggTrainReply(Message):
    """A train reply without the update: the declared scalars, the commitment to the
    self-mask seed, and the shares sealed to each peer."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_TRAIN_REPLY
    run_id: str
    round: int
    n_samples: int
    mean_loss: float
    seconds: float
    accepted: int
    candidates: int
    commitment: str
    shares: dict
    scores: dict = field(default_factory=dict, kw_only=True)

    def validate(self) -> None:
        _check_declared_round(self)
        _check_texts(self.KIND, "shares", self.shares)


@dataclass(frozen=True)
class SecAggMaskRequest(Message):
    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_MASK
    run_id: str
    round: int
    survivors: list
    weight: float
    shares: dict

    def validate(self) -> None:
        _check_names(self.KIND, "survivors", self.survivors)
        _check_texts(self.KIND, "shares", self.shares)
        if not 0 <= self.weight <= 1:
            raise MessageError(f"{self.KIND}: field weight must be in [0, 1], got {self.weight}")


@dataclass(frozen=True)
class SecAggMaskReply(Message):
    """The masked update ``y_u`` (uint32) and how many values the node clipped."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_MASK_REPLY
    run_id: str
    round: int
    clipped: int
    masked: Arrays

    def validate(self) -> None:
        if self.clipped < 0:
            raise MessageError(f"{self.KIND}: field clipped must be >= 0, got {self.clipped}")
        for name, arr in self.masked.items():
            if arr.dtype != np.uint32:
                raise MessageError(f"{self.KIND}: tensor masked/{name} must be uint32, got {arr.dtype}")


@dataclass(frozen=True)
class SecAggUnmaskRequest(Message):
    """Who survived and who dropped; ``next_round`` > 0 also asks for that round's keys."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_UNMASK
    run_id: str
    round: int
    survivors: list
    dropped: list
    next_round: int

    def validate(self) -> None:
        _check_names(self.KIND, "survivors", self.survivors)
        _check_names(self.KIND, "dropped", self.dropped)
        if self.next_round not in (0, self.round + 1):
            raise MessageError(f"{self.KIND}: field next_round must be 0 or {self.round + 1}, got {self.next_round}")


@dataclass(frozen=True)
class SecAggUnmaskReply(Message):
    """The revealed Shamir shares (key material: never logged) and the next round's keys."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_UNMASK_REPLY
    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"shares"})
    run_id: str
    round: int
    shares: dict
    next_keys: dict

    def validate(self) -> None:
        _check_texts(self.KIND, "shares", self.shares)


#: Every declared message type.
MESSAGE_TYPES: tuple[type[Message], ...] = (
    DescribeRequest, DescribeReply, TrainRequest, TrainReply, EvaluateRequest, EvaluateReply,
    HeadsRequest, HeadsReply, CalibrateRequest, ErrorReply,
    SecAggKeysRequest, SecAggKeysReply, SecAggTrainRequest, SecAggTrainReply, SecAggMaskRequest, SecAggMaskReply,
    SecAggUnmaskRequest, SecAggUnmaskReply,
    PersonalRequest, PersonalReply, AdaptRequest, AdaptReply,
)
#: Each declared message type under its kind, as frames name it.
TYPE_BY_KIND: dict[str, type[Message]] = {cls.KIND.value: cls for cls in MESSAGE_TYPES}


def declared_fields(cls: type[Message]) -> tuple[frozenset[str], frozenset[str]]:
    """The scalar field names and the tensor field names a message type declares."""
    hints, tensors = _schema(cls)
    return frozenset(hints) - tensors, tensors
_SCALARS = {str: (str,), int: (int,), bool: (bool,), float: (int, float), dict: (dict,), list: (list,)}


def encode(message: Message) -> bytes:
    """Validates and encodes a message into its canonical frame."""
    message.validate()
    scalars: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    tensor_fields = _schema(type(message))[1]
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in tensor_fields:
            tensors.update({f"{f.name}/{k}": v for k, v in value.items()})
        else:
            scalars[f.name] = value
    return encode_frame(message.KIND.value, message.SCHEMA_VERSION, scalars, tensors)


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decodes and validates a frame into its declared message type.

    Raises:
        MessageError: Naming the unknown kind or version, or the bad field or tensor.
    """
    frame = decode_frame(data, max_bytes)
    cls = TYPE_BY_KIND.get(frame.kind)
    if cls is None:
        raise MessageError(f"unknown message kind {frame.kind!r}")
    if frame.schema_version != cls.SCHEMA_VERSION:
        raise MessageError(f"{frame.kind}: schema version {frame.schema_version} is not supported (expected {cls.SCHEMA_VERSION})")
    hints, tensor_fields = _schema(cls)
    scalar_fields = set(hints) - tensor_fields
    if set(frame.fields) != scalar_fields:
        missing, extra = scalar_fields - set(frame.fields), set(frame.fields) - scalar_fields
        raise MessageError(f"{frame.kind}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}")
    values: dict[str, Any] = {}
    for name in scalar_fields:
        value, expected = frame.fields[name], _SCALARS[hints[name]]
        if type(value) not in expected:
            raise MessageError(f"{frame.kind}: field {name} must be {hints[name].__name__}, got {type(value).__name__}")
        values[name] = value
    for name in tensor_fields:
        values[name] = {}
    for key, arr in frame.tensors.items():
        field_name, _, tensor = key.partition("/")
        if field_name not in tensor_fields or not tensor:
            raise MessageError(f"{frame.kind}: tensor {key!r} does not belong to a declared tensor field")
        values[field_name][tensor] = arr
    message = cls(**values)
    message.validate()
    return message


def check_arrays(arrays: Arrays, expected: dict[str, tuple[int, ...]], what: str, dtype: str = "float32") -> None:
    """Checks that arrays have exactly the expected names and shapes, and the dtype.

    Args:
        arrays: Received tensors.
        expected: Name to shape, e.g. from the global model.
        what: Who sent them, for the message (e.g. "update from node kvasir").
        dtype: float32 for updates, uint32 for masked ones.

    Raises:
        MessageError: Naming the first missing, unexpected or misshaped tensor.
    """
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise MessageError(f"{what}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for name, shape in expected.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(shape):
            raise MessageError(f"{what}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if arr.dtype != dtype:
            raise MessageError(f"{what}: tensor {name} has dtype {arr.dtype}, expected {dtype}")


def pack_experts(experts: list[tuple[str, Arrays]]) -> tuple[list[str], Arrays]:
    """``(name, arrays)`` per expert to an adapt request's ``experts`` and ``weights``."""
    return [name for name, _ in experts], {f"{i}/{k}": v for i, (_, arrays) in enumerate(experts) for k, v in arrays.items()}


def unpack_experts(request: AdaptRequest) -> list[tuple[str, Arrays]]:
    """The inverse of :func:`pack_experts`, in the request's order (global last)."""
    out: list[Arrays] = [{} for _ in request.experts]
    for key, arr in request.weights.items():
        index, _, name = key.partition("/")
        out[int(index)][name] = arr
    return list(zip(request.experts, out))
