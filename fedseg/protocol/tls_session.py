"""Pinned mutual-TLS sessions to one node, and the Syft clients that use them.

The one place where fedseg's TLS meets Syft's HTTP client, solving its three traps per
connection instead of process-wide:

- an ``https`` URL makes Syft assume port 443 (``ServerURL.__copy__`` re-parses the URL, so
  every derived route falls back to 443): the connection's URL keeps its port when copied;
- Syft verifies TLS against a process-wide CA bundle (``verify=True`` on every call): the
  session's adapter checks the node's certificate against the pin of that node's invite
  instead, and presents the client certificate that node issued;
- Syft posts every API call with a bare ``requests.post``: connections that carry a pinned
  session send their calls through it.

Plain HTTP is refused by the session itself. Syft is imported lazily, and only by :func:`login`.
"""
from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

__all__ = ["TLSRefused", "cert_fingerprint", "pinned_session", "login", "tls_refusal"]


class TLSRefused(requests.exceptions.ConnectionError):
    """The peer is not the pinned node, or the connection was not TLS; one line, no retry."""


def cert_fingerprint(cert_pem: str) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER bytes, as pinned in an invite."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _client_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting this certificate; the server is checked by the pin, not by a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # The ssl module loads a key only from a file: a private folder, deleted once loaded.
    with tempfile.TemporaryDirectory(prefix="fedseg-tls-") as folder:
        cert, key = Path(folder) / "client.pem", Path(folder) / "client.key"
        for path, text in ((cert, cert_pem), (key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        context.load_cert_chain(cert, key)
    return context


class _PinnedAdapter(HTTPAdapter):
    def __init__(self, fingerprint: str, context: ssl.SSLContext) -> None:
        self._pin = fingerprint.removeprefix("sha256:")
        self._context = context
        # No retry: a wrong certificate is not transient, and the transport retries calls itself.
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(ssl_context=self._context, assert_fingerprint=self._pin)
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        # Syft passes verify=True (its process-wide CA check) on each call: the pin replaces it.
        kwargs.update(verify=False, cert=None)
        try:
            return super().send(request, **kwargs)
        except requests.exceptions.SSLError as exc:
            text = str(exc)
            where = request.url.split("/api/", 1)[0] if request.url else "the node"
            if "Fingerprints did not match" in text:
                got = text.split("got ", 1)[-1].split(".", 1)[0].strip("'\" ")
                raise TLSRefused(f"TLS: its certificate is not the one pinned in the invite "
                                 f"(expected sha256:{self._pin[:16]}..., got sha256:{got[:16]}...); refused as an impostor") from None
            raise TLSRefused(f"TLS: handshake with {where} failed: {_reason(text)}") from None


class _PlainRefused(HTTPAdapter):
    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        raise TLSRefused(f"TLS: plain HTTP to {request.url} refused; fedseg nodes serve HTTPS only")


def _reason(text: str) -> str:
    # e.g. "...(Caused by SSLError(SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)')))"
    if "[SSL" in text:
        return text[text.index("[SSL"):].split("(_ssl", 1)[0].strip()
    return text.splitlines()[0][:200] if text else "unknown error"


def pinned_session(fingerprint: str, cert_pem: str, key_pem: str) -> requests.Session:
    """A session that talks only HTTPS, only to the server whose certificate has this fingerprint.

    Args:
        fingerprint: ``sha256:<hex>`` of the node's certificate (from its invite).
        cert_pem: The client certificate the node issued for this caller.
        key_pem: Its private key.
    """
    session = requests.Session()
    session.trust_env = False  # no proxy or CA bundle from the environment decides where calls go
    session.mount("https://", _PinnedAdapter(fingerprint, _client_context(cert_pem, key_pem)))
    session.mount("http://", _PlainRefused())
    return session


def tls_refusal(exc: BaseException) -> str | None:
    """The one-line TLS refusal behind an error raised through Syft, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TLSRefused):
            return str(seen).removeprefix("TLS: ")
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "TLS: " in text:
        return text.split("TLS: ", 1)[1].splitlines()[0]
    return None


def _route_calls_through_session() -> None:
    """Makes Syft's API calls use the connection's session when it is a pinned one (once per process)."""
    from syft.client.client import HTTPConnection
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize

    if getattr(HTTPConnection.make_call, "fedseg_pinned", False):
        return
    syft_make_call = HTTPConnection.make_call

    def make_call(self: Any, signed_call: Any) -> Any:
        if not getattr(self.session_cache, "fedseg_pinned", False):
            return syft_make_call(self, signed_call)
        response = self.session_cache.post(url=str(self.api_url), data=_serialize(obj=signed_call, to_bytes=True), headers=self.headers)
        if response.status_code != 200:
            raise requests.ConnectionError(f"API call refused with HTTP {response.status_code}: {response.text[:200]}")
        return _deserialize(response.content, from_bytes=True)

    make_call.fedseg_pinned = True  # type: ignore[attr-defined]
    HTTPConnection.make_call = make_call


def _https_url(host: str, port: int) -> Any:
    from syft.types.server_url import ServerURL

    class HTTPSURL(ServerURL):
        def __copy__(self) -> ServerURL:
            return HTTPSURL(protocol="https", host_or_ip=self.host_or_ip, port=self.port, path=self.path, query=self.query)

    return HTTPSURL(protocol="https", host_or_ip=host, port=port)


def login(host: str, port: int, email: str, password: str, session: requests.Session) -> Any:
    """Logs in to a node's Syft datasite over a pinned session.

    Args:
        host: The node's address (no scheme).
        port: Its port.
        email: Account login.
        password: Account password.
        session: From :func:`pinned_session`.

    Returns:
        A logged-in ``syft`` client whose every request goes through ``session``.
    """
    from syft.client.client import HTTPConnection

    _route_calls_through_session()
    session.fedseg_pinned = True  # type: ignore[attr-defined]
    connection = HTTPConnection(url=_https_url(host, port))
    connection.session_cache = session
    client = connection.get_client_type().unwrap()(connection=connection)
    # No session cache: Syft's would hand another connection's client back for the same login.
    return client.login(email=email, password=password, cache=False)
