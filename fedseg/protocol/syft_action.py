"""The single piece of code a node lets a coordinator run through Syft.

A coordinator submits :func:`fedseg_action` as a Syft code request; a node approves a
request only when its source hashes to :data:`ACTION_CODE_SHA256` (and its policies
match), and denies everything else. Syft re-parses the function on the server with no
module globals, so it only imports the node's dispatcher, which runs nothing but the
node's registered actions. The import of ``fedseg.node`` happens on the node's server
at call time; the coordinator never executes this body.
"""
from __future__ import annotations

import hashlib
import inspect
from textwrap import dedent
from typing import Any

import numpy as np

__all__ = ["ACTION_NAME", "FRAMES_ROUTE", "fedseg_action", "action_source", "ACTION_CODE_SHA256", "code_sha256", "to_payload", "from_payload",
           "served_seconds"]

ACTION_NAME = "fedseg_action"
#: The node's own HTTP route for frames; a Syft call carries only a frame's digest.
FRAMES_ROUTE = "/fedseg/frames"


def fedseg_action(site, message):  # noqa: ANN001, ANN201 - Syft passes asset and payload untyped
    from fedseg.node.actions import handle_syft_call

    return handle_syft_call(site, message)


def action_source() -> str:
    """The source Syft records as the request's ``raw_code``."""
    return dedent(inspect.getsource(fedseg_action))


def code_sha256(raw_code: str) -> str:
    """Hash of code with trailing whitespace normalised, as compared against the allow-list."""
    normalised = "\n".join(line.rstrip() for line in raw_code.strip().splitlines())
    return hashlib.sha256(normalised.encode()).hexdigest()


ACTION_CODE_SHA256 = code_sha256(action_source())


def to_payload(digest: str, served: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """What a Syft call carries: the SHA-256 of a frame staged on the node's frame route.

    The frame itself crosses on that route (:mod:`fedseg.node.perimeter.frame_stage` says
    why); the digest inside the caller's signed Syft call binds the call to it.

    Args:
        digest: The frame's SHA-256, hex.
        served: On a reply, the wall and CPU seconds the node spent in fedseg's own code,
            so the coordinator can tell them from Syft's work around the call.
    """
    payload = {"sha256": np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)}
    if served is not None:
        payload["served"] = np.array(served, dtype=np.float64)
    return payload


def from_payload(payload: Any) -> str | None:
    """The hex SHA-256 a Syft payload names, or None if the payload is not one."""
    digest = payload.get("sha256") if isinstance(payload, dict) else None
    if isinstance(digest, np.ndarray) and digest.dtype == np.uint8 and digest.shape == (32,):
        return digest.tobytes().hex()
    return None


def served_seconds(payload: Any) -> tuple[float, float] | None:
    """The node's own (wall, CPU) seconds a reply payload reports, if it reports them."""
    served = payload.get("served") if isinstance(payload, dict) else None
    if isinstance(served, np.ndarray) and served.shape == (2,) and served.dtype == np.float64:
        return float(served[0]), float(served[1])
    return None
