"""``seed_hash``: DomainBed's stable seeds from any arguments, without torch (``fishr-collect`` imports no
torch; issue 30 moved it here from the app so that the public ``DomainBatchSampler`` draws with it too)."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_hash(*args: Any) -> int:
    """An integer seed from any arguments, stable across runs and machines (DomainBed's ``misc.seed_hash``)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)
