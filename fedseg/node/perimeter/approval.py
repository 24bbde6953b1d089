"""Which Syft code requests a node approves: exactly fedseg's action, exactly as submitted by its coordinator.

Approving a Syft request applies every change it carries, so the request as a whole is
checked, not only the code it names: one change, a status change to approved, for code
whose source and policies are fedseg's, whose linked status object is that code's own,
submitted by the coordinator and owned by it. Anything else is denied.
"""
from __future__ import annotations

from typing import Any

from fedseg.protocol.syft_action import ACTION_CODE_SHA256, ACTION_NAME, code_sha256

__all__ = ["review_request"]

INPUT_POLICY = "MixedInputPolicy"
OUTPUT_POLICY = "OutputPolicyExecuteCount"


def _same_object(a: Any, b: Any) -> bool:
    return a is not None and b is not None and (a.object_uid, a.object_type, a.server_uid) == (b.object_uid, b.object_type, b.server_uid)


def review_request(request: Any, coordinator_email: str) -> str | None:
    """Decides on one pending Syft request.

    Args:
        request: A ``syft`` Request, as the owner's client sees it.
        coordinator_email: The only account allowed to run fedseg's action here (Syft derives
            a request's email from the key that signed it).

    Returns:
        None to approve, else the reason for denying it.
    """
    from syft.service.code.user_code import UserCodeStatus
    from syft.service.request.request import UserCodeStatusChange

    if request.requesting_user_email != coordinator_email:
        return f"requester {request.requesting_user_email} is not this node's coordinator"
    changes = list(request.changes)
    if len(changes) != 1 or type(changes[0]) is not UserCodeStatusChange:
        kinds = ", ".join(type(c).__name__ for c in changes) or "none"
        return f"a request must hold exactly one code status change (it holds: {kinds})"
    change = changes[0]
    if change.value != UserCodeStatus.APPROVED:
        return f"the status change asks for {change.value}, not approval"
    code = change.code
    if not hasattr(code, "raw_code"):
        return "request carries no code"
    if code.service_func_name != ACTION_NAME or code_sha256(code.raw_code) != ACTION_CODE_SHA256:
        return f"code {code.service_func_name!r} is not on this node's allow-list"
    if code.input_policy_type.__name__ != INPUT_POLICY or code.output_policy_type.__name__ != OUTPUT_POLICY:
        return f"code policies differ from fedseg's ({INPUT_POLICY}, {OUTPUT_POLICY})"
    if code.user_verify_key != request.requesting_user_verify_key:
        return "the code belongs to another account"
    # The code was resolved through the change's own link; the status it would set must be that code's.
    if not _same_object(change.linked_obj, code.status_link):
        return "the status change links to an object other than this code's own status"
    return None
