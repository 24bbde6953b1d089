"""Starts ``fedseg node start`` as a child process group and stops it cleanly.

Used by ``fedseg demo``, the end-to-end tests and the benchmarks, so all of them run
nodes exactly as a data owner would, each in its own process.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import NodeError

__all__ = ["free_port", "NodeProcess"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (another process may still take it before use)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeProcess:
    """One node started through the CLI.

    Args:
        name: Node name.
        data: Site folder.
        workdir: Node workdir; its invite.json appears once the node serves.
        port: Port to bind (a free one if None).
        extra: Further ``fedseg node start`` arguments, e.g. ``["--limit", "40"]``.
        run_in: A command that runs the node inside it, e.g. ``["ip", "netns", "exec", "ns1"]``
            (it must exec the node, so that the node is this process).
    """

    def __init__(self, name: str, data: Path, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 run_in: list[str] | None = None) -> None:
        self.name, self.workdir = name, Path(workdir)
        self.port = port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output = self.workdir / "launcher.out"
        args = [*(run_in or []), sys.executable, "-m", "fedseg", "node", "start", "--name", name, "--data", str(data),
                "--workdir", str(self.workdir), "--port", str(self.port), *(extra or [])]
        with open(self.output, "wb") as out:
            # Own session, so stopping the node also stops the Syft server it spawns.
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def invite(self) -> Path:
        return self.workdir / "invite.json"

    def wait_ready(self, timeout_s: float = 180.0) -> Path:
        """Waits for the node's invite.

        Raises:
            NodeError: If the node exits first (with its last output) or the timeout passes.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NodeError(f"node {self.name} exited with code {self.process.returncode}: {self.tail()}")
            if self.invite.exists() and "serving" in self.output.read_text(errors="replace"):
                return self.invite
            time.sleep(0.3)
        raise NodeError(f"node {self.name} did not start within {timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the node's process group, then SIGKILL to whatever is left of it."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # The Syft server child can outlive its parent and hold the port; the group kill reaches it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)
