"""The coordinator's side of the wire to a node's Syft datasite.

One session per node: log in with the invite's credentials over a mutual-TLS session
pinned to the invite's certificate (:mod:`.tls_session`), submit the single fedseg
action as a code request (or reuse an approved one), wait for the node to approve it,
then exchange one frame per call: the frame is staged on the node's frame route, the Syft
call runs the approved action on its SHA-256, and the reply frame is fetched from the
route by the digest the call returns (:mod:`fedseg.node.perimeter.frame_stage` says why).
Syft is imported here lazily, and only here on the coordinator's side.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from typing import Any

from .errors import TransportError
from .invite import Invite
from .syft_action import ACTION_NAME, FRAMES_ROUTE, fedseg_action, from_payload, served_seconds, to_payload
from .tls_session import login, pinned_session, tls_refusal

__all__ = ["SyftTransport"]

#: Connecting, then waiting for the bytes of a frame (up to the plan's message limit).
HTTP_TIMEOUT_S = (10.0, 600.0)


@contextlib.contextmanager
def _quiet():
    # Syft prints banners and progress bars on every login and upload.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class SyftTransport:
    """Frame exchange with one node over its Syft datasite.

    Args:
        invite: The node's invite.
        approval_timeout_s: How long to wait for the node to approve the action.
    """

    def __init__(self, invite: Invite, approval_timeout_s: float = 60.0) -> None:
        self.invite = invite
        self.name = invite.node
        self.bytes_sent = 0
        self.bytes_received = 0
        self._client: Any = None
        self._session: Any = None
        self._site: Any = None
        self._approval_timeout_s = approval_timeout_s
        #: Where the last call's time went (seconds): ``upload`` (the request frame staged on
        #: the node's frame route, and its digest sent as a Syft object), ``run`` (the code
        #: call, answered when the node's job is done), ``fetch`` (the reply's digest, by
        #: ``.get()``, and its frame from the route), and, as the node reports them,
        #: ``node_wall`` and ``node_cpu`` spent in fedseg's own code inside ``run``.
        self.last_call: dict[str, float] = {}

    @property
    def address(self) -> str:
        return f"{self.invite.url}:{self.invite.port}"

    def connect(self) -> None:
        """Logs in and makes sure the fedseg action is approved on the node; once per transport.

        Raises:
            TransportError: If the node is unreachable, refuses the credentials, or denies the action.
        """
        if self._client is not None:
            return
        import syft as sy
        from syft.service.policy.policy import OutputPolicyExecuteCount

        # Syft's client retries a refused connection and urllib3 logs each retry as a warning
        # on the root handler Syft installs; the one line below says what failed.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        invite = self.invite
        try:
            with _quiet():
                session = pinned_session(invite.tls_fingerprint, invite.client_cert, invite.client_key)
                client = login(invite.host, invite.port, invite.email, invite.password, session)
        except Exception as exc:
            text = str(exc)
            refusal = tls_refusal(exc)
            if refusal is not None:
                raise TransportError(f"node {self.name} at {self.address}: {refusal}") from None
            if "Connection refused" in text or "Max retries" in text:
                raise TransportError(f"node {self.name} at {self.address} is not reachable") from None
            raise TransportError(f"node {self.name} at {self.address} refused the login: {_first_line(text)}") from None
        try:
            self._site = client.datasets["site"].assets["summary"]
        except Exception:
            raise TransportError(f"node {self.name} at {self.address} has no fedseg site dataset") from None
        self._client = client
        self._session = session
        if self._approved_function() is None:
            with _quiet():
                function = sy.syft_function(
                    input_policy=sy.MixedInputPolicy(site=self._site, message=dict, client=client),
                    output_policy=OutputPolicyExecuteCount(limit=10**9),
                )(fedseg_action)
                client.code.request_code_execution(function)
            self._wait_for_approval()

    def _approved_function(self) -> Any:
        with _quiet():
            requests = list(self._client.requests)
        for request in reversed(requests):
            code = request.code
            if getattr(code, "service_func_name", None) != ACTION_NAME:
                continue
            status = str(request.status)
            if "APPROVED" in status:
                return code
            if "REJECTED" in status:
                raise TransportError(f"node {self.name} denied the fedseg action: {request.deny_reason}")
        return None

    def _wait_for_approval(self) -> None:
        deadline = time.monotonic() + self._approval_timeout_s
        while time.monotonic() < deadline:
            if self._approved_function() is not None:
                self._client.refresh()
                return
            time.sleep(0.3)
        raise TransportError(f"node {self.name} did not approve the fedseg action within {self._approval_timeout_s:.0f} s")

    def exchange(self, frame: bytes) -> bytes:
        """Sends one request frame and returns the node's reply frame.

        A node restarted since the last call (same workdir, same invite) has a fresh Syft
        database, so this session no longer exists there. After a failed call the transport
        logs in again with the invite and retries once; a node that is down fails that
        login, and the error says it is not reachable.

        Raises:
            TransportError: If the call fails at the Syft level, or the node is unreachable.
        """
        if self._client is None:
            self.connect()
        try:
            reply = self._call(frame)
        except TransportError:
            self._client = None
            self.connect()
            reply = self._call(frame)
        self.bytes_sent += len(frame)
        self.bytes_received += len(reply)
        return reply

    def _call(self, frame: bytes) -> bytes:
        import syft as sy

        base = f"https://{self.invite.host}:{self.invite.port}{FRAMES_ROUTE}"
        try:
            t0 = time.perf_counter()
            staged = self._session.post(base, data=frame, timeout=HTTP_TIMEOUT_S)
            if staged.status_code == 413:  # the node's own typed refusal of the frame's size
                return staged.content
            if staged.status_code != 200:
                raise TransportError(f"node {self.name} at {self.address} refused the frame: HTTP {staged.status_code}: {staged.text[:300]}")
            digest = staged.text.strip()
            if digest != hashlib.sha256(frame).hexdigest():
                raise TransportError(f"node {self.name} at {self.address} staged the frame under a wrong digest")
            # No output capture here: calls run on several threads, and redirecting
            # sys.stdout is process-wide.
            pointer = sy.ActionObject.from_obj(to_payload(digest)).send(self._client)
            t1 = time.perf_counter()
            answer = getattr(self._client.code, ACTION_NAME)(site=self._site, message=pointer)
            t2 = time.perf_counter()
            result = answer.get()
            reply_digest = from_payload(result)
            if reply_digest is None:
                raise TransportError(f"node {self.name} at {self.address} answered with {type(result).__name__}, not a fedseg reply")
            fetched = self._session.get(f"{base}/{reply_digest}", timeout=HTTP_TIMEOUT_S)
            t3 = time.perf_counter()
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"node {self.name} at {self.address}: call failed: {_first_line(str(exc))}") from None
        reply = fetched.content
        if fetched.status_code != 200 or hashlib.sha256(reply).hexdigest() != reply_digest:
            raise TransportError(f"node {self.name} at {self.address}: reply {reply_digest[:12]}... could not be fetched: HTTP {fetched.status_code}")
        node_wall, node_cpu = served_seconds(result) or (float("nan"), float("nan"))
        self.last_call = {"upload": t1 - t0, "run": t2 - t1, "fetch": t3 - t2, "node_wall": node_wall, "node_cpu": node_cpu}
        return reply


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "unknown error"
