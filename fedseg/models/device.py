"""Where a node's models run: the device its owner chose, resolved once.

A node names its device as ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. ``"auto"``
takes the first GPU when PyTorch sees one, else the CPU. Models are moved there once
when built; the trainers and scorers move each batch to their model's device, so
nothing else needs to know. Weights always leave as CPU NumPy arrays.
"""
from __future__ import annotations

import re

import torch

from fedseg.models.errors import ModelError

__all__ = ["AUTO", "DEVICE_SPEC", "check_device", "describe_device", "resolve_device"]

AUTO = "auto"
#: What a node accepts as its device, for help texts and error messages.
DEVICE_SPEC = "auto|cpu|cuda|cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(spec: str) -> str:
    """Checks the spelling of a device name, without looking at the hardware.

    Raises:
        ModelError: If ``spec`` is not one of :data:`DEVICE_SPEC`.
    """
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ModelError(f"device must be {DEVICE_SPEC}, got {spec!r}")
    return spec


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names on this machine.

    Raises:
        ModelError: If ``spec`` is misspelt, or names a GPU this machine does not have.
    """
    check_device(spec)
    if spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec!r}: PyTorch sees no CUDA GPU on this machine (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModelError(f"device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        # "cuda" alone means the current GPU; naming it keeps logs and reports exact.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or e.g. ``"cuda:0 (NVIDIA H200)"``, as shown to the coordinator and in logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)

