"""What the node's review loop approves: only a request that is exactly fedseg's action, nothing riding along.

The requests are Syft's own change objects; only the request and code around them are
stand-ins, since building a real request needs a server (the end-to-end attacks in
tests/test_perimeter.py are refused before any request is made).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("syft")

from syft.server.credentials import SyftSigningKey  # noqa: E402
from syft.service.action.action_object import ActionObject  # noqa: E402
from syft.service.action.action_permissions import ActionPermission  # noqa: E402
from syft.service.action.action_service import ActionService  # noqa: E402
from syft.service.code.user_code import UserCode, UserCodeStatus, UserCodeStatusCollection  # noqa: E402
from syft.service.code.user_code_service import UserCodeService  # noqa: E402
from syft.service.request.request import ActionStoreChange, UserCodeStatusChange  # noqa: E402
from syft.store.linked_obj import LinkedObject  # noqa: E402
from syft.types.uid import UID  # noqa: E402

from fedseg.node import datasite  # noqa: E402
from fedseg.node.perimeter.approval import review_request  # noqa: E402
from fedseg.protocol.syft_action import action_source  # noqa: E402

COORDINATOR = "coordinator-1@fedseg.org"
SERVER = UID()
KEY = SyftSigningKey.generate().verify_key


def _status_link() -> LinkedObject:
    return LinkedObject(server_uid=SERVER, service_type=UserCodeService, object_type=UserCodeStatusCollection, object_uid=UID())


def _code(**overrides) -> SimpleNamespace:
    fields = dict(raw_code=action_source(), service_func_name="fedseg_action", user_verify_key=KEY, status_link=_status_link(),
                  input_policy_type=type("MixedInputPolicy", (), {}), output_policy_type=type("OutputPolicyExecuteCount", (), {}))
    return SimpleNamespace(**(fields | overrides))


def _status_change(code: SimpleNamespace, status_link: LinkedObject | None = None) -> UserCodeStatusChange:
    code_link = LinkedObject(server_uid=SERVER, service_type=UserCodeService, object_type=UserCode, object_uid=UID())
    code_link._resolve_cache = code  # what .code returns, as if resolved through the server
    return UserCodeStatusChange.model_construct(value=UserCodeStatus.APPROVED, linked_obj=status_link or code.status_link, linked_user_code=code_link)


def _request(*changes, email: str = COORDINATOR) -> SimpleNamespace:
    return SimpleNamespace(requesting_user_email=email, requesting_user_verify_key=KEY, changes=list(changes))


def test_fedseg_action_alone_is_approved():
    assert review_request(_request(_status_change(_code())), COORDINATOR) is None


def test_a_second_status_change_riding_along_is_denied():
    code, other = _code(), _code(raw_code="def steal(site, message):\n    return site\n", service_func_name="steal")
    reason = review_request(_request(_status_change(code), _status_change(other)), COORDINATOR)
    assert reason and "exactly one code status change" in reason


def test_an_extra_permission_change_is_denied():
    images = LinkedObject(server_uid=SERVER, service_type=ActionService, object_type=ActionObject, object_uid=UID())
    grant = ActionStoreChange.model_construct(linked_obj=images, apply_permission_type=ActionPermission.READ)
    reason = review_request(_request(_status_change(_code()), grant), COORDINATOR)
    assert reason and "ActionStoreChange" in reason


def test_a_status_change_pointing_at_another_codes_status_is_denied():
    reason = review_request(_request(_status_change(_code(), status_link=_status_link())), COORDINATOR)
    assert reason and "other than this code's own status" in reason


@pytest.mark.parametrize("change, expected", [
    (dict(email="someone@else.org"), "not this node's coordinator"),
    (dict(code=dict(raw_code="def fedseg_action(site, message):\n    return site\n")), "not on this node's allow-list"),
    (dict(code=dict(user_verify_key=SyftSigningKey.generate().verify_key)), "belongs to another account"),
    (dict(code=dict(output_policy_type=type("OutputPolicyExecuteOnce", (), {}))), "policies differ"),
])
def test_anything_else_is_denied(change, expected):
    request = _request(_status_change(_code(**change.get("code", {}))), email=change.get("email", COORDINATOR))
    reason = review_request(request, COORDINATOR)
    assert reason and expected in reason


class _Broken:
    """A request naming a code object the server does not have: reading it raises, as Syft's does."""

    requesting_user_email = COORDINATOR
    denied: list[str] = []

    @property
    def changes(self):
        raise RuntimeError("Item not found")

    def deny(self, reason: str) -> None:
        self.denied.append(reason)

    def approve(self) -> None:
        raise AssertionError("a request that cannot be read was approved")


def test_a_request_that_cannot_be_read_is_denied_and_logged(caplog):
    broken = _Broken()
    with caplog.at_level(logging.WARNING, logger="fedseg.node"):
        assert datasite._decide(broken, COORDINATOR)  # does not raise: the loop goes on to the next request
    assert broken.denied and "could not be checked" in broken.denied[0] and "Item not found" in broken.denied[0]
    assert "could not be checked" in caplog.text
