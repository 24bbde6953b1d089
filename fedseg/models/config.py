"""Shared dict round trip for the frozen config dataclasses that travel inside plans."""
from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any, TypeVar

from fedseg.models.errors import ModelError

__all__ = ["DictConfig", "check_number"]

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for dataclass configs: ``from_dict`` refuses unknown keys, ``to_dict`` inverts it."""

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Builds a config from a plain dict, e.g. a decoded JSON message.

        Args:
            d: Field names to values; missing fields keep their defaults.

        Returns:
            The validated config.

        Raises:
            ModelError: On unknown keys or invalid values.
        """
        unknown = sorted(set(d) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ModelError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a plain dict (inverse of :meth:`from_dict`)."""
        return asdict(self)  # type: ignore[call-overload]


def check_number(owner: str, name: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False) -> None:
    """Refuses a config value that is not a finite number (an int if ``integer``) in range.

    Raises:
        ModelError: e.g. ``TrainConfig.lr must be > 0, got 0`` or
            ``FedMixConfig.tau must be in [0, 1], got 2``.
    """
    # bool is an int subclass; a JSON config saying ``true`` is a bug, not 1.
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ModelError(f"{owner}.{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    bad_lo = value < lo or (lo_open and value == lo)
    bad_hi = hi is not None and (value > hi or (hi_open and value == hi))
    if not math.isfinite(value) or bad_lo or bad_hi:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        bound = f"in {left}{lo}, {hi}{right}" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
        raise ModelError(f"{owner}.{name} must be {bound}, got {value}")
