"""The pure floor: errors, settings, validation, key layout and value formats (no I/O)."""
