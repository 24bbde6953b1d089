"""Test doubles for the round engine: in-memory transports over the node's real whitelist.

They serve unit tests of the engine's logic; the end-to-end tests use real Syft nodes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedseg.node.actions import NodeRuntime, handle
from fedseg.protocol.errors import MessageError, TransportError
from fedseg.protocol.messages import Message, TrainReply, decode
from fedseg.protocol.plan import Plan

TINY = {
    "rounds": 2,
    "image_size": 32,
    "model": {"width": 4, "depth": 2, "groups": 2},
    "train": {"batch_size": 4, "local_epochs": 1.0, "augment": False},
}
SITES = ("site-a", "site-b", "site-c")


def tiny_plan(**overrides: Any) -> Plan:
    return Plan.from_dict({**TINY, **overrides})


class InMemoryTransport:
    """Hands frames straight to a node's whitelist and records what crossed the 'wire'."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.name = runtime.name
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connected = False
        self.requests: list[Message] = []
        self.replies: list[Message] = []

    def connect(self) -> None:
        self.connected = True

    def exchange(self, frame: bytes) -> bytes:
        if not self.connected:
            raise TransportError(f"node {self.name}: exchange before connect")
        request = decode(frame)
        self.bytes_sent += len(frame)
        reply = self.serve(request, frame)
        self.bytes_received += len(reply)
        self.requests.append(request)
        try:
            self.replies.append(decode(reply))
        except MessageError:
            pass  # a tampered reply; the engine must refuse it
        return reply

    def serve(self, request: Message, frame: bytes) -> bytes:
        return handle(self.runtime, frame)

    def train_replies(self) -> dict[int, TrainReply]:
        return {r.round: r for r in self.replies if isinstance(r, TrainReply)}

    def kinds(self) -> list[tuple[str, int | None]]:
        return [(m.KIND.value, getattr(m, "round", None)) for m in self.requests]


class FailingTransport(InMemoryTransport):
    """Raises TransportError for every request ``fails(request)`` selects."""

    def __init__(self, runtime: NodeRuntime, fails: Callable[[Message], bool]) -> None:
        super().__init__(runtime)
        self.fails = fails

    def serve(self, request: Message, frame: bytes) -> bytes:
        if self.fails(request):
            raise TransportError(f"node {self.name} did not answer (connection reset)")
        return super().serve(request, frame)


class TamperingTransport(InMemoryTransport):
    """Lets the real node answer, then rewrites its reply to requests ``applies`` selects."""

    def __init__(self, runtime: NodeRuntime, applies: Callable[[Message], bool], tamper: Callable[[Message], bytes]) -> None:
        super().__init__(runtime)
        self.applies, self.tamper = applies, tamper

    def serve(self, request: Message, frame: bytes) -> bytes:
        reply = super().serve(request, frame)
        return self.tamper(decode(reply)) if self.applies(request) else reply


class Reporter:
    def __init__(self) -> None:
        self.infos: list[str] = []
        self.steps: list[str] = []
        self.rounds: list[tuple[int, list[dict[str, Any]], dict[str, Any]]] = []

    def info(self, text: str) -> None:
        self.infos.append(text)

    def step(self, text: str) -> None:
        self.steps.append(text)

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.rounds.append((round_, rows, summary))


class CannedTransport:
    """Answers every request with the same frame."""

    name = "site-x"
    bytes_sent = 0
    bytes_received = 0

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connect(self) -> None:
        pass

    def exchange(self, frame: bytes) -> bytes:
        return self.reply
