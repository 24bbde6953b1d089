"""Who may call the node's Syft server, and which of its paths: an allow-list, nothing else passes.

Two callers exist. The coordinator of the node's invite may use only the Syft paths its
transport needs to submit fedseg's one action and to run it. The node's own owner (the
node process itself, which uploads the dataset, registers the coordinator and reviews
requests) may use its own short list, and only from the node's own machine. Everyone
else, guests included, is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ROUTES", "LOGIN_ROUTE", "API_ROUTE", "COORDINATOR_PATHS", "OWNER_PATHS", "AllowList", "Callers"]

#: The HTTP routes of Syft's server that fedseg's clients use (Syft also serves register,
#: password reset, blob streaming and a health check: all refused).
API_ROUTE = "/api/v2/api"
LOGIN_ROUTE = "/api/v2/login"
ROUTES = frozenset({"/api/v2/metadata", LOGIN_ROUTE, API_ROUTE, "/api/v2/api_call"})

#: Syft API paths a coordinator's SyftTransport uses, measured from its connect and exchange.
COORDINATOR_PATHS = frozenset({
    "metadata.get_metadata",
    "user.get_current_user",
    "dataset.get_all",
    "code.request_code_execution",
    "request.get_all",
    # Resolving the links of a request (its code, the code's status) to check its approval.
    "notifications.resolve_object",
    "migration._get_object",
    # One call: store the request frame's digest, run the approved action, read its reply's
    # digest. The frames themselves cross on fedseg's frame route, never through Syft's blob store.
    "action.set",
    "code.call",
    "action.get",
    "action.has_storage_permission",
})

#: Syft API paths the node's own review loop, dataset upload and store retention use.
OWNER_PATHS = frozenset({
    "metadata.get_metadata",
    "user.get_current_user",
    "user.create",
    "action.set",
    "dataset.add",
    "blob_storage.allocate",
    "blob_storage.write_to_disk",
    "blob_storage.read",
    "dataset.get_all",
    "request.get_all_pending",
    "notifications.resolve_object",
    "migration._get_object",
    "request.apply",
    "request.undo",
    "code_status.update",
    # Store retention: list served calls' outputs and delete their objects.
    "output.get_all",
    "action.delete",
})


@dataclass(frozen=True)
class Callers:
    """The accounts that may call: the invite's coordinator and the node's owner."""

    coordinator_email: str
    owner_email: str


class AllowList:
    """Decides on one caller and one path.

    Args:
        callers: The two accounts.
        verify_key_of: Looks up an account's current Syft verify key by email (None if
            it has none yet): Syft makes the keys when the accounts are created.
    """

    def __init__(self, callers: Callers, verify_key_of: Callable[[str], str | None]) -> None:
        self._callers = callers
        self._verify_key_of = verify_key_of
        self._keys: dict[str, str] = {}

    def _key(self, email: str) -> str | None:
        if email not in self._keys:
            key = self._verify_key_of(email)
            if key is None:
                return None
            self._keys[email] = key
        return self._keys[email]

    def caller(self, verify_key: str, local: bool) -> str | None:
        """``"coordinator"`` or ``"owner"`` for an allowed caller, else None.

        Args:
            verify_key: The caller's Syft verify key (hex).
            local: Whether the call comes from the node's own machine.
        """
        if verify_key == self._key(self._callers.coordinator_email):
            return "coordinator"
        if local and verify_key == self._key(self._callers.owner_email):
            return "owner"
        return None

    def refusal(self, verify_key: str, path: str | None, local: bool) -> str | None:
        """Why this call is refused, or None if it is allowed.

        Args:
            verify_key: The caller's verify key.
            path: The Syft API path, or None when the caller only asks for its API.
            local: Whether the call comes from the node's own machine.
        """
        who = self.caller(verify_key, local)
        if who is None:
            return f"caller {verify_key[:12]}... is neither this node's coordinator nor its owner on this machine"
        allowed = COORDINATOR_PATHS if who == "coordinator" else OWNER_PATHS
        if path is not None and path not in allowed:
            return f"{who} may not call {path!r}"
        return None
