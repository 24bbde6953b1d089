"""Failed logins are counted per peer address and account, and slowed down past a few."""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

__all__ = ["LoginLimit", "MAX_FAILURES", "WINDOW_S"]

#: Failed logins a peer may make for one account within :data:`WINDOW_S` before it is refused.
MAX_FAILURES = 5
WINDOW_S = 60.0


class LoginLimit:
    """Sliding-window count of failed logins, keyed by (peer address, email).

    Keyed by account too, so that a peer guessing at a made-up account does not lock the
    real coordinator out from the same address.
    """

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self._max, self._window = max_failures, window_s
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        failures = self._failures[key]
        while failures and now - failures[0] > self._window:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def wait_s(self, peer: str, email: str) -> float:
        """Seconds until this peer may try this account again; 0 if it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent((peer, email), now)
            return self._window - (now - failures[0]) if len(failures) >= self._max else 0.0

    def failed(self, peer: str, email: str) -> int:
        """Records a failed login; returns the peer's failures for this account in the window."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent((peer, email), now)
            failures.append(now)
            self._failures[(peer, email)] = failures
            return len(failures)
