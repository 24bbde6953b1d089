"""The node's Syft server process: Syft's datasite and routes, behind fedseg's perimeter, over mutual TLS.

Started instead of ``sy.orchestra.launch(port=...)`` so that fedseg owns what listens on
the network: uvicorn serves HTTPS only and completes a handshake only with a client
certificate the node issued; inside, :mod:`.hook` checks every call before Syft sees it;
and the owner's password reaches Syft as an argument, never through the environment.
"""
from __future__ import annotations

import multiprocessing
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NodeError
from ..node_log import log
from .allow_list import AllowList, Callers

__all__ = ["ServerSettings", "SyftServer"]

#: How long the server may take to answer its first request (importing Syft alone takes up to 12 s cold).
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerSettings:
    """What the server process needs; nothing secret but the paths of its own key.

    Attributes:
        name: Node name (the datasite's name).
        host: Address to bind.
        port: Port to bind.
        callers: The accounts allowed to call.
        certfile: The node's server certificate (PEM).
        keyfile: Its private key.
        client_cas: The client certificates the node accepts (PEM bundle).
        max_frame_bytes: The largest frame the node accepts.
    """

    name: str
    host: str
    port: int
    callers: Callers
    certfile: Path
    keyfile: Path
    client_cas: Path
    max_frame_bytes: int


def _verify_key_lookup(worker: Any) -> Any:
    def verify_key_of(email: str) -> str | None:
        result = worker.services.user.stash.get_by_email(credentials=worker.verify_key, email=email)
        return str(result.unwrap().verify_key) if result.is_ok() else None

    return verify_key_of


def _serve(settings: ServerSettings, owner_password: list[str]) -> None:
    """The server process's body (a fork of the node process)."""
    import uvicorn
    from fastapi import APIRouter, FastAPI
    from syft.server.datasite import Datasite
    from syft.server.routes import make_routes

    from .hook import guard_routes, guard_server, log_tls_refusals
    from .login_limit import LoginLimit

    worker = Datasite(name=settings.name, reset=True, root_email=settings.callers.owner_email, root_password=owner_password.pop(),
                      processes=1, n_consumers=0, create_producer=False, deployment_type="remote", in_memory_workers=True)
    log_tls_refusals()
    allow = AllowList(settings.callers, _verify_key_lookup(worker))
    guard_server(worker, allow, LoginLimit())
    app = FastAPI(title=settings.name)
    router = APIRouter()
    router.include_router(make_routes(worker=worker))
    app.include_router(router, prefix="/api/v2")
    try:
        uvicorn.run(guard_routes(app, allow, settings.max_frame_bytes), host=settings.host, port=settings.port, log_level="warning",
                    ssl_certfile=str(settings.certfile), ssl_keyfile=str(settings.keyfile),
                    ssl_ca_certs=str(settings.client_cas), ssl_cert_reqs=ssl.CERT_REQUIRED,
                    # A TLS close waits for the peer's close_notify (30 s in asyncio): do not wait for idle clients.
                    timeout_graceful_shutdown=1,
                    # asyncio's own loop, not uvloop: :func:`.hook.log_tls_refusals` logs its failed handshakes.
                    loop="asyncio")
    finally:
        # Syft's worker leaves threads behind (and its stop() can hang): without this the process outlives its server.
        os._exit(0)


class SyftServer:
    """The running server process.

    Args:
        settings: Its settings.
        owner_password: The owner account's password; handed to the child in memory.
    """

    def __init__(self, settings: ServerSettings, owner_password: str) -> None:
        self.settings = settings
        # A list the child empties once Syft has the password, so no copy stays in its frames.
        self._process = multiprocessing.get_context("fork").Process(target=_serve, args=(settings, [owner_password]), name=f"fedseg-syft-{settings.name}", daemon=True)
        self._process.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def wait_ready(self, session: Any) -> None:
        """Waits until the server answers over TLS.

        Args:
            session: The owner's pinned session.

        Raises:
            NodeError: If the process exits or does not answer in time.
        """
        url = f"https://{self.settings.host}:{self.settings.port}/api/v2/metadata"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._process.is_alive():
                raise NodeError(f"the Syft server exited with code {self._process.exitcode}; see server.log")
            try:
                if session.get(url, timeout=5).status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.3)
        raise NodeError(f"the Syft server did not answer within {START_TIMEOUT_S:.0f} s; see server.log")

    def land(self) -> None:
        """Stops the server: SIGTERM, then SIGKILL if it lingers."""
        self._process.terminate()
        self._process.join(10)
        if self._process.is_alive():
            log.warning("the Syft server did not stop on SIGTERM; killing it")
            self._process.kill()
            self._process.join(5)
