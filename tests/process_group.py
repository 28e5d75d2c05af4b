"""Helpers for tests that start several gloo processes on the CPU."""

import multiprocessing
import pickle

import torch
from lightning.pytorch.callbacks import Callback


class CloseProcessGroup(Callback):
    """Every rank waits for the others, then closes the process group before its interpreter exits.

    Without it, a spawned rank that reaches Lightning's atexit clean-up while its peer has already
    closed the gloo connections sometimes aborts ("terminate called without an active exception",
    SIGABRT; about 1 fit in 8 with torch 2.14 on CPU), and ``ddp_spawn`` reports the whole fit as failed.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def two_cpu_processes() -> dict:
    """Trainer options for two CPU processes, started by fork (Lightning's ddp_fork): the same launcher, gloo
    group and return of rank 0's weights as ddp_spawn, without each rank importing torch, Lightning and the
    test modules again (about 5 s of CPU per rank and fit; the DDP tests took 5 times longer with spawn).
    Spawn where fork is missing (Windows) or unsafe: once CUDA is initialised in this process (the gpu tests
    of a whole-suite run on a GPU machine), Lightning refuses to fork."""
    fork = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    return {"strategy": "ddp_fork" if fork else "ddp_spawn", "devices": 2}


def assert_spawnable(*objects):
    """What ddp_spawn does besides and fork does not: the module and callbacks go to the ranks pickled."""
    pickle.loads(pickle.dumps(objects))
