"""What the app leaves out of a run's output (issue 19): Lightning's advertising tips and its warnings
that no user of the app can act on; the warnings that matter (data loading, precision, devices)
still show."""

from __future__ import annotations

import logging
import warnings

# Lightning 2.6 logs these through rank_zero_info at every fit (litlogger, litmodels).
LIGHTNING_TIP_PREFIX = "💡 Tip:"
# Warnings raised inside Lightning about its own code or about choices the app makes on purpose.
SILENCED_WARNINGS = (
    # lightning/pytorch/utilities/_pytree.py on torch >= 2.10: Lightning's own use of a deprecated torch name.
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # The app logs loss terms itself at DomainBed's records; Lightning's step logging interval is secondary.
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
    # On resume: the app's batch sampler starts at the restored step (batches seeded by (seed, step)).
    r"You're resuming from a checkpoint that ended before the epoch ended.*",
    # The ResNet backbones keep BatchNorm frozen in eval mode on purpose, as DomainBed.
    r"Found \d+ module\(s\) in eval mode at the start of training.*",
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIP_PREFIX)


_NO_TIPS = _NoTips()


def quiet_lightning() -> None:
    """Silences Lightning's tips and the warnings of ``SILENCED_WARNINGS`` in this process (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _NO_TIPS not in logger.filters:
            logger.addFilter(_NO_TIPS)
    for message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
