"""Loader workers under a cluster's signals (issue 25).

SLURM signals every process of a job step, DataLoader workers included. A worker that SIGTERM (or
SIGUSR1/SIGUSR2, whose default action also ends a process) killed made the training process raise
"DataLoader worker ... exited unexpectedly" before its ``Preemption`` handler could save and requeue
the run: no checkpoint, no requeue, status 1. Every loader of the app therefore starts its workers
with ``PreemptionSignalsIgnored``: the training process alone acts on the signal, and stops its workers
as it stops.

Workers that ignore SIGTERM no longer end on multiprocessing's exit hook (it terminates daemonic
children with SIGTERM, then joins them): ``stop_loader_workers`` runs first at exit and shuts down the
workers of every loader iterator still alive, as the DataLoader does when its iterator is deleted.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import signal
from collections.abc import Callable

from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

# The signals a cluster sends before it stops a job (SLURM's --signal, submitit's, Lightning's requeue
# signal): the training process acts on them (app.training.preemption), its loader workers ignore them.
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class PreemptionSignalsIgnored:
    """A DataLoader ``worker_init_fn``: the worker ignores the preemption signals; ``then``, the
    loader's other ``worker_init_fn`` (Lightning's seeding), runs after."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def stop_loader_workers() -> None:
    """Shuts down the workers of every multi-process loader iterator of this process that is still alive:
    the persistent evaluation loader's after a preemption or an error, a loop's iterator that an
    exception's traceback holds. A worker that does not stop is killed (SIGTERM, which it ignores, would not)."""
    if not multiprocessing.active_children():
        return
    for iterator in [obj for obj in gc.get_objects() if isinstance(obj, _MultiProcessingDataLoaderIter)]:
        iterator._shutdown_workers()  # what its __del__ does (and Lightning's teardown of a training loader)
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()


# Registered after torch's own exit hook (torch.utils.data is imported above), so it runs before it: atexit
# calls its hooks in reverse order, and torch's makes _shutdown_workers a no-op once Python exits.
atexit.register(stop_loader_workers)
