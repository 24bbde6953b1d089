"""Where a call's frames wait while the Syft call itself carries only their SHA-256.

Syft keeps every object a call brings or returns in its store: it serializes the object,
signs it, base64-encodes it into SQLite and reads it back, so a call carrying a 7.25 MB
model spent about 1.3 s of the node's and the coordinator's CPU on Syft alone (measured
here with a quiet machine; 5 to 9 s of a round's wall time on a loaded one). The frames
cross instead on fedseg's own route, on the same mutual-TLS connection, and the Syft call
names them by digest. The node's control is unchanged: the approved action still runs
every call and reads the frame only through the digest inside the coordinator's signed
call, which therefore covers the frame; the audit log sees every frame as before.

A frame waits at most :data:`TTL_S` seconds and the stage holds at most :data:`CAPACITY`
frames of each direction, so a peer that uploads and never calls cannot grow the node's
memory; the route has already refused anything over the node's message limit. A reply
is handed out once.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

__all__ = ["CAPACITY", "TTL_S", "FrameStage", "STAGE"]

#: Frames of one direction waiting at once: a coordinator has one call in flight per node,
#: and a retry after a dropped connection re-uploads its frame.
CAPACITY = 4
#: Longer than any upload-then-call or call-then-fetch gap (milliseconds in practice).
TTL_S = 300.0


class _Slots:
    """Frames by hex digest, oldest first, dropped when stale or when the newest pushes them out."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self._frames: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._lock = threading.Lock()

    def put(self, frame: bytes) -> str:
        digest = hashlib.sha256(frame).hexdigest()
        now = time.monotonic()
        with self._lock:
            self._frames.pop(digest, None)
            self._frames[digest] = (now + self._ttl_s, frame)
            while len(self._frames) > self._capacity or self._frames[next(iter(self._frames))][0] < now:
                self._frames.popitem(last=False)
        return digest

    def take(self, digest: str) -> bytes | None:
        with self._lock:
            expires, frame = self._frames.pop(digest, (0.0, b""))
        return frame if expires >= time.monotonic() else None


class FrameStage:
    """The node's staged request frames (uploaded, not yet called) and reply frames (served, not yet fetched)."""

    def __init__(self, capacity: int = CAPACITY, ttl_s: float = TTL_S) -> None:
        self.requests = _Slots(capacity, ttl_s)
        self.replies = _Slots(capacity, ttl_s)


#: The server process's stage, shared by its route and its approved action.
STAGE = FrameStage()
