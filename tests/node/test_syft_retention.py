"""When the node deletes a served call's objects from its Syft store (pure logic; a real
node's store is checked end to end in test_node_refusals.py)."""
from __future__ import annotations

from types import SimpleNamespace

from fedseg.node.syft_retention import StoreRetention

ASSET = "asset-summary"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeOwnerClient:
    """The two Syft services retention uses, over an in-memory store of object ids."""

    def __init__(self, undeletable: frozenset[str] = frozenset(), clock: Clock | None = None, listing_s: float = 0.0) -> None:
        self.records: list[SimpleNamespace] = []
        self.clock, self.listing_s = clock, listing_s
        self.objects: set[str] = {ASSET}
        self.listings = 0
        self.undeletable = undeletable
        self.api = SimpleNamespace(services=SimpleNamespace(
            output=SimpleNamespace(get_all=self._get_all), action=SimpleNamespace(delete=self._delete)))

    def call(self, n: int) -> None:
        self.objects |= {f"request-{n}", f"reply-{n}"}
        self.records.append(SimpleNamespace(id=f"record-{n}", input_ids={"site": ASSET, "message": f"request-{n}"}, output_ids=[f"reply-{n}"]))

    def _get_all(self) -> list[SimpleNamespace]:
        self.listings += 1
        if self.clock is not None:
            self.clock.now += self.listing_s
        return list(self.records)

    def _delete(self, uid: str) -> None:
        if uid in self.undeletable or uid not in self.objects:
            raise RuntimeError(f"cannot delete {uid}")
        self.objects.remove(uid)


def test_a_call_s_request_and_reply_go_after_the_retention_and_the_assets_stay():
    client, clock = FakeOwnerClient(), Clock()
    retention = StoreRetention(client, keep=[ASSET], retention_s=10.0, clock=clock)
    client.call(1)
    assert retention.step() == 0  # first seen now
    clock.now = 9.9
    assert retention.step() == 0 and {"request-1", "reply-1"} <= client.objects
    client.call(2)
    clock.now = 10.0
    assert retention.step() == 2
    assert client.objects == {ASSET, "request-2", "reply-2"}
    clock.now = 20.0
    assert retention.step() == 2
    assert client.objects == {ASSET}
    clock.now = 40.0
    assert retention.step() == 0  # nothing is deleted twice


def test_the_store_is_listed_only_when_a_check_is_due():
    client, clock = FakeOwnerClient(), Clock()
    retention = StoreRetention(client, keep=[ASSET], retention_s=300.0, clock=clock)
    for t in (0.0, 1.0, 29.0):
        clock.now = t
        retention.step()
    assert client.listings == 1
    clock.now = 30.0
    retention.step()
    assert client.listings == 2


def test_a_slow_listing_spaces_the_checks_out():
    clock = Clock()
    client = FakeOwnerClient(clock=clock, listing_s=2.0)  # a store with many records behind it
    retention = StoreRetention(client, keep=[ASSET], retention_s=120.0, clock=clock)
    retention.step()
    clock.now = 99.0
    retention.step()
    assert client.listings == 1
    clock.now = 100.0  # 50 times the listing's 2 s, from when it started
    retention.step()
    assert client.listings == 2


def test_an_object_that_cannot_be_deleted_does_not_stop_the_others_nor_the_node():
    client, clock = FakeOwnerClient(undeletable=frozenset({"request-1"})), Clock()
    retention = StoreRetention(client, keep=[ASSET], retention_s=1.0, clock=clock)
    client.call(1)
    client.call(2)
    retention.step()
    clock.now = 1.0
    assert retention.step() == 3
    assert client.objects == {ASSET, "request-1"}
    clock.now = 2.0
    assert retention.step() == 0  # a failed deletion is not retried on every check
