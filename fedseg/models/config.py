"""Shared dict round trip for the frozen config dataclasses that travel inside plans."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

from fedseg.models.errors import ModelError

__all__ = ["DictConfig"]

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
