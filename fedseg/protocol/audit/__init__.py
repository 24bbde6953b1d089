"""Privacy audit: every message a node or the coordinator sends or receives, signed and chained in its own log.

One module per idea: :mod:`.entry` defines an entry, its signature and the hash chain
that links entries; :mod:`.schema` describes a message for the log without any tensor
value; :mod:`.log` is the append-only log each writer keeps, on disk before a message is
sent; :mod:`.verify` reads a log and checks every link, hash and signature;
:mod:`.cross_check` matches the coordinator's log against each node's; :mod:`.policy`
checks what a node sent against what it declares it may send; and :mod:`.report` sums a
log up for a data-protection officer, with a plot. ``fedseg audit`` (:mod:`fedseg.audit_cli`)
runs them over a finished run.
"""
