"""What the app leaves out of a run's output (issue 19): Lightning's advertising tips and its warnings
that no user of the app can act on; the warnings that matter (data loading, precision, devices)
still show. In a sweep (issue 30), what every run would repeat is said once per process: Lightning's
device lines and model summary; the fit loop's ``max_steps=N reached`` (every run stops there) never;
warnings read ``warning: <message>``, without the source path Python puts before them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

from fishr_lightning.app import AppError
from fishr_lightning.functional import FishrInputError

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


# The fit loop's info at the end of every run: the app always stops at max_steps (its progress line says the step).
DROPPED_PREFIXES = ("`Trainer.fit` stopped: `max_steps=",)
# Lightning's info that each run of a sweep would repeat word for word: each text is shown once per process.
REPEATED_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:")
# The loggers of those lines: rank_zero_info's (Lightning and Fabric), the model summary's, the CUDA device line's.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
SUMMARY_LOGGERS = ("lightning.pytorch.callbacks.model_summary", "lightning.pytorch.callbacks.rich_model_summary")
DEVICE_LOGGERS = ("lightning.pytorch.accelerators.cuda",)


class _AppLines(logging.Filter):
    """Drops Lightning's tips and ``DROPPED_PREFIXES``; lets each text of ``REPEATED_PREFIXES`` (and
    each model summary, on ``SUMMARY_LOGGERS``) through once."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        if message.startswith((LIGHTNING_TIP_PREFIX, *DROPPED_PREFIXES)):
            return False
        if message.startswith(REPEATED_PREFIXES) or record.name in SUMMARY_LOGGERS:
            if message in self.shown:
                return False
            self.shown.add(message)
        return True


_APP_LINES = _AppLines()


def quiet_lightning() -> None:
    """Silences Lightning's tips, its ``max_steps`` line, its repeated device lines and model summaries, and
    the warnings of ``SILENCED_WARNINGS`` in this process (idempotent)."""
    for name in (*RANK_ZERO_LOGGERS, *SUMMARY_LOGGERS, *DEVICE_LOGGERS):
        logger = logging.getLogger(name)
        if _APP_LINES not in logger.filters:
            logger.addFilter(_APP_LINES)
    for message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def format_app_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``warning: <message>``: what to do is in the message; where in the source it was raised is not for users."""
    return f"warning: {message}\n"


@contextmanager
def app_warnings() -> Iterator[None]:
    """Warnings printed as ``format_app_warning`` while the app runs (put back after: in-process callers,
    tests, keep Python's format)."""
    previous = warnings.formatwarning
    warnings.formatwarning = format_app_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def app_error_of(error: BaseException) -> AppError | FishrInputError | None:
    """The app's own error that Hydra's ``instantiate`` wrapped (``Error in call to target ...: AppError(...)``,
    e.g. a backbone's weights that cannot be downloaded), so that it ends as every other one: one
    ``error:`` paragraph (issue 30). ``None`` for any other failure."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, (AppError, FishrInputError)) else None


def sweep_directory() -> str | None:
    """The sweep's directory (``hydra.sweep.dir``) in a multirun (``-m``), else ``None``."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)
