"""The default SVI recipe's parts: the tempered KL weight, the warm start, separate spread learning rate, the ELBO's
two recorded terms, and the posterior temperature chosen on validation data (and kept with the saved state)."""

import pyro
import pytest
import torch

from pyrolora import fit, guides, predict
from pyrolora.errors import ConfigError
from pyrolora.inference.lean import LeanELBO
from pyrolora.inference.predict import DEFAULT_TEMPERATURES, select_temperature, temper
from pyrolora.inference.state import load_state, save_state
from pyrolora.inference.svi import DEFAULT_KL_WEIGHT
from pyrolora.runs.config import RunConfig
from tests.inference.test_lean import _data, _guide, _model


def test_the_configuration_default_kl_weight_is_fits():
    assert RunConfig().train.kl_weight == DEFAULT_KL_WEIGHT
    assert RunConfig().train.clip_norm is None  # as fit's: clipping every step biases the fitted covariance
    assert RunConfig().train.temperatures == DEFAULT_TEMPERATURES


def test_mean_only_is_the_map_objective_at_the_guide_mean_and_the_terms_add_up():
    model = _model()
    guide = _guide("lowrank", model)
    inputs, targets = _data(1)[0]
    lean = LeanELBO(model, guide)
    with pyro.settings.context(module_local_params=True):
        lean.mean_only = True
        value = lean.differentiable_loss(inputs, targets, kl_weight=0.1)
        log_lik, kl = lean.last_terms
        # the same point through a delta guide placed at μ: -(N/B) Σ log p(y | μ) - β log p(μ)
        mean = {k: v.detach() for k, v in guide.median().items()}
        logits = model.outputs(inputs, mean)
    expected = torch.distributions.Categorical(logits=logits).log_prob(targets).sum() * model.dataset_size / 5
    theta = torch.cat([v.reshape(-1) for v in mean.values()])
    log_prior = torch.distributions.Normal(0.0, model.prior.scale).log_prob(theta).sum()
    # float32 log-softmax in the likelihood against the float64 reference: 1e-6 relative
    assert value.item() == pytest.approx(-(expected + 0.1 * log_prior).item(), rel=1e-6)
    assert log_lik.item() == pytest.approx(expected.item(), rel=1e-6)
    assert kl.item() == pytest.approx(-log_prior.item(), rel=1e-9)  # no entropy term at a point
    assert value.item() == pytest.approx(-(log_lik - 0.1 * kl).item(), rel=1e-12)


def test_fit_records_the_two_elbo_terms_and_the_loss_is_their_weighted_difference():
    model = _model(dtype=torch.float32)
    guide = guides.make("lowrank", model)
    result = fit(model, guide, _data(), num_steps=6, seed=0, progress=False)
    assert len(result.log_likelihoods) == len(result.kls) == 6
    for loss, ll, kl in zip(result.losses, result.log_likelihoods, result.kls, strict=True):
        assert loss == pytest.approx(-(ll - DEFAULT_KL_WEIGHT * kl), rel=1e-5)  # float32 sums


def test_warm_start_trains_only_the_mean_and_freeze_mean_keeps_it_afterwards():
    model = _model(dtype=torch.float32)
    guide = guides.make("lowrank", model)
    guides.setup(guide, model)
    start = {n: p.detach().clone() for n, p in guide.named_parameters()}
    fit(model, guide, _data(), num_steps=4, warm_start=4, warmup=0.0, seed=0, progress=False)
    moved = {n for n, p in guide.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved == {"loc"}  # the spread had no gradient during the warm start
    loc = guide.loc.detach().clone()
    fit(model, guide, _data(), num_steps=4, warm_start=1, freeze_mean=True, warmup=0.0, seed=1, progress=False)
    # step 1 moves μ (warm start); the three ELBO steps after it move only the spread
    spread_moved = {n for n, p in guide.named_parameters() if n != "loc" and not torch.equal(p.detach(), start[n])}
    assert spread_moved
    loc_after_warm = guide.loc.detach().clone()
    fit(model, guide, _data(), num_steps=3, warm_start=0, freeze_mean=True, warmup=0.0, seed=2, progress=False)
    assert torch.equal(guide.loc.detach(), loc_after_warm)
    assert not torch.equal(loc_after_warm, loc)


def test_warm_start_and_scale_lr_are_refused_where_they_do_not_apply():
    model = _model(dtype=torch.float32)
    with pytest.raises(ConfigError, match="joint Gaussian guide"):
        fit(model, guides.make("delta", model), _data(), num_steps=4, warm_start=0.5, progress=False)
    with pytest.raises(ConfigError, match="warm_start must be"):
        fit(model, guides.make("lowrank", model), _data(), num_steps=1, warm_start=-1, progress=False)
    with pytest.raises(ConfigError, match="scale_lr must be"):
        fit(model, guides.make("lowrank", model), _data(), num_steps=1, scale_lr=0.0, progress=False)


def test_scale_lr_zero_spread_steps_leave_the_spread_and_move_the_mean():
    model = _model(dtype=torch.float32)
    guide = guides.make("lowrank", model)
    guides.setup(guide, model)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    fit(model, guide, _data(), num_steps=3, scale_lr=1e-30, warmup=0.0, seed=0, progress=False)
    after = dict(guide.named_parameters())
    assert not torch.equal(after["loc"].detach(), before["loc"])
    # AdamW's first steps move each parameter by about lr: 1e-30 leaves the spread unchanged in float32
    assert all(torch.equal(after[n].detach(), before[n]) for n in before if n != "loc")


def test_temper_moves_draws_towards_the_median_and_tau_one_is_the_identity():
    model = _model()
    guide = _guide("lowrank", model)
    with pyro.settings.context(module_local_params=True):
        median = guide.median()
    draws = {k: v.unsqueeze(0) + torch.randn(4, *v.shape, dtype=v.dtype) for k, v in median.items()}
    assert temper(draws, guide, 1.0) is draws
    zero = temper(draws, guide, 0.0)
    assert all(torch.allclose(zero[k], median[k].expand_as(v)) for k, v in draws.items())
    half = temper(draws, guide, 0.5)
    assert all(torch.allclose(half[k] - median[k], 0.5 * (v - median[k])) for k, v in draws.items())


def test_select_temperature_picks_the_lowest_validation_nll_and_fit_keeps_it_with_the_state(tmp_path):
    model = _model(dtype=torch.float32, dataset_size=15)
    guide = guides.make("lowrank", model, init_scale=0.3)
    data = _data()
    result = fit(model, guide, data, num_steps=3, seed=0, progress=False, validation=data, temperatures=(0.0, 1.0, 3.0))
    assert set(result.validation_nll) == {0.0, 1.0, 3.0}
    assert result.temperature == min(result.validation_nll, key=lambda t: (result.validation_nll[t], -t))
    assert guide.posterior_temperature == result.temperature
    # the scores are the NLL of predict's average at that τ, with the same draws (seed 0)
    labels = torch.cat([t for _, t in data])
    for tau, score in result.validation_nll.items():
        mean = predict(model, guide, data, num_samples=15 if tau else 1, temperature=tau).mean
        assert score == pytest.approx(-mean[torch.arange(len(labels)), labels].log().mean().item(), rel=1e-6)
    # the chosen τ is what predict uses by default, and it travels with the saved state
    chosen = predict(model, guide, data, num_samples=15).mean
    assert torch.equal(chosen, predict(model, guide, data, num_samples=15, temperature=result.temperature).mean)
    save_state(tmp_path / "state.safetensors", model, guide)
    fresh = guides.make("lowrank", model, init_scale=0.3)
    load_state(tmp_path / "state.safetensors", model, fresh)
    assert fresh.posterior_temperature == result.temperature
    with pytest.raises(ConfigError, match="labelled batches"):
        select_temperature(model, guide, [(x, None) for x, _ in data])
    with pytest.raises(ConfigError, match="temperature must be"):
        predict(model, guide, data, num_samples=2, temperature=-1.0)


def test_a_point_mass_is_not_tempered():
    model = _model(dtype=torch.float32)
    guide = guides.make("delta", model)
    result = fit(model, guide, _data(), num_steps=2, seed=0, progress=False, validation=_data())
    assert result.temperature is None and not hasattr(guide, "posterior_temperature")
