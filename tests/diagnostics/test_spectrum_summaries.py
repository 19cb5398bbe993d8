"""Covariance spectra (fitted and empirical) for every guide, and the Pareto-k check of a guide."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.nn import PyroParam

from pyrolora import fit, guides
from pyrolora.diagnostics import (
    Spectrum,
    covariance_spectrum,
    empirical_spectrum,
    pareto_k,
    pareto_k_threshold,
)
from pyrolora.errors import ConfigError
from tests.diagnostics.test_convert import _setup
from tests.inference.test_closed_form import _problem


def test_effective_rank_and_shares_on_known_spectra():
    two = Spectrum(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), "fitted")
    assert two.effective_rank() == pytest.approx(2.0, abs=1e-12)  # two equal directions: exactly 2
    assert two.participation_ratio() == pytest.approx(2.0, abs=1e-12)
    assert two.share_top(1) == pytest.approx(0.5) and two.share_top(2) == pytest.approx(1.0)
    skewed = Spectrum(torch.tensor([3.0, 1.0], dtype=torch.float64), "fitted")
    p = np.array([0.75, 0.25])
    assert skewed.effective_rank() == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert skewed.participation_ratio() == pytest.approx(16 / 10)
    none = Spectrum(torch.zeros(3, dtype=torch.float64), "empirical", num_draws=5)
    assert none.effective_rank() == 0.0 and math.isnan(none.share_top(1))
    with pytest.raises(ConfigError, match="positive integer"):
        two.share_top(0)


def test_empirical_spectrum_recovers_a_known_covariance():
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    scales = torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    theta = (torch.randn(20_000, 4, generator=g, dtype=torch.float64) * scales) @ rotation.T
    spectrum = empirical_spectrum(theta)
    # sample eigenvalues of 20,000 draws: relative sd ~ sqrt(2/20000) = 1%; 5% is five of those
    np.testing.assert_allclose(spectrum.eigenvalues.numpy(), (scales**2).numpy(), rtol=0.05)
    few = empirical_spectrum(theta[:3])  # 3 draws span at most 2 directions
    # beyond S - 1 = 2 only round-off remains: 1e-20 is twelve orders below the smallest true eigenvalue
    assert (few.eigenvalues[2:] < 1e-20).all() and (few.eigenvalues[:2] > 1e-6).all()


@pytest.mark.parametrize("name", ["lowrank", "diagonal", "full", "delta"])
def test_fitted_spectrum_of_every_guide_agrees_with_its_draws(name):
    model, data = _setup()
    guide = guides.make(name, model, **({"rank": 2} if name == "lowrank" else {}))
    fit(model, guide, data, num_steps=10, progress=False)
    spectrum = covariance_spectrum(guide, model)
    sampled = covariance_spectrum(guide, model, draws=None, num_samples=2) if name == "delta" else None
    assert spectrum.eigenvalues.shape == (model.num_latents,)
    assert (spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:]).all()  # descending
    if name == "delta":
        assert spectrum.source == "empirical" and spectrum.total_variance == 0.0 and spectrum.effective_rank() == 0.0
        assert sampled is not None and sampled.total_variance == 0.0
        return
    assert spectrum.source == "fitted"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        from pyrolora.inference import draw_latents

        draws = draw_latents(guide, model, 20_000)
    empirical = empirical_spectrum(draws)
    # D = 16; eigenvalues of a 20,000-draw covariance are within ~1% (relative sd sqrt(2/20000)) of the true
    # ones, and the total variance within 3%. The top sample eigenvalue is biased upwards where the true ones are
    # nearly equal (after 10 steps from the default init scale every variance is still close to its start): by up
    # to (1 + sqrt(D/S))² - 1 ≈ 2 sqrt(16/20000) = 5.7%, the edge of the Marchenko-Pastur law (measured 5.8% for
    # `diagonal`). 8% allows that; a spectrum off by a factor (variance for sd, a missing L Lᵀ) would fail.
    assert empirical.total_variance == pytest.approx(spectrum.total_variance, rel=0.03)
    assert float(empirical.eigenvalues[0]) == pytest.approx(float(spectrum.eigenvalues[0]), rel=0.08)
    if name == "diagonal":
        variances = (guide.get_posterior().base_dist.scale.detach() ** 2).double().sort(descending=True).values
        np.testing.assert_allclose(spectrum.eigenvalues.numpy(), variances.numpy(), rtol=1e-12)
    if name == "lowrank":
        # L Lᵀ + diag(d) with K = 2: the top 2 directions rise above the diagonal floor
        assert spectrum.eigenvalues[1] > spectrum.eigenvalues[2]


def _exact_full_guide(widen: float):
    """A ``full`` guide set to the exact posterior of the closed-form problem with its covariance scaled by widen²."""
    model, data, mean, cov = _problem()
    guide = guides.make("full", model)
    guides.setup(guide, model)
    chol = torch.linalg.cholesky(cov * widen**2)
    scale = chol.diagonal()
    with pyro.settings.context(module_local_params=True):
        guide.loc = torch.nn.Parameter(mean.clone())
        guide.scale = PyroParam(scale.clone(), guide.scale_constraint)
        guide.scale_tril = PyroParam(chol / scale[:, None], guide.scale_tril_constraint)
    torch.testing.assert_close(guide.get_posterior().covariance_matrix.detach(), cov * widen**2)
    return model, data, guide, mean, cov


def test_log_weights_are_log_joint_minus_log_guide():
    model, data, guide, _, _ = _exact_full_guide(1.0)
    result = pareto_k(model, guide, data, num_samples=50, seed=3)
    # Exact guide: log p(y, θ) - log q(θ) = log p(y) for every draw. The likelihood is evaluated in float32
    # (the Gaussian likelihood casts), 120 terms: measured spread 4e-6. Without the log q term the spread would be
    # that of log p(θ | y) over draws, several nats; 1e-4 separates the two by four orders.
    assert np.ptp(result.log_weights) < 1e-4, np.ptp(result.log_weights)
    assert result.ess == pytest.approx(50, rel=1e-6)


def test_pareto_k_flags_a_too_narrow_guide_and_passes_a_wider_one():
    model, data, wide, _, _ = _exact_full_guide(1.3)
    good = pareto_k(model, wide, data, num_samples=400, seed=0)
    _, _, narrow, _, _ = _exact_full_guide(0.4)
    bad = pareto_k(model, narrow, data, num_samples=400, seed=0)
    # q wider than p bounds the ratios p/q (k ≤ 0 in theory; the fit's noise at S = 400 is ~0.1). q at 0.4x the
    # posterior scale in 4 dimensions leaves ratios with a heavy tail: k far above 0.7 (measured ~1).
    assert good.k < 0.5 and good.verdict == "good", good
    assert bad.k > 0.7 and bad.verdict == "unreliable", bad
    assert pareto_k_threshold(400) == pytest.approx(1 - 1 / math.log10(400))
    assert pareto_k_threshold(10_000) == 0.7


def test_pareto_k_is_refused_for_a_point_mass_and_few_draws():
    model, data = _setup()
    guide = guides.make("delta", model)
    with pytest.raises(ConfigError, match="point mass"):
        pareto_k(model, guide, data, num_samples=20)
    with pytest.raises(ConfigError, match=">= 10"):
        pareto_k(model, guides.make("diagonal", model), data, num_samples=5)
