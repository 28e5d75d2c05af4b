"""Under DDP each domain's gradient variance is over the global batch: two processes train to the
weights of one process on the concatenated batch (CPU, gloo)."""

import pytest
import torch
from process_group import CloseProcessGroup
from test_callback import BATCH, DomainClassifier, MixinClassifier, assert_same_weights, batches, domain_data, trainer
from torch.utils.data import DataLoader, Sampler

from fishr_lightning import FishrCallback

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


class RankInterleavedSampler(Sampler):
    """Rank r of R reads samples r, r+R, r+2R, ... in order (Lightning's own DistributedSampler
    always shuffles training data), so the ranks' batches of B/R are, together, the batch of B."""

    def __init__(self, dataset):
        self.size = len(dataset)

    def __iter__(self):
        initialised = torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)
        return iter(range(rank, self.size, world))

    def __len__(self):
        return self.size // 2


def assert_two_processes_train_to_one_process(entry_point, dataset, options):
    """One process on whole batches, then two (ddp_spawn, gloo) on interleaved halves: same weights."""
    one_process = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)]).fit(one_process, batches(dataset))

    if entry_point == "callback":
        two_processes, callbacks = DomainClassifier("adam", 0.01), [FishrCallback(**options)]
    else:
        two_processes, callbacks = MixinClassifier("adam", 0.01, **options), []
    half_batches = DataLoader(dataset, batch_size=BATCH // 2, sampler=RankInterleavedSampler(dataset))
    trainer(
        callbacks=[*callbacks, CloseProcessGroup()], strategy="ddp_spawn", devices=2, use_distributed_sampler=False
    ).fit(two_processes, half_batches)
    assert_same_weights(two_processes, one_process, rtol=1e-7)


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(entry_point):
    dataset = domain_data()
    options = {"penalty_weight": 50.0, "warmup_steps": 2, "ema": 0.9, "num_domains": 3}
    assert_two_processes_train_to_one_process(entry_point, dataset, options)


def domains_split_across_ranks(dataset):
    """Rank 0 (even samples) sees domains {0, 1} only, rank 1 (odd samples) {1, 2}: each rank's
    largest id differs, and domain 0 is absent on rank 1, domain 2 on rank 0."""
    i = torch.arange(len(dataset))
    dataset.tensors[2][:] = i % 2 + (i // 2) % 2
    return dataset


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_without_num_domains_two_processes_infer_it_over_ranks(entry_point):
    dataset = domains_split_across_ranks(domain_data())
    options = {"penalty_weight": 50.0, "warmup_steps": 2, "ema": 0.9}
    assert_two_processes_train_to_one_process(entry_point, dataset, options)


def test_checks_use_global_counts_so_every_rank_stops_alike():
    """Domain 2 has one sample in the global first batch (on rank 1): every rank refuses it from
    the global counts, rank 0 included, which holds no sample of domain 2 at all."""
    dataset = domains_split_across_ranks(domain_data())
    dataset.tensors[2][[5, 7, 9, 11, 13, 15, 17, 19, 21, 23]] = 1  # rank 1 keeps one sample of domain 2 (index 3)
    half_batches = DataLoader(dataset, batch_size=BATCH // 2, sampler=RankInterleavedSampler(dataset))
    # ddp_spawn re-raises rank 0's FishrInputError wrapped, with its message.
    with pytest.raises(Exception, match=r"domain\(s\) \[2\] have \[1\] sample.*counts per domain: \[6, 17, 1\]"):
        trainer(
            callbacks=[FishrCallback(num_domains=3), CloseProcessGroup()],
            strategy="ddp_spawn",
            devices=2,
            use_distributed_sampler=False,
        ).fit(DomainClassifier(), half_batches)
