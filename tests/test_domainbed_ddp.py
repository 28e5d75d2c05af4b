"""DomainBed's classes under DDP (issues 26, 27): where the update is a mean of per-sample terms (ERM), two gloo
processes each holding a slice of every domain's minibatch train to one process's weights; an algorithm whose
update needs every domain's whole minibatch refuses DDP before training, saying why."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from domainbed_harness import NUM_CLASSES, NUM_DOMAINS, PER_DOMAIN, TinyFeaturizer, domain_batches, fit
from process_group import CloseProcessGroup

from fishr_lightning.domainbed import (
    ALGORITHM_CLASSES,
    DomainBedError,
    algorithm_class,
    build_algorithm,
    default_hparams,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


class RankSlices(torch.utils.data.Dataset):
    """Each step's batch; under DDP rank r of R gets the r-th of R equal slices of every domain's block."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, step):
        x, y, domain = self.batches[step]
        initialised = torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)
        share = PER_DOMAIN // world
        rows = torch.cat(
            [
                torch.arange(e * PER_DOMAIN + rank * share, e * PER_DOMAIN + (rank + 1) * share)
                for e in range(NUM_DOMAINS)
            ]
        )
        return x[rows], y[rows], domain[rows]


class ImageFeaturizer(torch.nn.Module):
    n_outputs = 4

    def __init__(self, input_shape, hparams):
        super().__init__()
        self.conv = torch.nn.Conv2d(input_shape[0], 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def erm():
    torch.manual_seed(0)
    hparams = {**default_hparams("ERM", "PACS"), "lr": 1e-2}
    return build_algorithm("ERM", (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)


def test_erm_on_two_processes_equals_one_process():
    batches = domain_batches(steps=3)
    one, two = erm(), erm()
    fit(one, batches)
    loader = torch.utils.data.DataLoader(RankSlices(batches), batch_size=None)
    pl.Trainer(
        max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[CloseProcessGroup()],
    ).fit(two, loader)  # fmt: skip
    for key, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[key].double(), value, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ALGORITHM_CLASSES))
def test_an_algorithm_not_checked_under_ddp_refuses_it_naming_why(name):
    cls = algorithm_class(name)
    if cls.ddp_refusal is None:
        return  # checked under DDP (above, or in the comparison set's tests)
    shape = (1, 6, 6) if name == "ARM" else (6,)  # ARM takes images (its context channel)
    featurizer = ImageFeaturizer if name == "ARM" else TinyFeaturizer
    module = build_algorithm(name, shape, NUM_CLASSES, NUM_DOMAINS, default_hparams(name, "PACS"), featurizer)
    module._trainer = SimpleNamespace(world_size=2)  # what on_fit_start reads of a two-process trainer
    with pytest.raises(DomainBedError, match=rf"{name} cannot run under DDP \(2 processes\): .+ trainer.devices=1"):
        module.on_fit_start()
