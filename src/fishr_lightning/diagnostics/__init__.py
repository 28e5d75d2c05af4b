"""Diagnostics that measure Fishr's claims; not part of the penalty (they import Lightning)."""
