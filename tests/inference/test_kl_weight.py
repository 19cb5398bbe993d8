"""Empirical Bayes (a prior scale fitted by the ELBO) and the KL weight β (tempering, annealing)."""

import math

import pyro
import pytest
import torch

from pyrolora import fit, guides, priors
from pyrolora.errors import ConfigError
from pyrolora.inference.lean import LeanELBO
from pyrolora.inference.state import load_state, save_state
from pyrolora.inference.svi import LossStep, kl_annealing
from pyrolora.runs.config import PriorSpec, RunConfig
from tests.inference.test_lean import _data, _guide, _model


def _expected(model, guide, inputs, targets, beta):
    """-(N/B) Σ log p(y|θ) - β log p(θ) for the point θ of a delta guide (log q = 0), in float64."""
    values = guide.median()
    logits = model.outputs(inputs, values)
    log_lik = torch.distributions.Categorical(logits=logits).log_prob(targets).sum() * model.dataset_size / len(targets)
    theta = torch.cat([v.reshape(-1) for v in values.values()])
    log_prior = torch.distributions.Normal(model.prior.loc, model.prior.scale).log_prob(theta).sum()
    return -(log_lik + beta * log_prior)


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
def test_kl_weight_scales_only_the_prior_and_guide_terms_in_both_loss_paths(beta):
    model = _model(prior=priors.EmpiricalBayes(0.5))
    guide = _guide("delta", model)
    inputs, targets = _data(1)[0]
    with pyro.settings.context(module_local_params=True):
        expected = _expected(model, guide, inputs, targets, beta).item()
        lean = LeanELBO(model, guide).differentiable_loss(inputs, targets, kl_weight=beta).item()
        traced = LossStep(model, guide, lean=False)(inputs, targets, beta).item()
        assert LossStep(model, guide).lean is not None  # the default picks the lean path for this model and guide
        assert LossStep(model, guide)(inputs, targets, beta).item() == pytest.approx(lean, rel=1e-7)
    # the likelihood evaluates log-softmax in float32 (likelihoods.Categorical casts), the reference in float64:
    # 1e-6 relative covers that rounding; a missing or doubled β would be off by |β - 1| · |log p(θ)| ≈ 10 %.
    assert lean == pytest.approx(expected, rel=1e-6)
    assert traced == pytest.approx(expected, rel=1e-6)


def test_the_empirical_bayes_gradient_on_log_sigma_is_d_minus_squared_norm_over_sigma_squared():
    model = _model(prior=priors.EmpiricalBayes(0.5))
    guide = _guide("delta", model)
    inputs, targets = _data(1)[0]
    with pyro.settings.context(module_local_params=True):
        LeanELBO(model, guide).differentiable_loss(inputs, targets).backward()
    theta = torch.cat([v.reshape(-1) for v in guide.median().values()])
    # d/d log σ of -Σ log N(θ_i; 0, σ²) = D - ||θ||² / σ²: the prior is the only term that depends on σ
    analytic = theta.numel() - theta.pow(2).sum() / 0.25
    assert model.prior.log_scale.grad.item() == pytest.approx(analytic.item(), rel=1e-8)


def test_fit_trains_the_prior_scale_and_the_run_state_keeps_it():
    model = _model(prior=priors.EmpiricalBayes(1.0), dtype=torch.float32)
    guide = guides.make("lowrank", model)
    fit(model, guide, _data(), num_steps=30, lr=0.05, progress=False, seed=0)
    sigma = model.prior.scale.item()
    # the latents sit near 0 with posterior scales near the guide's 0.05 start, far below σ = 1: σ must shrink
    assert sigma < 0.8
    assert not hasattr(model, "kl_weight")  # β is an argument of the loss step, never state of the model
    fresh = _model(prior=priors.EmpiricalBayes(1.0), dtype=torch.float32)
    fresh_guide = guides.make("lowrank", fresh)
    path = _tmp_path()
    save_state(path, model, guide)
    load_state(path, fresh, fresh_guide)
    assert fresh.prior.scale.item() == pytest.approx(sigma, rel=1e-7)


def _tmp_path():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "state.safetensors"


def test_kl_annealing_rises_linearly_and_fit_applies_it_per_step():
    schedule = kl_annealing(0.5, final=1.0)
    assert [schedule(s, 8) for s in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    seen = []
    model = _model(dtype=torch.float32)
    guide = guides.make("lowrank", model)

    def recording(step, num_steps):
        seen.append((step, num_steps))  # fit asks for β once per step, before that step's loss
        return schedule(step, num_steps)

    annealed = fit(model, guide, _data(), num_steps=8, progress=False, kl_weight=recording, seed=0)
    assert seen == [(step, 8) for step in range(8)]
    fresh = _model(dtype=torch.float32)
    plain = fit(fresh, guides.make("lowrank", fresh), _data(), num_steps=8, progress=False, seed=0)
    # the same seed, data and start: the first step differs only by β = 0.25 instead of 1 on the KL term, so the
    # losses differ (by 0.75 of a KL estimate); from step 4 on β = 1 but the parameters have moved differently
    assert annealed.losses[0] != pytest.approx(plain.losses[0], rel=1e-6)
    for bad in (0.0, -1.0, math.nan, True):
        with pytest.raises(ConfigError, match="kl_weight"):
            fit(model, guide, _data(), num_steps=1, progress=False, kl_weight=bad)


def test_priors_and_kl_weight_from_the_configuration():
    built = {name: PriorSpec(name=name).build() for name in ("isotropic", "empirical_bayes", "hierarchical")}
    assert type(built["isotropic"]) is priors.IsotropicNormal
    assert isinstance(built["empirical_bayes"], priors.EmpiricalBayes)
    assert isinstance(built["hierarchical"], priors.Hierarchical)
    assert isinstance(PriorSpec(name="student_t", df=5).build(), priors.StudentT)
    assert isinstance(PriorSpec(name="laplace").build(), priors.Laplace)
    with pytest.raises(ConfigError, match=r"prior\.name"):
        PriorSpec(name="cauchy")
    config = RunConfig.from_dict({"train": {"kl_weight": 0.5, "kl_warmup": 0.25}})
    schedule = config.train.kl_schedule()
    assert schedule(0, 8) == 0.25 and schedule(7, 8) == 0.5
    assert RunConfig.from_dict({"train": {"kl_weight": 0.5}}).train.kl_schedule() == 0.5
