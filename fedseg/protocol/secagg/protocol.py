"""Secure aggregation: the node's and the coordinator's protocol state, without any I/O.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (https://eprint.iacr.org/2017/281), with the roles mapped onto fedseg rounds.
Node ``u`` and round ``r``:

1. **Keys.** ``u`` makes fresh X25519 pairs ``c_u`` (share channel) and ``s_u`` (masks)
   and signs their public halves with its identity key (:mod:`.round_keys`).
2. **Share** (with training). Given the signed keys of every node in the round, ``u``
   draws a self-mask seed ``b_u``, splits ``b_u`` and ``s_sk_u`` t-of-n (:mod:`.shamir`)
   and seals share ``v`` to ``c_pk_v``. It commits to ``b_u`` with a hash. The update
   stays on the node.
3. **Mask.** Given ``U1`` (who shared) and its normalised weight ``ω_u``, ``u`` opens
   the shares sent to it, quantizes ``ω_u θ_u`` (:mod:`.quantize`) and adds
   ``PRG(b_u)`` and the pairwise masks with every ``v ∈ U1`` (:mod:`.masking`). It
   sends ``y_u`` and clears its plaintext.
4. **Unmask.** Given ``U2`` (who sent ``y``) and ``D = U1 \\ U2``, ``u`` reveals its
   share of ``b_v`` for ``v ∈ U2`` and of ``s_sk_v`` for ``v ∈ D``, never both for one
   node. The coordinator needs ``t`` answers: it rebuilds each ``b_v`` (checked against
   the commitment) and each ``s_sk_v`` (checked against the signed ``s_pk_v``), strips
   the self-masks and the survivors' masks towards dropped nodes, and gets
   ``Σ_{v∈U2} ω_v θ_v``.

Threat model and what each piece buys:

* The coordinator is honest but curious: it runs the protocol as written, and sees
  every frame. It learns the weighted sum over ``U2``, the declared scalars
  (``n_k``, ``ℓ_k``, pseudo-label counts) and the clip counts, and nothing about any
  single update: each ``y_u`` carries ``PRG(b_u)``, and ``b_u`` is rebuilt only for
  nodes whose ``y`` is already in the sum. Up to ``t - 1`` colluding nodes learn
  nothing more either.
* Signed round keys bind ``(node, run, round)``, and the coordinator checks the
  signing key against the fingerprint pinned in the node's invite. A relay (or a
  tampered transport) therefore cannot swap a key to read shares or set masks, and an
  advertisement from another round cannot be replayed. Each node checks every peer's
  signature and that its own keys came back unchanged. A node knows its peers'
  identity keys only from the coordinator's roster, which its own audit log records
  (up to about 40 nodes, beyond which the field is logged by size), so a coordinator
  that made up identities would show in the logs. An actively malicious coordinator is
  out of scope, as it is for Bonawitz's semi-honest protocol.
* AES-GCM with ``(run, round, sender, recipient)`` as associated data: the coordinator
  routes shares it cannot read, and cannot alter, reorder or replay them.
* Consistency of the survivor set: a node answers at most one unmask per round (the
  state is dropped afterwards), and only for ``U2 ∪ D = U1`` with ``U2 ∩ D = ∅`` and
  ``|U2| >= t``. So no node reveals both a ``b``-share and an ``s``-share of one peer.
* Tampered shares rebuild a wrong seed, which fails its commitment; the round aborts
  naming the node rather than averaging garbage.
* Keys, seeds, shares and the plaintext update live only in the node's memory for the
  round; a restarted node has none and is treated as dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import MessageError, PlanError, RoundError
from ..wire import canonical_json
from .masking import SEED_BYTES, add_mask, pair_sign, pairwise_seed
from .quantize import Layout, flatten, quantize, unflatten
from .round_keys import AuthenticationFailed, RoundKeys, b64, open_sealed, raw, seal, unb64, verify_advertisement
from .shamir import SHARE_BYTES, ShareError, combine, share_index, split

__all__ = ["SELF_MASK_LABEL", "Stage", "threshold", "commit", "NodeRound", "CoordinatorRound"]

SELF_MASK_LABEL = b"fedseg/v1/secagg/self-mask-commitment"


class Stage(StrEnum):
    """Where a node's round stands; each step accepts exactly one stage."""

    KEYED = "keyed"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


def threshold(requested: int, n: int) -> int:
    """``t`` for ``n`` nodes: the plan's value, or a majority (at least 2) when it is 0.

    Raises:
        PlanError: If ``t`` is outside ``[2, n]`` (with fewer than 2 nodes a sum is the update).
    """
    t = requested or max(2, n // 2 + 1)
    if n < 2 or not 2 <= t <= n:
        raise PlanError(f"secure aggregation needs 2 <= threshold <= nodes, got threshold {t} for {n} nodes")
    return t


def commit(b: bytes, run_id: str, round_: int, node: str) -> str:
    """Hash commitment to a self-mask seed (hex); ``b`` is 32 random bytes, so the hash hides it."""
    return hashlib.sha256(SELF_MASK_LABEL + canonical_json([run_id, round_, node]) + b).hexdigest()


def _check_sets(survivors: Sequence[str], dropped: Sequence[str], expected: set[str], t: int, who: str) -> None:
    if len(set(survivors)) != len(survivors) or set(survivors) & set(dropped) or set(survivors) | set(dropped) != expected:
        raise MessageError(f"{who}: survivors {sorted(survivors)} and dropped {sorted(dropped)} must split {sorted(expected)}")
    if len(survivors) < t:
        raise MessageError(f"{who}: {len(survivors)} survivors are fewer than the threshold {t}")


class NodeRound:
    """A node's secrets and stage for one round.

    Args:
        identity: The node's Ed25519 identity key, to sign its round keys.
        node: Its name.
        run_id: The run.
        round_: The round.
    """

    def __init__(self, identity: Ed25519PrivateKey, node: str, run_id: str, round_: int) -> None:
        self.node, self.run_id, self.round = node, run_id, round_
        self.keys = RoundKeys(node, run_id, round_)
        self._advertisement = self.keys.advertisement(identity)
        self.stage = Stage.KEYED
        self._peers: dict[str, tuple[X25519PublicKey, X25519PublicKey]] = {}
        self._index: dict[str, int] = {}
        self._t = 0
        self._b = b""
        self._own: bytes = b""
        self._held: dict[str, bytes] = {}
        self._update: np.ndarray | None = None
        self._layout: Layout = {}
        self._clip, self._bits = 0.0, 0
        self._u1: set[str] = set()

    @property
    def advertisement(self) -> dict[str, Any]:
        return self._advertisement

    def _expect(self, stage: Stage, step: str) -> None:
        if self.stage is not stage:
            raise MessageError(f"node {self.node} round {self.round}: {step} needs stage {stage.value}, but the round is {self.stage.value}")

    def share(self, roster: Mapping[str, Any], t: int) -> tuple[str, dict[str, str]]:
        """Checks the round's roster and seals one share pair to every peer.

        Args:
            roster: Node name to advertisement, for every node of the round (this one included).
            t: Threshold.

        Returns:
            The commitment to ``b_u`` and, per peer, the sealed shares (base64).

        Raises:
            AuthenticationFailed: If this node's own keys were changed or a peer's fail to verify.
            MessageError: If this node is not in the roster or ``t`` does not fit it.
        """
        self._expect(Stage.KEYED, "sharing")
        if roster.get(self.node) != self._advertisement:
            raise AuthenticationFailed(f"node {self.node}: the roster does not carry this node's round-{self.round} keys unchanged (swapped?)")
        if not 2 <= t <= len(roster):
            raise MessageError(f"node {self.node}: threshold {t} does not fit a roster of {len(roster)}")
        self._peers = {name: verify_advertisement(ad, name, self.run_id, self.round) for name, ad in roster.items() if name != self.node}
        self._index = {name: i + 1 for i, name in enumerate(sorted(roster))}
        self._t = t
        self._b = os.urandom(SEED_BYTES)
        xs = list(self._index.values())
        b_shares, s_shares = split(self._b, t, xs), split(self.keys.s_private(), t, xs)
        sealed = {}
        for name, (c_pk, _) in self._peers.items():
            x = self._index[name]
            sealed[name] = b64(seal(self.keys.c, c_pk, self.run_id, self.round, self.node, name, b_shares[x] + s_shares[x]))
        x = self._index[self.node]
        self._own = b_shares[x] + s_shares[x]
        self.stage = Stage.SHARED
        return commit(self._b, self.run_id, self.round, self.node), sealed

    def hold(self, update: Mapping[str, np.ndarray], clip: float, bits: int) -> None:
        """Keeps the trained update (shared parameters) in memory until it is masked.

        Args:
            update: Parameter name to float32 array.
            clip: Clip bound of the plan.
            bits: Fixed-point fraction bits for the round's roster (:func:`.quantize.scale_bits`).
        """
        self._expect(Stage.SHARED, "holding the update")
        self._layout = {k: tuple(v.shape) for k, v in update.items()}
        self._update = flatten(update, self._layout)
        self._clip, self._bits = clip, bits

    def mask(self, survivors: Sequence[str], sealed: Mapping[str, str], weight: float) -> tuple[dict[str, np.ndarray], int]:
        """Opens the shares sent to this node and masks its weighted update.

        Args:
            survivors: ``U1``, the nodes that shared (this one included).
            sealed: Sender to the shares it sealed to this node, for every other node of ``U1``.
            weight: This node's normalised weight ``ω_u``.

        Returns:
            ``y_u`` as uint32 arrays of the update's names and shapes, and the clip count.

        Raises:
            AuthenticationFailed: Naming the sender whose shares fail to open.
            MessageError: If ``U1`` is not a subset of the roster holding this node and ``t`` nodes.
        """
        self._expect(Stage.SHARED, "masking")
        if self._update is None:
            raise MessageError(f"node {self.node} round {self.round}: no trained update to mask")
        u1 = set(survivors)
        if len(u1) != len(survivors) or not u1 <= set(self._index) or self.node not in u1 or len(u1) < self._t:
            raise MessageError(f"node {self.node}: survivors {sorted(survivors)} must be distinct roster nodes including this one, at least {self._t}")
        if set(sealed) != u1 - {self.node}:
            raise MessageError(f"node {self.node}: got shares from {sorted(sealed)}, expected from {sorted(u1 - {self.node})}")
        for sender, text in sealed.items():
            plain = open_sealed(self.keys.c, self._peers[sender][0], self.run_id, self.round, sender, self.node, unb64(text, f"shares from node {sender}"))
            if len(plain) != 2 * SHARE_BYTES or share_index(plain[:SHARE_BYTES]) != self._index[self.node]:
                raise AuthenticationFailed(f"node {self.node}: shares from node {sender} are not for this node")
            self._held[sender] = plain
        self._held[self.node] = self._own
        y, clipped = quantize(self._update, weight, self._clip, self._bits)
        add_mask(y, self._b, +1)
        for peer in sorted(u1 - {self.node}):
            add_mask(y, pairwise_seed(self.keys.s, self._peers[peer][1], self.run_id, self.round, self.node, peer), pair_sign(self.node, peer))
        self._update = None  # the plaintext leaves memory as soon as it is masked
        self._u1 = u1
        self.stage = Stage.MASKED
        return unflatten(y, self._layout), clipped

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, str]:
        """Reveals this node's share of ``b_v`` for survivors and of ``s_sk_v`` for the dropped.

        Raises:
            MessageError: Unless ``survivors`` and ``dropped`` split ``U1`` with at least ``t``
                survivors, including this node; or if this round was already unmasked.
        """
        self._expect(Stage.MASKED, "unmasking")
        if self.node not in survivors:
            raise MessageError(f"node {self.node}: asked to unmask a round it is listed as dropped from")
        _check_sets(survivors, dropped, self._u1, self._t, f"node {self.node} round {self.round}")
        self.stage = Stage.DONE
        out = {v: b64(self._held[v][:SHARE_BYTES]) for v in survivors}
        out.update({v: b64(self._held[v][SHARE_BYTES:]) for v in dropped})
        self._held.clear()
        return out


class CoordinatorRound:
    """The coordinator's view of one secure round: verified keys, routed shares, the unmasking.

    Args:
        run_id: The run.
        round_: The round.
        roster: Node name to its verified advertisement.
        t: Threshold.
    """

    def __init__(self, run_id: str, round_: int, roster: Mapping[str, dict[str, Any]], t: int) -> None:
        self.run_id, self.round, self.t = run_id, round_, t
        self.roster = dict(roster)
        self._s_pk = {name: verify_advertisement(ad, name, run_id, round_)[1] for name, ad in roster.items()}
        self.commitments: dict[str, str] = {}
        self.sealed: dict[str, dict[str, str]] = {}

    def accept_shares(self, node: str, commitment: str, sealed: Mapping[str, str]) -> None:
        """Records a node's commitment and the shares it sealed for its peers.

        Raises:
            MessageError: If it did not seal exactly one share pair to every other roster node.
        """
        expected = set(self.roster) - {node}
        if set(sealed) != expected:
            raise MessageError(f"node {node} sealed shares for {sorted(sealed)}, expected {sorted(expected)}")
        if len(commitment) != 64 or any(c not in "0123456789abcdef" for c in commitment):
            raise MessageError(f"node {node}: self-mask commitment must be 64 hex digits")
        self.commitments[node], self.sealed[node] = commitment, dict(sealed)

    def routed(self, recipient: str, u1: Sequence[str]) -> dict[str, str]:
        """The shares the senders in ``U1`` sealed to ``recipient``."""
        return {sender: self.sealed[sender][recipient] for sender in u1 if sender != recipient}

    def unmask(self, masked: Mapping[str, np.ndarray], revealed: Mapping[str, Mapping[str, str]], u1: Sequence[str]) -> np.ndarray:
        """``Σ_{v∈U2} q_v`` in Z_{2^32} from the masked inputs and the revealed shares.

        Args:
            masked: ``U2``: node to its flat uint32 ``y_v`` ``(d,)``.
            revealed: Responder to ``{owner: share}`` from the unmask answers.
            u1: The nodes that shared, hence whose masks are in the ``y``.

        Raises:
            RoundError: If fewer than ``t`` nodes revealed shares.
            AuthenticationFailed: If a rebuilt seed or key does not match its commitment or
                signed public key (a share was tampered), naming the node.
        """
        survivors, dropped = sorted(masked), sorted(set(u1) - set(masked))
        if len(revealed) < self.t:
            raise RoundError(f"round {self.round}: only {len(revealed)} nodes revealed shares, {self.t} are needed to unmask")
        responders = sorted(revealed)

        def rebuild(owner: str) -> bytes:
            try:
                return combine([unb64(revealed[r].get(owner), f"share of node {owner} from {r}") for r in responders], self.t)
            except ShareError as exc:
                raise AuthenticationFailed(f"round {self.round}: shares of node {owner} do not combine: {exc}") from None

        total = np.zeros_like(next(iter(masked.values())))
        for v in survivors:
            total += masked[v]
            b = rebuild(v)
            if not hmac.compare_digest(commit(b, self.run_id, self.round, v), self.commitments[v]):
                raise AuthenticationFailed(f"round {self.round}: the self-mask seed rebuilt for node {v} fails its commitment (a share was tampered)")
            add_mask(total, b, -1)
        for v in dropped:
            try:
                s_sk = X25519PrivateKey.from_private_bytes(rebuild(v))
            except ValueError:
                raise AuthenticationFailed(f"round {self.round}: the mask key rebuilt for dropped node {v} is not a key") from None
            if not hmac.compare_digest(raw(s_sk.public_key()), raw(self._s_pk[v])):
                raise AuthenticationFailed(f"round {self.round}: the mask key rebuilt for dropped node {v} fails its signed public key (a share was tampered)")
            for u in survivors:
                add_mask(total, pairwise_seed(s_sk, self._s_pk[u], self.run_id, self.round, u, v), -pair_sign(u, v))
        return total
