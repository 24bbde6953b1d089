"""Privacy audit: every message a node or the coordinator sends or receives, signed and chained in its own log."""
