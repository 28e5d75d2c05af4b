"""Under DDP every comparison penalty is the one-process value over the global batch: two processes
(gloo, CPU), each holding a slice of every domain's block (as the app's DomainBatchSampler), train to
the weights of one process on the whole batch. All six callbacks run at once on one Trainer; each
rank's slice holds an odd number of samples per domain, so IRM's halves need the rank offsets."""

import pytest
import torch
from process_group import CloseProcessGroup
from test_baselines_callbacks import DomainClassifier, E, assert_same_weights, fit
from torch.utils.data import DataLoader, Sampler, TensorDataset

from fishr_lightning.baselines import (
    CORALCallback,
    GroupDROCallback,
    IRMCallback,
    MMDCallback,
    SDCallback,
    VRExCallback,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

B, STEPS = 6, 3


def dataset():
    g = torch.Generator().manual_seed(2)
    domains = torch.arange(E).repeat_interleave(B).repeat(STEPS)
    x = torch.randn(len(domains), 5, generator=g, dtype=torch.float64) + domains[:, None]
    return TensorDataset(x, torch.randint(0, 3, (len(domains),), generator=g), domains)


class RankSliceOfEachDomain(Sampler):
    """Step s: rank r of R takes the r-th of R equal slices of each domain's block of B samples."""

    def __iter__(self):
        initialised = torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)
        share = B // world
        for step in range(STEPS):
            yield [step * E * B + e * B + i for e in range(E) for i in range(rank * share, (rank + 1) * share)]

    def __len__(self):
        return STEPS


def callbacks():
    return [
        IRMCallback(10.0, 2),
        VRExCallback(10.0, 1),
        VRExCallback(10.0, 1, ema=0.9, name="vrex_ema"),  # the EMA of the global risks (issue 26)
        CORALCallback(2.0),
        MMDCallback(2.0),
        GroupDROCallback(0.5),
        SDCallback(0.1),
    ]


def test_two_processes_equal_one_process_for_every_penalty():
    one_process = DomainClassifier()
    fit(one_process, callbacks(), dataset(), max_steps=STEPS, use_distributed_sampler=False)
    two_processes = DomainClassifier()
    fit(
        two_processes,
        [*callbacks(), CloseProcessGroup()],
        dataset(),
        loader=DataLoader(dataset(), batch_sampler=RankSliceOfEachDomain()),
        max_steps=STEPS,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    assert_same_weights(two_processes, one_process, rtol=1e-7)
