import itertools
import math

import pytest
import torch
from torch import nn

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, likelihoods
from pyrolora.errors import ConfigError, DivergenceError


def _regression(n=64, seed=0):
    """Data the model can fit exactly: y = net(x) with a true core R*, plus noise of the likelihood's scale."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0"]))
    model = BayesianLoraModel(net, adapters, dataset_size=n, likelihood=likelihoods.Gaussian(0.1), head=())
    x = torch.randn(n, 3)
    with torch.no_grad(), adapters.use({"0": torch.randn(2, 2)}):
        y = net(x).squeeze(-1) + 0.1 * torch.randn(n)
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_loss_decreases_and_history_is_recorded():
    model, data = _regression()
    guide = guides.make("diagonal", model)
    result = fit(model, guide, data, num_epochs=40, lr=0.05, progress=False, seed=0)
    assert result.num_steps == 160 == len(result.losses) == len(result.learning_rates)
    first, last = sum(result.losses[:16]) / 16, sum(result.losses[-16:]) / 16
    assert last < 0.2 * first  # a real fit: the data were made by the model, so the loss falls far
    assert result.final_loss == pytest.approx(sum(result.losses[-16:]) / 16 / 64)


def test_schedule_warms_up_and_decays():
    model, data = _regression()
    result = fit(model, guides.make("delta", model), data, num_steps=100, lr=0.1, warmup=10, progress=False)
    lrs = result.learning_rates
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(0.1) and lrs[-1] < 0.01
    assert all(a <= b for a, b in itertools.pairwise(lrs[:11]))


def test_seed_makes_fits_reproducible_and_restores_global_rng():
    losses = []
    for _ in range(2):
        model, data = _regression()  # seeds the global RNG itself
        state = torch.get_rng_state()
        losses.append(fit(model, guides.make("lowrank", model), data, num_steps=20, seed=7, progress=False).losses)
        assert torch.equal(torch.get_rng_state(), state)
    assert losses[0] == losses[1]


def test_head_gets_its_own_learning_rate():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0"]))
    model = BayesianLoraModel(net, adapters, dataset_size=8, head=("1",))
    before = net[1].weight.clone()
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    fit(model, guides.make("delta", model), data, num_steps=3, lr=0.1, head_lr=1e-12, warmup=0, progress=False)
    torch.testing.assert_close(net[1].weight, before, atol=1e-9, rtol=0)  # moved by at most ~3 lr steps


def test_non_finite_outputs_raise_with_the_step():
    model, data = _regression()
    bad = [*data[:2], (torch.full_like(data[2][0], math.nan), data[2][1])]
    with pytest.raises(DivergenceError, match="step 3 of 5"):
        fit(model, guides.make("delta", model), bad, num_steps=5, progress=False)


def test_exploding_learning_rate_raises_divergence():
    model, data = _regression()
    with pytest.raises(DivergenceError, match="lower lr"):
        fit(
            model, guides.make("diagonal", model), data, num_steps=200, lr=1e6, clip_norm=None, warmup=0, progress=False
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"num_steps": 2, "num_epochs": 1}, "exactly one"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2, "lr": -1.0}, "lr"),
        ({"num_steps": 2, "schedule": "wobbly"}, "schedule"),
    ],
)
def test_argument_validation(kwargs, match):
    model, data = _regression()
    with pytest.raises(ConfigError, match=match):
        fit(model, guides.make("delta", model), data, progress=False, **kwargs)


def test_one_shot_iterators_and_empty_data():
    model, data = _regression()
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fit(model, guides.make("delta", model), iter(data), num_steps=10, progress=False)
    with pytest.raises(ConfigError, match="no batches"):
        fit(model, guides.make("delta", model), [], num_steps=1, progress=False)
