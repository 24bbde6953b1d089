"""Unit tests of secure aggregation's pure layers: Shamir, masks, fixed point, round keys,
and the node/coordinator protocol state run in one process.

The round-engine integration (over the node's real whitelist) is in test_secure_round.py.
"""
from __future__ import annotations

import base64
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseg.protocol.aggregate import weighted_average
from fedseg.protocol.errors import MessageError, PlanError, RoundError
from fedseg.protocol.identity import fingerprint
from fedseg.protocol.secagg.masking import expand, pairwise_seed
from fedseg.protocol.secagg.protocol import CoordinatorRound, NodeRound, threshold
from fedseg.protocol.secagg.quantize import dequantize, flatten, quantize, scale_bits, unflatten
from fedseg.protocol.secagg.round_keys import AuthenticationFailed, RoundKeys, open_sealed, seal, verify_advertisement
from fedseg.protocol.secagg.shamir import ShareError, combine, split

RUN = "run-1"
CLIP = 8.0


# --- Shamir -------------------------------------------------------------------------


def test_any_t_shares_recover_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares.values(), 3):
        assert combine(list(subset), 3) == secret
    with pytest.raises(ShareError, match="need 3 shares"):
        combine(list(shares.values())[:2], 3)
    # Two shares of a 3-of-n split carry no information: taken as a 2-of-n split they give
    # a random field element, which (but with probability 2^-265) is not even 32 bytes.
    with pytest.raises(ShareError, match="a share is wrong"):
        combine(list(shares.values())[:2], 2)


def test_every_share_count_and_threshold_works_even_or_odd() -> None:
    secret = bytes(range(100, 132))
    for n in range(2, 9):
        for t in range(2, n + 1):
            shares = list(split(secret, t, list(range(1, n + 1))).values())
            assert combine(shares[n - t :], t) == secret, (n, t)


def test_shamir_refuses_bad_parameters() -> None:
    with pytest.raises(ShareError, match="32 bytes"):
        split(b"short", 2, [1, 2])
    with pytest.raises(ShareError, match="threshold"):
        split(bytes(32), 3, [1, 2])
    with pytest.raises(ShareError, match="distinct"):
        split(bytes(32), 2, [1, 1])
    shares = split(bytes(32), 2, [1, 2])
    with pytest.raises(ShareError, match="same index"):
        combine([shares[1], shares[1]], 2)


# --- masks and fixed point ----------------------------------------------------------


def test_pairwise_seed_is_symmetric_and_bound_to_run_round_and_pair() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    ab = pairwise_seed(a, b.public_key(), RUN, 1, "a", "b")
    assert ab == pairwise_seed(b, a.public_key(), RUN, 1, "b", "a")
    assert ab != pairwise_seed(a, b.public_key(), RUN, 2, "a", "b")
    assert ab != pairwise_seed(a, b.public_key(), "run-2", 1, "a", "b")
    assert ab != pairwise_seed(a, c.public_key(), RUN, 1, "a", "c")


def test_chacha_masks_are_deterministic_per_seed_and_span_uint32() -> None:
    m = expand(b"\x01" * 32, 100_000)
    assert m.dtype == np.uint32 and m.shape == (100_000,)
    assert np.array_equal(m, expand(b"\x01" * 32, 100_000))
    assert not np.array_equal(m, expand(b"\x02" * 32, 100_000))
    assert np.array_equal(expand(b"\x01" * 32, 10), m[:10])  # a prefix of the same stream
    assert m.max() > 2**31 and abs(m.mean() / 2**32 - 0.5) < 0.01


def test_scale_leaves_room_for_the_sum_and_overflow_is_refused() -> None:
    bits = scale_bits(CLIP, 10)
    assert CLIP * 2**bits + 10 < 2**31 <= CLIP * 2 ** (bits + 1) + 10
    with pytest.raises(PlanError, match="could overflow the 32-bit sum"):
        scale_bits(CLIP, 10, bits=28)
    with pytest.raises(PlanError, match="lower the clip bound"):
        scale_bits(2.0**20, 10)
    # The largest sum the bound allows really does not wrap: every node at +clip, weights summing to 1.
    n = 10
    weights = np.full(n, 1 / n)
    total = sum(quantize(np.full(4, CLIP, np.float32), w, CLIP, bits)[0] for w in weights)
    assert np.allclose(dequantize(total.astype(np.uint32), bits, 1.0), CLIP)


def test_clipping_is_counted_never_silent() -> None:
    vector = np.array([0.5, -9.0, 8.0, 100.0, -8.5], np.float32)
    q, clipped = quantize(vector, 1.0, CLIP, 20)
    assert clipped == 3
    assert np.allclose(dequantize(q, 20, 1.0), [0.5, -8.0, 8.0, 8.0, -8.0])


def test_flatten_round_trips_names_and_shapes() -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones((4,), np.float32)}
    layout = {k: v.shape for k, v in arrays.items()}
    back = unflatten(flatten(arrays, layout), layout)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)


# --- the protocol, simulated in one process ----------------------------------------


def _run(updates: dict[str, dict[str, np.ndarray]], weights: dict[str, float], t: int, drop_before_mask: set[str] = frozenset(),
         drop_after_mask: set[str] = frozenset(), round_: int = 1):
    """Runs one round over NodeRound/CoordinatorRound as the engine would; returns the mean and clip count."""
    names = sorted(updates)
    layout = {k: v.shape for k, v in updates[names[0]].items()}
    bits = scale_bits(CLIP, len(names))
    nodes = {n: NodeRound(Ed25519PrivateKey.generate(), n, RUN, round_) for n in names}
    roster = {n: nodes[n].advertisement for n in names}
    co = CoordinatorRound(RUN, round_, roster, t)
    for n in names:
        commitment, sealed = nodes[n].share(roster, t)
        nodes[n].hold(updates[n], CLIP, bits)
        if n not in drop_before_mask:
            co.accept_shares(n, commitment, sealed)
    u1 = [n for n in names if n not in drop_before_mask]
    omega = {n: weights[n] / sum(weights[m] for m in u1) for n in u1}
    masked, clipped = {}, 0
    for n in u1:
        y, c = nodes[n].mask(u1, co.routed(n, u1), omega[n])
        masked[n], clipped = flatten(y, layout), clipped + c
    u2 = [n for n in u1 if n not in drop_after_mask]
    dropped = sorted(set(u1) - set(u2))
    revealed = {n: nodes[n].unmask(u2, dropped) for n in u2}
    total = co.unmask({n: masked[n] for n in u2}, revealed, u1)
    return unflatten(dequantize(total, bits, sum(omega[n] for n in u2)), layout), clipped, (nodes, co, u1, u2, masked, revealed)


def _relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    layout = {k: v.shape for k, v in want.items()}
    a, b = flatten(got, layout).astype(np.float64), flatten(want, layout).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(2, 7))
def test_unmasked_sum_equals_weighted_average_with_dropouts(data: st.DataObject, n: int) -> None:
    names = [f"node-{i}" for i in range(n)]
    t = data.draw(st.integers(2, n), label="t")
    # At most n - t nodes may drop in total, split between before and after masking.
    dropped = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=n - t), label="dropped")
    cut = data.draw(st.integers(0, len(dropped)), label="cut")
    before, after = set(dropped[:cut]), set(dropped[cut:])
    weights = {m: data.draw(st.floats(0.5, 1000.0), label=f"w-{m}") for m in names}
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    updates = {m: {"conv": rng.normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32), "bias": rng.normal(0, 2, (5,)).astype(np.float32)}
               for m in names}
    got, clipped, _ = _run(updates, weights, t, before, after)
    survivors = [m for m in names if m not in before | after]
    total = sum(weights[m] for m in survivors)
    want = {k: sum(updates[m][k].astype(np.float64) * (weights[m] / total) for m in survivors) for k in updates[names[0]]}
    assert clipped == 0
    # Each node rounds to half a step of 2^-bits; dividing by the survivors' share of the
    # weight scales that up, and float32 rounds the result (one ulp).
    u1 = [m for m in names if m not in before]
    share = sum(weights[m] for m in survivors) / sum(weights[m] for m in u1)
    atol = len(u1) * 0.5 * 2.0 ** -scale_bits(CLIP, n) / share
    for k in want:
        assert np.allclose(got[k], want[k], rtol=2**-23, atol=atol), k


def test_relative_error_on_real_unet_weights_is_below_1e_6() -> None:
    import torch

    from fedseg.models.unet import UNetConfig, build_model

    updates = {}
    for i in range(10):
        torch.manual_seed(i)
        updates[f"node-{i}"] = {k: v.numpy() for k, v in build_model(UNetConfig(width=16)).state_dict().items()}
    weights = {n: float(50 + 13 * i) for i, n in enumerate(updates)}
    got, clipped, _ = _run(updates, weights, threshold(0, 10), drop_after_mask={"node-3"})
    want = weighted_average([(u, weights[n]) for n, u in updates.items() if n != "node-3"])
    assert clipped == 0
    assert _relative_error(got, want) <= 1e-6


def test_coordinator_sees_only_masked_inputs() -> None:
    rng = np.random.default_rng(0)
    updates = {n: {"w": rng.normal(0, 0.1, (1000,)).astype(np.float32)} for n in ("a", "b", "c")}
    _, _, (_, _, _, _, masked, _) = _run(updates, {"a": 1.0, "b": 1.0, "c": 1.0}, 2)
    for n, y in masked.items():
        plain, _ = quantize(updates[n]["w"], 1 / 3, CLIP, scale_bits(CLIP, 3))
        # A masked input is uniform in Z_2^32: no trace of the small quantized values.
        assert np.count_nonzero(y == plain) < 5 and y.max() > 2**31


# --- attacks and failures -----------------------------------------------------------


def _started(names=("a", "b", "c"), t=2, round_=1):
    nodes = {n: NodeRound(Ed25519PrivateKey.generate(), n, RUN, round_) for n in names}
    roster = {n: nodes[n].advertisement for n in names}
    return nodes, roster, t


def test_swapped_round_key_is_detected_by_peers_and_coordinator() -> None:
    nodes, roster, t = _started()
    forged = dict(roster["b"])
    forged["s_pk"] = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    swapped = {**roster, "b": forged}
    with pytest.raises(AuthenticationFailed, match="node b: bad signature"):
        nodes["a"].share(swapped, t)
    with pytest.raises(AuthenticationFailed, match="node b: bad signature"):
        CoordinatorRound(RUN, 1, swapped, t)
    # A node refuses a roster that does not carry its own keys unchanged.
    with pytest.raises(AuthenticationFailed, match="node b: the roster does not carry"):
        nodes["b"].share(swapped, t)


def test_round_keys_signed_by_another_identity_are_refused() -> None:
    keys = RoundKeys("a", RUN, 1)
    signer, pinned = Ed25519PrivateKey.generate(), fingerprint(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(AuthenticationFailed, match="not by its pinned key"):
        verify_advertisement(keys.advertisement(signer), "a", RUN, 1, pinned)
    verify_advertisement(keys.advertisement(signer), "a", RUN, 1, fingerprint(signer.public_key()))


@pytest.mark.parametrize("field,value", [("round", 2), ("run_id", "run-2"), ("node", "b")])
def test_replayed_round_keys_are_refused(field: str, value: object) -> None:
    ad = RoundKeys("a", RUN, 1).advertisement(Ed25519PrivateKey.generate())
    expected = {"node": "a", "run_id": RUN, "round": 1, field: value}
    with pytest.raises(AuthenticationFailed, match=f"{field}=.*replayed"):
        verify_advertisement(ad, expected["node"], expected["run_id"], expected["round"])


def test_shares_replayed_from_another_round_or_pair_fail_their_tag() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    sealed = seal(a, b.public_key(), RUN, 1, "a", "b", b"share")
    assert open_sealed(b, a.public_key(), RUN, 1, "a", "b", sealed) == b"share"
    for run, round_, sender in ((RUN, 2, "a"), ("run-2", 1, "a"), (RUN, 1, "c")):
        with pytest.raises(AuthenticationFailed, match="tampered or replayed"):
            open_sealed(b, a.public_key(), run, round_, sender, "b", sealed)


def test_tampered_sealed_share_is_refused_naming_the_sender() -> None:
    nodes, roster, t = _started()
    co = CoordinatorRound(RUN, 1, roster, t)
    for n, node in nodes.items():
        co.accept_shares(n, *node.share(roster, t))
        node.hold({"w": np.zeros(4, np.float32)}, CLIP, 20)
    routed = co.routed("a", list(nodes))
    raw = bytearray(base64.b64decode(routed["c"]))
    raw[20] ^= 1
    routed["c"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(AuthenticationFailed, match=r"shares from node c to a .*\(tampered or replayed\)"):
        nodes["a"].mask(list(nodes), routed, 0.5)


def test_tampered_revealed_share_fails_the_commitment() -> None:
    rng = np.random.default_rng(1)
    updates = {n: {"w": rng.normal(0, 0.1, (10,)).astype(np.float32)} for n in ("a", "b", "c")}
    _, _, (nodes, co, u1, u2, masked, revealed) = _run(updates, dict.fromkeys(updates, 1.0), 2)
    share = bytearray(base64.b64decode(revealed["a"]["b"]))
    share[-1] ^= 1
    revealed["a"]["b"] = base64.b64encode(bytes(share)).decode()
    with pytest.raises(AuthenticationFailed, match="node b fails its commitment"):
        co.unmask(masked, revealed, u1)


def test_below_threshold_the_coordinator_cannot_unmask() -> None:
    rng = np.random.default_rng(2)
    updates = {n: {"w": rng.normal(0, 0.1, (10,)).astype(np.float32)} for n in ("a", "b", "c")}
    _, _, (nodes, co, u1, u2, masked, revealed) = _run(updates, dict.fromkeys(updates, 1.0), 3)
    with pytest.raises(RoundError, match="only 2 nodes revealed shares, 3 are needed"):
        co.unmask(masked, {n: revealed[n] for n in ("a", "b")}, u1)


def test_node_refuses_steps_out_of_order_and_a_second_unmask() -> None:
    nodes, roster, t = _started()
    with pytest.raises(MessageError, match="masking needs stage shared, but the round is keyed"):
        nodes["a"].mask(["a", "b", "c"], {}, 0.3)
    rng = np.random.default_rng(3)
    updates = {n: {"w": rng.normal(0, 0.1, (10,)).astype(np.float32)} for n in ("a", "b", "c")}
    _, _, (nodes, _, u1, u2, _, _) = _run(updates, dict.fromkeys(updates, 1.0), 2)
    with pytest.raises(MessageError, match="unmasking needs stage masked, but the round is done"):
        nodes["a"].unmask(u2, [])


def test_node_never_reveals_both_shares_of_one_peer() -> None:
    """A survivor set that is not a split of U1, or lists a node as both, is refused."""
    rng = np.random.default_rng(4)
    updates = {n: {"w": rng.normal(0, 0.1, (10,)).astype(np.float32)} for n in ("a", "b", "c", "d")}
    names = sorted(updates)
    nodes = {n: NodeRound(Ed25519PrivateKey.generate(), n, RUN, 1) for n in names}
    roster = {n: nodes[n].advertisement for n in names}
    co = CoordinatorRound(RUN, 1, roster, 2)
    for n in names:
        co.accept_shares(n, *nodes[n].share(roster, 2))
        nodes[n].hold(updates[n], CLIP, 20)
    for n in names:
        nodes[n].mask(names, co.routed(n, names), 0.25)
    with pytest.raises(MessageError, match="must split"):
        nodes["a"].unmask(["a", "b", "c"], ["c", "d"])
    with pytest.raises(MessageError, match="must split"):
        nodes["a"].unmask(["a", "b"], ["c"])
    with pytest.raises(MessageError, match="fewer than the threshold"):
        nodes["b"].unmask(["b"], ["a", "c", "d"])


def test_threshold_defaults_to_a_majority_and_refuses_nonsense() -> None:
    assert [threshold(0, n) for n in (2, 3, 4, 10)] == [2, 2, 3, 6]
    assert threshold(3, 5) == 3
    for requested, n in ((1, 3), (4, 3), (0, 1)):
        with pytest.raises(PlanError, match="threshold"):
            threshold(requested, n)


# --- plan and CLI -------------------------------------------------------------------


def test_plan_carries_secure_aggregation_and_refuses_bad_settings() -> None:
    from fedseg.protocol.cli import plan_from_options
    from fedseg.protocol.plan import Plan

    d = plan_from_options({}, {"secure_aggregation": True, "secagg_threshold": 3, "secagg_clip": 4.0})
    plan = Plan.from_dict(d)
    assert plan.secure_aggregation and plan.secagg.threshold == 3 and plan.secagg.clip == 4.0
    assert Plan.from_dict(plan.to_dict()) == plan
    assert not Plan().secure_aggregation
    for bad, pattern in (({"algorithm": "local"}, "algorithm 'local' shares none"), ({"secagg": {"clip": -1}}, "secagg.clip must be a positive"),
                         ({"secagg": {"threshold": 1.5}}, "secagg.threshold must be an integer"), ({"secagg": {"salt": 1}}, "unknown SecAggConfig keys")):
        with pytest.raises(PlanError, match=pattern):
            Plan.from_dict({"secure_aggregation": True, **bad})
