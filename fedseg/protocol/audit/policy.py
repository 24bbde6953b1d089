"""What may leave a node: the parameters and scalars it declares, never per-sample data."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MessageError
from ..messages import TYPE_BY_KIND, Message, declared_fields
from .entry import Direction

__all__ = ["looks_per_sample", "check_policy"]


def looks_per_sample(shape: Sequence[int], image_size: int | None = None) -> bool:
    """Whether a tensor shape looks like a batch of images, masks or predictions.

    Rank 3 or more, with the last two dimensions equal and at least 8, as in
    ``(N, C, H, W)`` or ``(N, H, W)``. A 3x3 convolution kernel ``(O, I, 3, 3)`` does not
    match. If ``image_size`` is given, a dimension equal to it in the last two positions
    also matches.
    """
    shape = tuple(shape)
    if len(shape) >= 3 and shape[-1] == shape[-2] >= 8:
        return True
    return image_size is not None and image_size in shape[-2:]


def _fields_fail(cls: type[Message], fields: Mapping[str, Any]) -> str | None:
    """Runs the kind's own validate() on the logged scalars; the reason if it fails."""
    scalars, tensors = declared_fields(cls)
    if set(fields) != scalars:
        return None  # missing or redacted fields are reported on their own
    try:
        cls(**fields, **{name: {} for name in tensors}).validate()
    except MessageError as exc:
        return str(exc)
    except Exception as exc:  # wrong types make validate() fail in other ways
        return f"{type(exc).__name__}: {exc}"
    return None


def check_policy(
    node: str,
    entries: list[dict[str, Any]],
    declared: Mapping[str, tuple[int, ...]],
    image_size: int | None = None,
) -> list[str]:
    """Checks what a node sent against what it declares it may send.

    For each message the node sent, it reports:

    * any tensor whose shape looks like per-sample data (:func:`looks_per_sample`),
      unless its name and shape are exactly a declared pair;
    * any tensor that is not a declared parameter: a name outside ``declared`` after
      the wire prefix (``weights/``) is stripped, or a declared name with a different
      shape;
    * scalar fields the message kind does not declare, declared fields too large to be
      logged, and declared fields that fail the kind's validation (such as extra keys in
      ``metrics``);
    * frames that could not be decoded, and kinds that messages.py does not know.

    Args:
        node: The node's name, for the findings.
        entries: The node's own log entries.
        declared: Parameter name to shape: the node's declared exchange set.
        image_size: The node's image size (from its describe reply), if known.

    Returns:
        Findings, each naming the entry index, the node, the tensor or field and why.
    """
    findings: list[str] = []
    exact = {name: tuple(shape) for name, shape in declared.items()}
    for i, entry in enumerate(entries):
        if entry.get("direction") != Direction.SENT:
            continue
        at = f"entry {i} in node {node}'s log"
        schema = entry.get("schema") or {}
        kind = schema.get("kind")
        if kind is None:
            findings.append(f"{at}: sent a frame that could not be decoded ({schema.get('error')}); what it held cannot be checked")
            continue
        cls = TYPE_BY_KIND.get(kind)
        if cls is None:
            findings.append(f"{at}: sent a message of unknown kind {kind!r}")
        scalars, tensor_fields = declared_fields(cls) if cls is not None else (frozenset(), frozenset())
        for name, _dtype, shape in schema.get("tensors", []):
            shape = tuple(shape)
            field, sep, param = name.partition("/")
            param_name = param if sep and field in tensor_fields else None
            if param_name is not None and exact.get(param_name) == shape:
                continue
            if looks_per_sample(shape):
                findings.append(f"{at}: tensor {name} with shape {shape} looks like per-sample data (image, mask or prediction)")
            elif looks_per_sample(shape, image_size):
                findings.append(f"{at}: tensor {name} with shape {shape} has a dimension equal to the image size {image_size}")
            if param_name is None:
                findings.append(f"{at}: tensor {name} is not in a declared tensor field of {kind}")
            elif param_name not in exact:
                findings.append(f"{at}: tensor {name} is not in the declared exchange set")
            else:
                findings.append(f"{at}: tensor {name} has shape {shape}, but {exact[param_name]} is declared")
        fields = schema.get("fields", {})
        redacted = schema.get("redacted", {})
        for name in sorted(set(fields) | set(redacted)):
            if name not in scalars:
                findings.append(f"{at}: scalar field {name!r} is not declared by {kind} messages")
            elif name in redacted:
                findings.append(f"{at}: scalar field {name!r} was not logged ({redacted[name].get('why')}); it may carry data")
        if cls is not None and not redacted and (why := _fields_fail(cls, fields)):
            findings.append(f"{at}: scalar fields fail the {kind} checks: {why}")
    return findings
