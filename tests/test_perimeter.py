"""The node's perimeter, attacked as a peer on the network would: each attack is refused,
logged in node.log with the peer's address, and the node keeps serving its coordinator.

One test per attack class of issue 14; all against real node processes.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import TINY_PLAN_ARGS, fedseg
from fedseg.node.perimeter.login_limit import MAX_FAILURES
from fedseg.node.perimeter.tls import issue
from fedseg.protocol.errors import TransportError
from fedseg.protocol.invite import load_invite
from fedseg.protocol.messages import DescribeReply, DescribeRequest
from fedseg.protocol.rounds import Peer
from fedseg.protocol.syft_transport import SyftTransport
from fedseg.protocol.tls_session import login, pinned_session

SITE = "site-c"


@pytest.fixture(scope="module")
def target(federation):
    node = federation[SITE]
    invite = load_invite(node.invite)
    transport = SyftTransport(invite)
    transport.connect()
    return node, invite, transport


def _serves(transport: SyftTransport) -> None:
    """The legitimate call that follows every attack."""
    assert Peer(transport, 2**20).request(DescribeRequest(run_id="after-attack"), DescribeReply).node == SITE


def _logged(node, *needles: str, timeout_s: float = 10.0) -> str:
    """The node.log line holding every needle (the log is written by another process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in (node.workdir / "node.log").read_text().splitlines():
            if all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no node.log line with {needles}")
        time.sleep(0.2)


def _base(invite) -> str:
    return f"https://{invite.host}:{invite.port}"


def _call(session: requests.Session, invite, path: str, key=None, **kwargs):
    """A raw Syft API call, signed with ``key`` (a fresh guest key if None), as a custom client would send it."""
    from syft.client.api import SyftAPICall
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize
    from syft.server.credentials import SyftSigningKey
    from syft.types.uid import UID

    server_uid = UID.from_string(session.get(f"{_base(invite)}/api/v2/metadata").json()["id"])
    call = SyftAPICall(server_uid=server_uid, path=path, args=[], kwargs=kwargs).sign(key or SyftSigningKey.generate())
    response = session.post(f"{_base(invite)}/api/v2/api_call", data=_serialize(call, to_bytes=True))
    assert response.status_code == 200, response.text
    return _deserialize(response.content, from_bytes=True).message.data


def test_approval_smuggling_through_a_hand_made_request_is_refused(target):
    # The invite holder builds a request whose status change is fedseg's action plus an extra
    # change granting it read permission on the private images.
    from syft.service.action.action_object import ActionObject
    from syft.service.action.action_permissions import ActionPermission
    from syft.service.action.action_service import ActionService
    from syft.service.request.request import ActionStoreChange, SubmitRequest, UserCodeStatusChange
    from syft.service.code.user_code import UserCodeStatus
    from syft.store.linked_obj import LinkedObject

    node, invite, transport = target
    client = transport._client
    code = transport._approved_function()
    images = client.datasets["site"].assets["images"]
    changes = [
        UserCodeStatusChange(value=UserCodeStatus.APPROVED, linked_obj=code.status_link,
                             linked_user_code=LinkedObject.from_obj(code, server_uid=client.id)),
        ActionStoreChange(linked_obj=LinkedObject.from_uid(images.action_id, ActionObject, ActionService, client.id),
                          apply_permission_type=ActionPermission.READ),
    ]
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    result = _call(session, invite, "request.submit", key=client.credentials, request=SubmitRequest(changes=changes))
    assert "refused by fedseg node" in str(result)
    _logged(node, "refused API call 'request.submit'", "127.0.0.1", "coordinator may not call")
    _serves(transport)


def test_guest_calling_action_execute_is_refused(target):
    node, invite, transport = target
    # Even with the invite's client certificate, a guest key neither gets an API nor calls one.
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    api = session.get(f"{_base(invite)}/api/v2/api", params={"verify_key": "00" * 32, "communication_protocol": "dev"})
    assert api.status_code == 403 and "refused by fedseg node" in api.text
    result = _call(session, invite, "action.execute", action=None)
    assert "refused by fedseg node" in str(result) and "neither this node's coordinator" in str(result)
    _logged(node, "refused API call 'action.execute'", "127.0.0.1")
    # The coordinator itself may not either: its paths are those of fedseg's action.
    result = _call(session, invite, "action.execute", key=transport._client.credentials, action=None)
    assert "coordinator may not call 'action.execute'" in str(result)
    _serves(transport)


@pytest.mark.parametrize("route", ["/api/v2/register", "/api/v2/forgot_password", "/api/v2/stream/x/y/", "/api/v2/"])
def test_routes_outside_the_allow_list_are_refused(target, route):
    node, invite, transport = target
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    response = session.post(f"{_base(invite)}{route}", data=b"{}")
    assert response.status_code == 403 and "is not served" in response.text
    _logged(node, f"refused POST {route}", "127.0.0.1")
    _serves(transport)


def test_frame_route_hands_out_only_what_it_staged_and_nothing_over_the_limit(target):
    """fedseg's own route for frames, probed with the invite's certificate: a reply it never
    staged, a path or method it does not serve, a body over the limit; each refused and logged."""
    from conftest import NODE_MAX_MB
    from fedseg.protocol.messages import ErrorReply, decode
    from fedseg.protocol.syft_action import FRAMES_ROUTE

    node, invite, transport = target
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    frames = f"{_base(invite)}{FRAMES_ROUTE}"
    unknown = "ab" * 32
    response = session.get(f"{frames}/{unknown}")
    assert response.status_code == 404 and "no such reply" in response.text
    _logged(node, f"refused GET {FRAMES_ROUTE}/{unknown}", "127.0.0.1")
    assert session.get(f"{frames}/not-a-digest").status_code == 404
    assert session.delete(frames).status_code == 405
    staged = session.post(frames, data=b"not a frame")
    assert staged.status_code == 200 and len(staged.text) == 64
    # A staged request is no reply: the two never mix.
    assert session.get(f"{frames}/{staged.text}").status_code == 404
    # Chunked, so the node learns the size only while reading: refused as soon as it is over.
    big = (b"\0" * 2**20 for _ in range(NODE_MAX_MB + 1))
    response = session.post(frames, data=big)
    assert response.status_code == 413 and "exceeds the limit" in decode(response.content).message
    assert isinstance(decode(response.content), ErrorReply)
    _logged(node, f"refused POST {FRAMES_ROUTE}", "exceeds the limit")
    _serves(transport)


def test_request_naming_a_code_that_does_not_exist_is_refused_and_the_node_keeps_serving(target):
    from syft.service.code.user_code import UserCode, UserCodeStatus, UserCodeStatusCollection
    from syft.service.code.user_code_service import UserCodeService
    from syft.service.request.request import SubmitRequest, UserCodeStatusChange
    from syft.store.linked_obj import LinkedObject
    from syft.types.uid import UID

    node, invite, transport = target
    client = transport._client
    ghost = UserCodeStatusChange(
        value=UserCodeStatus.APPROVED,
        linked_obj=LinkedObject(server_uid=client.id, service_type=UserCodeService, object_type=UserCodeStatusCollection, object_uid=UID()),
        linked_user_code=LinkedObject(server_uid=client.id, service_type=UserCodeService, object_type=UserCode, object_uid=UID()))
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    result = _call(session, invite, "request.submit", request=SubmitRequest(changes=[ghost]))
    assert "refused by fedseg node" in str(result)
    _logged(node, "refused API call 'request.submit'", "127.0.0.1")
    _serves(transport)


def test_plain_http_is_refused(target):
    node, invite, transport = target
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{invite.host}:{invite.port}/api/v2/metadata", timeout=10)
    _logged(node, "refused a TLS connection from 127.0.0.1")
    # And the coordinator's side never speaks it: a session to the node refuses http:// outright.
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    with pytest.raises(requests.exceptions.ConnectionError, match="plain HTTP .* refused"):
        session.get(f"http://{invite.host}:{invite.port}/api/v2/metadata")
    _serves(transport)


def test_a_plain_http_invite_is_refused(target, tmp_path):
    _, invite, _ = target
    data = json.loads(target[0].invite.read_text()) | {"url": f"http://{invite.host}"}
    (tmp_path / "http.json").write_text(json.dumps(data))
    with pytest.raises(TransportError, match="not https://"):
        load_invite(tmp_path / "http.json")


def test_a_connection_without_the_client_certificate_is_refused_at_the_handshake(target):
    node, invite, transport = target
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with context.wrap_socket(socket.create_connection((invite.host, invite.port), timeout=10)) as tls:
            # TLS 1.3 reports the missing certificate at the first read, as an alert or a hang-up.
            tls.sendall(b"GET /api/v2/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = tls.recv(100)
    except OSError:  # ssl.SSLError included
        reply = b""
    assert reply == b"", f"the node answered a client without a certificate: {reply!r}"
    # A certificate the node did not issue fares no better.
    stranger = issue("stranger", server=False)
    session = pinned_session(invite.tls_fingerprint, stranger.cert_pem, stranger.key_pem)
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{_base(invite)}/api/v2/metadata")
    _logged(node, "refused a TLS connection from 127.0.0.1", "CERTIFICATE")
    _serves(transport)


class _Impostor:
    """A TLS server with its own certificate on a free port, recording any bytes a client sends it."""

    def __init__(self, folder: Path) -> None:
        pair = issue("impostor", server=True)
        self._cert, self._key = folder / "impostor.pem", folder / "impostor.key"
        self._cert.write_text(pair.cert_pem)
        self._key.write_text(pair.key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self._cert, self._key)
        self.received = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.received += tls.recv(65536)
            except OSError:
                if self.sock.fileno() < 0:
                    return

    def close(self) -> None:
        self.sock.close()


def test_an_impostor_with_the_wrong_certificate_is_refused_before_any_credential_is_sent(target, tmp_path):
    node, invite, transport = target
    impostor = _Impostor(tmp_path)
    try:
        data = json.loads(node.invite.read_text()) | {"port": impostor.port}
        (tmp_path / "impostor.json").write_text(json.dumps(data))
        with pytest.raises(TransportError) as err:
            SyftTransport(load_invite(tmp_path / "impostor.json")).connect()
    finally:
        impostor.close()
    assert "not the one pinned in the invite" in str(err.value) and "\n" not in str(err.value)
    assert invite.password.encode() not in impostor.received and b"/login" not in impostor.received
    _serves(transport)


def test_another_nodes_certificate_is_refused(federation, tmp_path):
    # site-a's invite pointed at site-b: a real fedseg node, but not the pinned one.
    invite = json.loads(federation["site-a"].invite.read_text())
    invite["port"] = json.loads(federation["site-b"].invite.read_text())["port"]
    crossed = tmp_path / "crossed.json"
    crossed.write_text(json.dumps(invite))
    result = fedseg("run", "--invite", str(crossed), "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "node site-a" in result.stderr and "not the one pinned in the invite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_failed_logins_are_logged_and_rate_limited(target):
    node, invite, transport = target
    session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
    email = f"guess-{os.getpid()}@attacker.org"
    for attempt in range(MAX_FAILURES):
        with pytest.raises(Exception, match="(?i)invalid|credentials|not found"):
            login(invite.host, invite.port, email, f"guess-{attempt}", session)
    _logged(node, f"failed login as {email} from 127.0.0.1", f"({MAX_FAILURES} in the last minute)")
    with pytest.raises(Exception, match="too many failed logins"):
        login(invite.host, invite.port, email, "one-more-guess", session)
    _logged(node, f"refused login as {email} from 127.0.0.1", "too many failed logins")
    # The coordinator logs in from the same address all the same.
    fresh = SyftTransport(invite)
    fresh.connect()
    _serves(fresh)


def test_node_files_are_private(target):
    node, _, transport = target
    _serves(transport)  # so the node has logged, stored and written everything it writes
    assert (node.workdir.stat().st_mode & 0o777) == 0o700
    checked = []
    for root, folders, files in os.walk(node.workdir):
        for name in folders:
            assert (Path(root, name).stat().st_mode & 0o777) == 0o700, Path(root, name)
        for name in files:
            path = Path(root, name)
            assert (path.stat().st_mode & 0o777) == 0o600, path
            checked.append(path.name)
    assert {"node.log", "server.log", "invite.json", "owner.json", "server.key", "identity.key"} <= set(checked)
    assert any(name.endswith("_json.db") for name in checked), "Syft's database was not checked"


def test_owner_password_is_not_in_the_server_process_environment(target):
    import psutil

    node, _, transport = target
    password = json.loads((node.workdir / "owner.json").read_text())["password"].encode()
    processes = [psutil.Process(node.process.pid), *psutil.Process(node.process.pid).children(recursive=True)]
    assert len(processes) >= 2, "the node's Syft server process was not found"
    for process in processes:
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        assert password not in environ and b"DEFAULT_ROOT_PASSWORD" not in environ, process.pid
    _serves(transport)
