"""A compact 2D U-Net with GroupNorm (default) or BatchNorm for binary (or few-class) segmentation.

GroupNorm is the default: its statistics are per sample, so there are no running
buffers whose meaning differs between nodes, and tiny local batches behave the same
as large ones. BatchNorm is there for methods defined on it, such as IOP-FL's
test-time routing and the norm-statistics baseline it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fedseg.models.config import DictConfig
from fedseg.models.errors import ModelError

__all__ = ["Norm", "RunningBatchNorm", "SeededInit", "UNet", "UNetConfig", "build_model"]


class Norm(StrEnum):
    """Normalization layer of every block."""

    GROUP = "group"
    BATCH = "batch"


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    # bool is an int subclass; a JSON config saying ``true`` is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelError(f"UNetConfig.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ModelError(f"UNetConfig.{name} must be {bound}, got {value}")


@dataclass(frozen=True)
class UNetConfig(DictConfig):
    """Architecture of :class:`UNet`.

    Attributes:
        in_channels: Image channels, 1 (grey) or 3 (RGB).
        out_channels: Logit channels; 1 for binary foreground segmentation.
        width: Channels of the first level, doubled at every down-sampling.
        depth: Number of 2x down-samplings; inputs must be multiples of 2**depth.
        groups: GroupNorm groups; must divide ``width`` (hence every level).
            Unused with ``norm="batch"``.
        norm: "group" (default) or "batch" (:class:`RunningBatchNorm`).
    """

    in_channels: int = 3
    out_channels: int = 1
    width: int = 16
    depth: int = 4
    groups: int = 8
    norm: str = Norm.GROUP.value

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1, 3)
        if self.in_channels not in (1, 3):
            raise ModelError(f"UNetConfig.in_channels must be 1 or 3, got {self.in_channels}")
        _check_int("out_channels", self.out_channels, 1)
        _check_int("width", self.width, 2, 256)
        _check_int("depth", self.depth, 1, 6)
        _check_int("groups", self.groups, 1)
        if self.width % self.groups:
            raise ModelError(
                f"UNetConfig.groups must divide width, got groups={self.groups}, width={self.width}"
            )
        if self.norm not in set(Norm):
            raise ModelError(f"UNetConfig.norm must be one of {[n.value for n in Norm]}, got {self.norm!r}")


class RunningBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are a momentum average, without a step counter.

    ``num_batches_tracked`` only matters for ``momentum=None``; as an int64 buffer it would
    be averaged across nodes like a weight and cast to float32 on the wire, and mean
    nothing either way. Dropping it keeps every state-dict entry a float tensor that
    FedAvg, the running mix and the wire treat alike; running mean and variance travel
    and are averaged with the weights, as in the IOP-FL reference.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.1)
        # A None buffer is left out of the state dict; BatchNorm's forward skips the count then.
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # noqa: ANN001, ANN202 - torch's signature
        # Without a version (a plain dict, as from arrays) torch would add the counter back
        # and then reject it as unexpected; version 2 is the format that has it optional.
        super()._load_from_state_dict(state_dict, prefix, {**local_metadata, "version": 2}, *args)


def _norm(config: UNetConfig, channels: int) -> nn.Module:
    return RunningBatchNorm(channels) if config.norm == Norm.BATCH else nn.GroupNorm(config.groups, channels)


def _block(in_ch: int, out_ch: int, config: UNetConfig) -> nn.Sequential:
    # Conv bias is dropped because the norm's affine shift would cancel it.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        _norm(config, out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        _norm(config, out_ch),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    """Upsample x2, project to the skip's channels, concatenate, fuse."""

    def __init__(self, in_ch: int, out_ch: int, config: UNetConfig) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_ch, out_ch, 1)
        self.fuse = _block(2 * out_ch, out_ch, config)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv commutes with bilinear upsampling (both are linear and the
        # bilinear weights sum to 1), so projecting first gives the same result
        # at a quarter of the cost.
        x = self.project(x)  # (B, out_ch, h, w)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip], dim=1))  # (B, 2*out_ch, H, W) -> (B, out_ch, H, W)


class UNet(nn.Module):
    """Encoder/decoder with skip connections.

    Level ``i`` has ``width * 2**i`` channels, ``i = 0..depth``. Input height and
    width must be multiples of ``2**depth``, e.g. 32x32 for ``depth=2..5`` or
    256x256 for the default ``depth=4``.

    State-dict prefixes are stable so personalization code can select them:
    ``encoder.{i}`` (level i), ``decoder.{j}`` (j=0 is the deepest up-step) and
    ``head`` (the final 1x1 conv).

    Args:
        config: The architecture.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        # groups | width and every level is width * 2**i, so groups divides all levels.
        chans = [config.width * 2**i for i in range(config.depth + 1)]
        self.encoder = nn.ModuleList(
            [_block(config.in_channels, chans[0], config)]
            + [_block(chans[i], chans[i + 1], config) for i in range(config.depth)]
        )
        self.decoder = nn.ModuleList(
            [_Up(chans[i + 1], chans[i], config) for i in reversed(range(config.depth))]
        )
        self.head = nn.Conv2d(chans[0], config.out_channels, 1)
        # The default bias init is U(+-1/sqrt(width)), up to +-0.7 for tiny widths:
        # a random head start that can make every pixel one class and stall the
        # thresholded Dice for many steps. Zero starts every pixel undecided.
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes per-pixel logits.

        Args:
            x: Images ``(B, in_channels, H, W)``, float in [0, 1]; H and W
                multiples of ``2**depth``.

        Returns:
            Logits ``(B, out_channels, H, W)``.

        Raises:
            ModelError: On wrong rank, channels, dtype or spatial size.
        """
        return self.head(self.decode(self.encode(x)))  # (B, out_channels, H, W)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Checks the input and runs the encoder.

        Returns:
            Every level's features, ``(B, width*2**i, H/2**i, W/2**i)`` for ``i = 0..depth``.

        Raises:
            ModelError: On wrong rank, channels, dtype or spatial size.
        """
        cfg, name = self.config, type(self).__name__
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ModelError(f"{name} expects input (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ModelError(f"{name} expects float input in [0, 1], got dtype {x.dtype}")
        m = 2**cfg.depth
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ModelError(
                f"{name} with depth={cfg.depth} needs H and W to be multiples of 2**depth={m}, "
                f"got input shape {tuple(x.shape)}"
            )
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))  # (B, width*2**i, H/2**i, W/2**i)
            skips.append(x)
        return skips

    def bottleneck(self, deep: torch.Tensor) -> torch.Tensor:
        """What the deepest features go through before the decoder: nothing here; LC-Fed's
        channel selection in :class:`~fedseg.models.lcfed.LCFedUNet`."""
        return deep

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder features ``(B, width, H, W)`` from :meth:`encode`'s output (consumed)."""
        x = self.bottleneck(skips.pop())
        for up in self.decoder:
            x = up(x, skips.pop())
        return x


class SeededInit(TorchFunctionMode):
    """Inside it, layers built in this thread draw their initial weights from a generator of their own.

    They get the weights that ``torch.manual_seed(seed)`` would give them, but the
    process-wide generator is never touched: seeding it would reset the caller's stream,
    and race with other threads that build models or draw at the same time. ``nn.init``
    passes ``generator=None`` on to torch, and a function mode sees only its own thread's
    calls, so every such call here gets this generator instead. A draw that names no
    generator at all (a bare ``torch.rand`` in a constructor) would still take the
    process-wide one.

    Args:
        seed: Seeds the generator.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        if kwargs and "generator" in kwargs and kwargs["generator"] is None:
            kwargs = {**kwargs, "generator": self.generator}
        return func(*args, **(kwargs or {}))


def build_model(config: UNetConfig) -> UNet:
    """Builds a :class:`UNet`; the weights depend only on the torch seed (or a :class:`SeededInit`'s).

    Args:
        config: The architecture.

    Returns:
        A freshly initialized model in train mode.
    """
    return UNet(config)
