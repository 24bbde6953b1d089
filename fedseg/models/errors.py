"""Errors raised by ``fedseg.models``."""

from __future__ import annotations

__all__ = ["ModelError"]


class ModelError(ValueError):
    """A model config, input tensor or state array is invalid.

    Subclasses ``ValueError`` so callers that only know the shape-contract
    convention (``ValueError`` on bad shapes) still catch it.
    """
