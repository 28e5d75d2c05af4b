"""ERM++ (issue 27) equals DomainBed's ``ERMPlusPlus.update`` and ``ErmPlusPlusMovingAvg`` written here from its
code: the classifier alone for ``linear_steps + 1`` updates, then the network; the moving average of weights and
BatchNorm buffers, its statistics following the batches unless ``freeze_bn``; Adam or LARS."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import NUM_CLASSES, NUM_DOMAINS, domain_batches, fit, float64_state, minibatches_of
from torch import nn

from fishr_lightning.domainbed import build_algorithm, default_hparams, domainbed_state_dict


class BatchNormFeaturizer(nn.Module):
    n_outputs = 5

    def __init__(self, input_shape, hparams):
        super().__init__()
        self.hidden = nn.Linear(input_shape[0], 7)
        self.norm = nn.BatchNorm1d(7)
        self.output = nn.Linear(7, 5)

    def forward(self, x):
        return self.output(torch.relu(self.norm(self.hidden(x))))


def lars_step(params, state, lr, weight_decay, momentum=0.9, trust=0.001):  # DomainBed's misc.LARS.step
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            dp = p.grad
            if p.ndim > 1:
                dp = dp.add(p, alpha=weight_decay)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                dp = dp.mul(
                    torch.where(
                        param_norm > 0.0, torch.where(update_norm > 0, trust * param_norm / update_norm, one), one
                    )
                )
            mu = state.setdefault(p, torch.zeros_like(p))
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


@pytest.mark.parametrize("lars", [False, True])
def test_k_updates_end_on_domainbeds_weights_and_moving_average(lars):
    hparams = {**default_hparams("ERMPlusPlus", "PACS", "2024"), "lr": 1e-2, "linear_lr": 3e-2, "linear_steps": 1,
               "weight_decay": 1e-3, "lars": lars}  # fmt: skip
    torch.manual_seed(0)
    module = build_algorithm("ERMPlusPlus", (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=BatchNormFeaturizer)
    module.sma_start_iter = 3  # DomainBed's 600, brought within the test's 5 updates
    network = copy.deepcopy(module.network).double()
    network.load_state_dict(
        {k[len("network.") :]: v for k, v in float64_state(module).items() if k.startswith("network.")}
    )
    sma = copy.deepcopy(network).eval()
    if lars:
        states: tuple[dict, dict] = ({}, {})
    else:
        full = torch.optim.Adam(network.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
        linear = torch.optim.Adam(network[1].parameters(), lr=3e-2, weight_decay=1e-3, foreach=False)
    global_iter = sma_count = 0
    batches = domain_batches(steps=5)
    for batch in batches:
        minibatches = minibatches_of(batch)
        all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        use_full = global_iter > 1
        loss = F.cross_entropy(network(all_x), all_y)
        network.zero_grad()
        loss.backward()
        if lars:
            params = list(network.parameters()) if use_full else list(network[1].parameters())
            lars_step(params, states[use_full], 1e-2 if use_full else 3e-2, 1e-3)
        else:
            (full if use_full else linear).step()
        global_iter += 1  # ErmPlusPlusMovingAvg.update_sma
        if global_iter >= 3:
            sma_count += 1
        new = {}
        for (name, q), (_, k) in zip(network.state_dict().items(), sma.state_dict().items()):
            if "num_batches_tracked" not in name:
                new[name] = (k.clone() * sma_count + q.clone()) / (1.0 + sma_count) if global_iter >= 3 else q.clone()
        sma.load_state_dict(new)
        sma.train()
        sma(all_x)  # freeze_bn=False: the average's BatchNorm statistics follow the batch
    fit(module, batches)
    state = domainbed_state_dict(module)
    assert {key.split(".")[0] for key in state} == {"featurizer", "classifier", "network", "network_sma"}
    for name, value in {**network.state_dict(), **{f"_sma.{k}": v for k, v in sma.state_dict().items()}}.items():
        key = f"network{name}" if name.startswith("_sma.") else f"network.{name}"
        torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12)
    assert (module.global_iter, module.sma_count) == (5, 3)
