"""Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns only the weighted sum of the updates.

One module per idea: :mod:`.shamir` splits a secret t-of-n, :mod:`.masking` derives the
pairwise seeds and expands a seed into a mask, :mod:`.quantize` turns a weighted float
update into fixed point in Z_{2^32}, :mod:`.round_keys` makes and checks each node's signed
per-round keys and seals the shares sent between nodes, and :mod:`.protocol` holds both
parties' state for one round, without any I/O, and states the threat model.
:mod:`.coordinator` runs the secure rounds over the nodes; a node's side of those calls is
:mod:`fedseg.node.secure_actions`.
"""
