import pytest
import torch

from pyrolora import likelihoods
from pyrolora.errors import ConfigError


def test_categorical_matches_log_softmax():
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    lik = likelihoods.Categorical()
    torch.testing.assert_close(
        lik.log_prob(logits, y), torch.log_softmax(logits.float(), -1)[torch.arange(6), y], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(lik.predictive(logits).sum(-1), torch.ones(6))


def test_categorical_computes_in_float32_for_half_precision_logits():
    logits = torch.randn(3, 2).to(torch.bfloat16)
    assert likelihoods.Categorical().predictive(logits).dtype == torch.float32


def test_gaussian_scalar_and_vector_targets():
    lik = likelihoods.Gaussian(0.5)
    mean = torch.randn(5, 1)
    y = torch.randn(5)
    expected = torch.distributions.Normal(mean.squeeze(-1), 0.5).log_prob(y)
    torch.testing.assert_close(lik.log_prob(mean, y), expected)
    assert lik.predictive(mean).shape == (5, 1)
    vec = torch.randn(5, 3)
    yv = torch.randn(5, 3)
    torch.testing.assert_close(lik.log_prob(vec, yv), torch.distributions.Normal(vec, 0.5).log_prob(yv).sum(-1))


def test_gaussian_rejects_bad_scale():
    with pytest.raises(ConfigError):
        likelihoods.Gaussian(0.0)
