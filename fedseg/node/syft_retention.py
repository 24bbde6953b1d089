"""How long a node's Syft store keeps what each call brought and returned.

Syft keeps every object a call uploads or returns, for as long as the server runs. The
frames themselves never enter Syft's store (:mod:`.perimeter.frame_stage`); what a call
leaves there is the digest of the coordinator's request and of the node's reply. When the
frames still rode inside Syft, 20 FedAvg rounds of a width-16 U-Net left 108 MB in a node's
Syft store, against its 6.5 MB at start, every update the node ever sent at rest on it.
The digests are small, but a record of each call would still accumulate for as long as the
node runs. So the node deletes both objects once the coordinator has had ample time to
fetch the reply, which it does right after the call returns. An object uploaded for a call that never ran (one the node refused at the
Syft level) has no execution record and is not found this way; it stays until the node
restarts, which starts Syft's store afresh.

Syft stamps every execution record with the same creation time (a default evaluated once,
in 0.9.5), so the node times each call from when it first saw its record.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from .node_log import log

__all__ = ["DEFAULT_RETENTION_S", "StoreRetention"]

#: A reply is fetched within milliseconds of the call returning; two minutes leave room for a
#: slow transfer of a large one, and bound the store to two minutes of traffic.
DEFAULT_RETENTION_S = 120.0
#: Listing the store's execution records is not done on every poll of the review loop.
CHECK_PERIOD_S = 30.0
#: Syft cannot delete execution records, and listing them costs more as calls accumulate
#: (about 3 ms per record here: 1.7 s at 600), so the next check also waits this many times
#: the last listing's duration; the listing then takes at most 2% of a core.
LISTING_DUTY = 50


class StoreRetention:
    """Deletes each served call's request and reply objects from the node's Syft store.

    Args:
        client: The data owner's (admin) Syft client; deleting objects needs that role.
        keep: Object ids never to delete: the node's registered assets, which every call
            also names as an input.
        retention_s: How long after the node first sees a call's record its objects go.
        clock: Seconds, monotonic (a parameter so that tests need not sleep).
    """

    def __init__(self, client: Any, keep: Iterable[Any], retention_s: float = DEFAULT_RETENTION_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._keep = frozenset(keep)
        self._retention_s = retention_s
        self._clock = clock
        self._first_seen: dict[Any, float] = {}
        self._done: set[Any] = set()
        self._next_check = clock()

    def step(self) -> int:
        """Deletes the objects of every call older than the retention; cheap when not yet due.

        Returns:
            How many objects were deleted.
        """
        now = self._clock()
        if now < self._next_check:
            return 0
        records = self._client.api.services.output.get_all()
        self._next_check = now + max(min(CHECK_PERIOD_S, self._retention_s), LISTING_DUTY * (self._clock() - now))
        deleted = 0
        for record in records:
            if record.id in self._done:
                continue
            if now - self._first_seen.setdefault(record.id, now) < self._retention_s:
                continue
            for uid in _call_objects(record):
                if uid in self._keep:
                    continue
                try:
                    self._client.api.services.action.delete(uid=uid)
                    deleted += 1
                except Exception as exc:  # never stop serving for it; the owner sees it in the node's log
                    log.warning("could not delete Syft object %s of a served call: %s", uid, exc)
            self._done.add(record.id)
            del self._first_seen[record.id]
        if deleted:
            log.info("deleted %d request and reply objects of served calls from the Syft store", deleted)
        return deleted


def _call_objects(record: Any) -> list[Any]:
    """The object ids one Syft execution record names: its inputs and its outputs."""
    inputs = list((record.input_ids or {}).values())
    outputs = record.output_ids or []
    return inputs + list(outputs.values() if isinstance(outputs, dict) else outputs)
