"""A hospital's PySyft 0.9.5 datasite, serving only fedseg's whitelisted actions.

Why approved code requests rather than ``sy.api_endpoint``: both were measured here on
loopback. An endpoint call is always queued as a server job and polled, costing
1.6 s for a 100-byte payload and 3.2 s for 2 MB; the approved Syft function runs in
the request and cost 0.15 s and 1.1-1.3 s. At a ~15 s local round the endpoint path
alone would eat most of the 10% overhead budget. The function a node approves is
fixed (``fedseg.protocol.syft_action``): its source hash, its policies and its
requester are checked by :func:`~.perimeter.approval.review_request`, and everything else
is denied, because approved code runs unsandboxed in the server (PYSEC-2026-546).

The Syft server itself runs behind the node's perimeter (:mod:`.perimeter`): HTTPS with
client certificates only, and an allow-list of callers and Syft paths.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.protocol.errors import TransportError
from fedseg.protocol.invite import Invite, load_invite
from fedseg.protocol.files import write_private
from fedseg.protocol.identity import fingerprint, load_or_create_identity
from fedseg.protocol.tls_session import login, pinned_session

from .config import WORKDIR_ENV, NodeConfig
from .datasets import SiteIndex, load_arrays
from .errors import NodeError
from .node_log import log
from .perimeter.allow_list import Callers
from .perimeter.approval import review_request
from .perimeter.server import ServerSettings, SyftServer
from .perimeter.tls import KeyPair, issue, load_or_issue, trust_bundle
from .syft_retention import StoreRetention

__all__ = ["DATASET_NAME", "SUMMARY_ASSET", "serve"]


DATASET_NAME = "site"
SUMMARY_ASSET = "summary"
IMAGES_ASSET = "images"
OWNER_EMAIL = "data-owner@fedseg.org"
#: Approval poll period right after a request: a coordinator waits about this long once per session.
REVIEW_PERIOD_S = 0.5
#: The poll slows down to this while nothing is pending: a coordinator asks for approval once per
#: session, and an idle node should cost next to no CPU (about 3% of a core at the fast period).
IDLE_REVIEW_PERIOD_S = 4.0
#: Registered images are capped at this side: the asset is for discovery, not training.
ASSET_SIZE = 128


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        # As uvicorn does, so a port left in TIME_WAIT by a previous run counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _mock_like(images: np.ndarray, seed: int) -> np.ndarray:
    # The mock side lets a coordinator try its plan on data of the real shape, revealing nothing.
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=images.shape, dtype=np.uint8)


def serve(config: NodeConfig, index: SiteIndex, host: str, port: int, say: Any, stop: threading.Event | None = None,
          new_credentials: bool = False) -> None:
    """Launches the datasite, issues the coordinator's invite, and serves until stopped.

    A node restarted on the same workdir keeps its identity key, its personal state and,
    unless ``new_credentials``, the coordinator credentials of its last invite: the
    coordinator's invite stays valid, so it reconnects by itself. Syft's own database
    starts afresh each time (its credentials are re-registered), so no stale session,
    approval or job survives a restart.

    Args:
        config: The node's settings (already saved in its workdir).
        index: The validated site index.
        host: Address to bind.
        port: Port to bind.
        say: Prints one line to the data owner's terminal.
        stop: Set to shut down; SIGINT and SIGTERM also set it.
        new_credentials: Issue new coordinator credentials (the old invite stops working).

    Raises:
        NodeError: If the port is taken or the server does not come up.
    """
    workdir = Path(config.workdir)
    if not _port_free(host, port):
        raise NodeError(f"port {port} on {host} is already in use; choose another with --port")
    previous = _previous_invite(workdir / "invite.json", config.name) if not new_credentials else None
    # Until the node serves, no invite: a launcher waiting for this node must not find the last one.
    (workdir / "invite.json").unlink(missing_ok=True)
    identity = load_or_create_identity(workdir / "identity.key")
    owner_password = secrets.token_urlsafe(24)
    write_private(workdir / "owner.json", json.dumps({"email": OWNER_EMAIL, "password": owner_password}).encode())
    if previous is not None:
        coordinator_email, password = previous.email, previous.password
        coordinator_tls = KeyPair(previous.client_cert, previous.client_key)
    else:
        coordinator_email, password = f"coordinator-{secrets.token_hex(4)}@fedseg.org", secrets.token_urlsafe(24)
        coordinator_tls = issue(f"fedseg coordinator of {config.name}", server=False)
    # Kept across restarts, so the invite's pin stays valid; the owner's certificate never leaves this process.
    server_tls = load_or_issue(workdir / "tls", "server", f"fedseg node {config.name}", server=True)
    owner_tls = issue(f"fedseg owner of {config.name}", server=False)
    settings = ServerSettings(name=config.name, host=host, port=port, callers=Callers(coordinator_email, OWNER_EMAIL),
                              certfile=workdir / "tls" / "server.pem", keyfile=workdir / "tls" / "server.key",
                              client_cas=trust_bundle(workdir / "tls" / "clients.pem", [coordinator_tls, owner_tls]),
                              max_frame_bytes=config.max_message_mb * 2**20)
    os.environ.update(
        {
            "SYFT_TEMP_ROOT": str(workdir / "syft"),
            WORKDIR_ENV: str(workdir),
        }
    )
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    import syft as sy

    server = SyftServer(settings, owner_password)
    try:
        session = pinned_session(server_tls.fingerprint, owner_tls.cert_pem, owner_tls.key_pem)
        server.wait_ready(session)
        do = login(host, port, OWNER_EMAIL, owner_password, session)
        images, _ = load_arrays(index, min(ASSET_SIZE, (index.native_size or (ASSET_SIZE,))[0]))
        dataset = sy.Dataset(name=DATASET_NAME)
        dataset.add_asset(sy.Asset(name=IMAGES_ASSET, data=images, mock=_mock_like(images, config.split_seed)))
        summary = np.array([len(index), index.channels], dtype=np.int64)
        summary_asset = sy.Asset(name=SUMMARY_ASSET, data=summary)
        # With a mock, Syft runs approved code a second time on the mock side: an empty
        # mock keeps every round to one training run.
        summary_asset.no_mock()
        dataset.add_asset(summary_asset)
        do.upload_dataset(dataset)
        retention = StoreRetention(do, [asset.action_id for asset in do.datasets[DATASET_NAME].assets], config.syft_retention_s)
        # As an admin call, not through Syft's /register route, which the perimeter does not serve.
        do.users.create(name="coordinator", email=coordinator_email, password=password, password_verify=password)
        url = f"https://{host}"
        invite = Invite(url=url, port=port, node=config.name, email=coordinator_email, password=password,
                        fingerprint=fingerprint(identity.public_key()), tls_fingerprint=server_tls.fingerprint,
                        client_cert=coordinator_tls.cert_pem, client_key=coordinator_tls.key_pem)
        invite.save(workdir / "invite.json")
        again = "the same invite as before" if previous is not None and previous == invite else "a new invite"
        say(f"node {config.name} serving {len(index)} images at {url}:{port} (TLS); {again}: {workdir / 'invite.json'}")
        _review_loop(do, coordinator_email, stop, retention)
    finally:
        say(f"node {config.name} shutting down")
        server.land()


def _previous_invite(path: Path, name: str) -> Invite | None:
    """The node's last invite, if it has one that is readable and its own."""
    if not path.exists():
        return None
    try:
        invite = load_invite(path)
    except TransportError as exc:
        log.warning("not reusing the previous invite: %s", exc)
        return None
    return invite if invite.node == name else None


def _review_loop(do: Any, coordinator_email: str, stop: threading.Event, retention: StoreRetention) -> None:
    period = REVIEW_PERIOD_S
    # Requests that could be neither approved nor denied stay pending in Syft: decided once, not at every poll.
    given_up: set[str] = set()
    while not stop.wait(period):
        try:
            retention.step()
        except Exception as exc:  # as below: the store is tidied at the next check
            log.warning("could not tidy the Syft store: %s", exc)
        try:
            pending = do.api.services.request.get_all_pending()
        except Exception as exc:  # a transient server hiccup must not stop the node
            log.warning("could not list pending requests: %s", exc)
            continue
        pending = [r for r in pending if str(r.id) not in given_up]
        # Fast while requests arrive (a coordinator connecting), then back off while idle.
        period = REVIEW_PERIOD_S if pending else min(2 * period, IDLE_REVIEW_PERIOD_S)
        for request in pending:
            if not _decide(request, coordinator_email):
                given_up.add(str(request.id))


def _decide(request: Any, coordinator_email: str) -> bool:
    """Approves or denies one request; an error in it denies it, and the node keeps serving.

    Returns:
        False if neither could be done (logged).
    """
    who = getattr(request, "requesting_user_email", "?")
    try:
        reason = review_request(request, coordinator_email)
    except Exception as exc:
        reason = f"the request could not be checked ({_one_line(exc)})"
    try:
        if reason is None:
            request.approve()
            log.info("approved fedseg action for %s", who)
        else:
            request.deny(reason=f"refused by fedseg node: {reason}")
            log.warning("refused request from %s: %s", who, reason)
    except Exception as exc:
        log.warning("could not %s the request from %s: %s", "approve" if reason is None else "deny", who, _one_line(exc))
        return False
    return True


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
