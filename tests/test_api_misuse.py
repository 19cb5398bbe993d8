"""API misuse that used to pass silently now raises an error that says what to pass (issue 20, item 9)."""

import pyro.distributions as dist
import pytest
import torch

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, metrics, priors
from pyrolora.errors import ConfigError, DataError
from tests.conftest import tiny_bert, token_batch

LABELS = torch.tensor([0, 1, 2, 0, 1])


def _model(prior=None) -> BayesianLoraModel:
    backbone = tiny_bert()
    return BayesianLoraModel(backbone, inject_adapters(backbone, LoraXSConfig(rank=2)), prior=prior, dataset_size=5)


@pytest.mark.parametrize("lean", [True, False])  # the lean estimator and Pyro's own trace
def test_labels_of_shape_b_by_1_are_refused(lean):
    model = _model()
    data = [(token_batch(), LABELS[:, None])]  # (5, 1): broadcast against (5,) rows it gave a (5, 5) likelihood
    with pytest.raises(DataError, match=r"targets have shape \(5, 1\), but the likelihood expects \(5,\)"):
        fit(model, guides.make("diagonal", model), data, num_steps=1, lean=lean, progress=False)


@pytest.mark.parametrize("prior", [{"qurey": priors.IsotropicNormal(1.0), "value": priors.IsotropicNormal(0.1)},
                                   priors.PerSite({"qurey": priors.IsotropicNormal(1.0)})])  # fmt: skip
def test_a_misspelt_site_name_in_a_prior_mapping_is_refused(prior):
    with pytest.raises(ConfigError, match=r"prior key 'qurey' matches no adapter site.*'query', 'value'"):
        _model(prior)


def test_a_batch_shaped_custom_prior_is_refused_with_the_fix():
    model = _model(lambda name, shape: dist.Normal(torch.zeros(shape), 1.0))  # batch shape (2, 2), event ()
    with pytest.raises(ConfigError, match=r"batch shape \(2, 2\) and event shape \(\).*to_event\(2\)"):
        fit(model, guides.make("diagonal", model), [(token_batch(), LABELS)], num_steps=1, progress=False)


def test_a_correct_custom_prior_still_fits():
    model = _model(lambda name, shape: dist.Normal(torch.zeros(shape), 1.0).to_event(2))
    assert fit(model, guides.make("diagonal", model), [(token_batch(), LABELS)], num_steps=1, progress=False).losses


@pytest.mark.parametrize("metric", [metrics.accuracy, metrics.nll, metrics.ece, metrics.brier])
def test_metrics_refuse_logits_and_non_finite_probabilities(metric):
    logits = torch.tensor([[2.5, -1.0], [0.5, 0.3]])
    with pytest.raises(ValueError, match=r"metrics need probabilities.*softmax"):
        metric(logits, [0, 1])
    with pytest.raises(ValueError, match="not finite in rows"):
        metric(torch.tensor([[0.5, 0.5], [float("nan"), 0.5]]), [0, 1])
    assert metric(torch.softmax(logits, -1), [0, 1]) >= 0  # probabilities are fine
