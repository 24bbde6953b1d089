"""Exceptions of the protocol package; each names the node, field or tensor at fault."""
from __future__ import annotations

__all__ = ["ProtocolError", "MessageError", "PlanError", "RemoteError", "TransportError", "RoundError"]


class ProtocolError(Exception):
    """Base class for errors raised by ``fedseg.protocol``."""


class MessageError(ProtocolError):
    """A message could not be decoded or failed validation; it was not applied."""


class PlanError(ProtocolError):
    """A training plan has unknown keys or out-of-range values."""


class RemoteError(ProtocolError):
    """A node answered with an error reply.

    Attributes:
        node: Name of the node that refused.
        code: The reply's error code.
    """

    def __init__(self, node: str, code: str, message: str) -> None:
        self.node, self.code = node, code
        super().__init__(f"node {node} refused ({code}): {message}")


class TransportError(ProtocolError):
    """A node could not be reached, logged into, or did not answer in time."""


class RoundError(ProtocolError):
    """A round could not complete, e.g. fewer nodes answered than the plan requires."""
