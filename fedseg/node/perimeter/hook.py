"""The perimeter inside the node's Syft server: checks every request before Syft dispatches it.

Three places see everything that reaches Syft from the network, and fedseg guards each:

- the HTTP routes (an ASGI wrapper around Syft's app): only :data:`~.allow_list.ROUTES`
  are served, and ``/api`` (which hands out a caller's API) only to an allowed caller;
  fedseg's own frame route (:mod:`.frame_route`) is answered here, never by Syft;
- ``Server.handle_api_call_with_unsigned_result``, which every API call passes through:
  the call must be validly signed, addressed to this server, and allowed for its caller
  and path by the :class:`~.allow_list.AllowList`;
- the user service's ``exchange_credentials`` (the login): failures are logged and
  limited by a :class:`~.login_limit.LoginLimit`.

Before all three, the TLS handshake refuses peers without a client certificate the node
issued, and plain HTTP; :func:`log_tls_refusals` writes those refusals to the log too.

Every refusal answers with an error and one line in ``node.log`` naming the peer's address.
"""
from __future__ import annotations

import contextvars
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ..node_log import log
from .allow_list import API_ROUTE, ROUTES, AllowList
from .frame_route import answer, is_frame_route, serve_frame_route
from .login_limit import LoginLimit

__all__ = ["Peer", "guard_routes", "guard_server", "log_tls_refusals"]


@dataclass(frozen=True)
class Peer:
    """Where an HTTP request came from.

    Attributes:
        address: The peer's IP address.
        local: Whether it is the node's own machine (loopback, or the very address it reached).
    """

    address: str
    local: bool


#: The peer of the HTTP request being served; Starlette copies it into the worker thread that runs Syft.
PEER: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("fedseg_peer", default=None)


def _peer(scope: dict[str, Any]) -> Peer:
    client = (scope.get("client") or ("unknown", 0))[0]
    server = (scope.get("server") or ("", 0))[0]
    try:
        loopback = ipaddress.ip_address(client).is_loopback
    except ValueError:
        loopback = False
    return Peer(client, loopback or client == server)


def _refuse(what: str, peer: Peer | None, reason: str) -> str:
    address = peer.address if peer else "inside the server"
    log.warning("perimeter: refused %s from %s: %s", what, address, reason)
    return f"refused by fedseg node: {reason}"


def guard_routes(app: Any, allow: AllowList, max_frame_bytes: int) -> Any:
    """Wraps Syft's ASGI app so that only fedseg's routes are served, each with the peer known.

    Args:
        app: Syft's app.
        allow: Who may call which Syft path.
        max_frame_bytes: The node's message limit, for :mod:`.frame_route`.
    """

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        peer = _peer(scope)
        route = scope["path"]
        if is_frame_route(route):
            await serve_frame_route(scope, receive, send, max_frame_bytes, lambda what, reason: _refuse(what, peer, reason))
            return
        reason = None
        if route not in ROUTES:
            reason = f"route {route} is not served"
        elif route == API_ROUTE:
            key = parse_qs(scope.get("query_string", b"").decode()).get("verify_key", [""])[0]
            reason = allow.refusal(key, None, peer.local)
        if reason is not None:
            await answer(send, 403, _refuse(f"{scope.get('method', '')} {route}", peer, reason).encode())
            return
        token = PEER.set(peer)
        try:
            await app(scope, receive, send)
        finally:
            PEER.reset(token)

    return guarded


def guard_server(worker: Any, allow: AllowList, logins: LoginLimit) -> None:
    """Installs the API-call and login checks on a Syft ``Server`` before it serves."""
    from syft.service.response import SyftError
    from syft.types.errors import SyftException

    own_key = str(worker.verify_key)
    handle = worker.handle_api_call_with_unsigned_result

    def refusal(api_call: Any, peer: Peer | None) -> str | None:
        message = getattr(api_call, "message", None)
        if message is None or not getattr(api_call, "is_valid", False):
            return "the call is not validly signed"
        if message.server_uid != worker.id:
            return "the call is addressed to another server"
        key = str(api_call.credentials)
        if peer is None:
            # Syft calling itself in-process: only with the server's own key.
            return None if key == own_key else "an in-process call with a key not the server's"
        return allow.refusal(key, message.path, peer.local)

    def handle_api_call_with_unsigned_result(api_call: Any, *args: Any, **kwargs: Any) -> Any:
        peer = PEER.get()
        try:
            reason = refusal(api_call, peer)
        except Exception as exc:  # a malformed call must be refused, not crash the route
            reason = f"malformed call ({type(exc).__name__})"
        if reason is not None:
            path = getattr(getattr(api_call, "message", None), "path", "?")
            return SyftError(message=_refuse(f"API call {path!r}", peer, reason))
        return handle(api_call, *args, **kwargs)

    worker.handle_api_call_with_unsigned_result = handle_api_call_with_unsigned_result

    users = worker.services.user
    exchange = users.exchange_credentials

    def exchange_credentials(context: Any) -> Any:
        peer = PEER.get()
        address = peer.address if peer else "inside the server"
        email = getattr(context.login_credentials, "email", "?")
        wait = logins.wait_s(address, email)
        if wait > 0:
            raise SyftException(public_message=_refuse(f"login as {email}", peer, f"too many failed logins; try again in {wait:.0f} s"))
        try:
            return exchange(context=context)
        except Exception:
            count = logins.failed(address, email)
            log.warning("perimeter: failed login as %s from %s (%d in the last minute)", email, address, count)
            raise

    users.exchange_credentials = exchange_credentials


def log_tls_refusals() -> None:
    """Logs every failed TLS handshake of this process's asyncio servers with the peer's address.

    asyncio reports a failed handshake nowhere unless its loop runs in debug mode, so the
    handshake's completion callback is wrapped (Python 3.11's ``SSLProtocol``; fedseg
    requires 3.11). Only the node's server process calls this.
    """
    from asyncio import sslproto

    complete = sslproto.SSLProtocol._on_handshake_complete
    if getattr(complete, "fedseg_logged", False):
        return

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            transport = getattr(self, "_transport", None)
            peername = transport.get_extra_info("peername") if transport is not None else None
            # asyncio passes the class ConnectionResetError when the peer hangs up mid-handshake.
            reason = getattr(handshake_exc, "reason", None) or getattr(handshake_exc, "__name__", None) or type(handshake_exc).__name__
            log.warning("perimeter: refused a TLS connection from %s: %s", peername[0] if peername else "unknown", reason)
        complete(self, handshake_exc)

    on_handshake_complete.fedseg_logged = True  # type: ignore[attr-defined]
    sslproto.SSLProtocol._on_handshake_complete = on_handshake_complete
