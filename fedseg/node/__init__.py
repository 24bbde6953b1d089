"""Node side of fedseg: local data, validation and training actions."""
