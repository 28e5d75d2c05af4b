"""Under DDP each domain's gradient variance is over the global batch: two processes train to the
weights of one process on the concatenated batch (CPU, gloo)."""

import pytest
import torch
from test_callback import BATCH, DomainClassifier, MixinClassifier, assert_same_weights, batches, domain_data, trainer
from distributed import CloseProcessGroup
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


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(entry_point):
    dataset = domain_data()
    options = {"penalty_weight": 50.0, "warmup_steps": 2, "ema": 0.9, "num_domains": 3}
    one_process = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)]).fit(one_process, batches(dataset))

    if entry_point == "callback":
        two_processes, callbacks = DomainClassifier("adam", 0.01), [FishrCallback(**options)]
    else:
        two_processes, callbacks = MixinClassifier("adam", 0.01, **options), []
    half_batches = DataLoader(dataset, batch_size=BATCH // 2, sampler=RankInterleavedSampler(dataset))
    trainer(callbacks=[*callbacks, CloseProcessGroup()], strategy="ddp_spawn", devices=2, use_distributed_sampler=False).fit(
        two_processes, half_batches
    )
    assert_same_weights(two_processes, one_process, rtol=1e-7)


def test_distributed_training_needs_num_domains():
    # ddp_spawn re-raises the worker's FishrInputError wrapped, with its message.
    with pytest.raises(Exception, match="FishrInputError: Under distributed training FishrCallback needs num_domains"):
        trainer(callbacks=[FishrCallback(), CloseProcessGroup()], strategy="ddp_spawn", devices=2).fit(
            DomainClassifier(), batches(domain_data(), batch_size=BATCH // 2)
        )
