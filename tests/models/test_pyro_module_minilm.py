"""The Pyro-module form is the same model as ``BayesianLoraModel`` on the real all-MiniLM-L6-v2 weights.

The paper's four modules per layer (24 sites, rank 4) on a batch of real sentences through the real tokenizer:
the same sites and log joint, the same fit (three steps of the low-rank guide: fit's lean step on one form,
Pyro's ELBO on the other) and the same predictions under the same seed.
"""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from pyrolora import BayesianLoraModel, LoraXSConfig, PyroLoraModel, fit, guides, inject_adapters, predict, priors
from pyrolora.backbones import DEFAULT_MODEL, load_sequence_classifier, load_tokenizer

pytestmark = pytest.mark.slow

TARGETS = ("query", "value", "attention.output.dense", "output.dense")
SENTENCES = [
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "an honest, moving portrait of a family",
    "two hours i will never get back",
    "not bad, but not memorable either",
    "the best thing i have seen this year",
]


@pytest.fixture(scope="module")
def batch(real_model_threads):
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return inputs, torch.tensor([1, 0, 1, 0, 0, 1])


def _model(form: type, prior=None) -> BayesianLoraModel:
    backbone = load_sequence_classifier(DEFAULT_MODEL, 2, seed=0)  # the same fresh head for both forms
    adapters = inject_adapters(backbone, LoraXSConfig(rank=4, target_modules=TARGETS))
    return form(backbone, adapters, prior=prior, dataset_size=60)


def test_minilm_same_sites_and_log_joint(batch):
    inputs, targets = batch
    bayes = _model(BayesianLoraModel, priors.Hierarchical(per_module=True))
    pyro_form = PyroLoraModel.from_model(bayes)
    assert len(bayes.site_names) == 24
    trace_p = poutine.trace(pyro_form).get_trace(inputs, targets)
    trace_b = poutine.trace(poutine.replay(bayes, trace=trace_p)).get_trace(inputs, targets)
    sites = [(n, s["value"].shape, s["is_observed"]) for n, s in trace_p.nodes.items() if s["type"] == "sample"]
    assert sites == [(n, s["value"].shape, s["is_observed"]) for n, s in trace_b.nodes.items() if s["type"] == "sample"]
    assert len(sites) == 2 * 24 + 2  # a scale and a core per module, the data plate and the observations
    # float32 through six layers: both forms run the same operations, so the sums agree to float32 rounding
    torch.testing.assert_close(trace_p.log_prob_sum(), trace_b.log_prob_sum(), rtol=1e-6, atol=1e-4)


def test_minilm_same_fit_and_predictions(batch):
    data = [batch]
    results = []
    for form in (BayesianLoraModel, PyroLoraModel):
        model = _model(form)
        guide = guides.make("lowrank", model)
        losses = fit(model, guide, data, num_steps=3, lr=0.05, seed=0, progress=False).losses
        results.append((losses, predict(model, guide, data, num_samples=4, seed=2).probs))
    (loss_b, probs_b), (loss_p, probs_p) = results
    # float32: the lean step sums the ELBO's terms in another order than Pyro's (measured differences ~1e-6)
    torch.testing.assert_close(torch.tensor(loss_p), torch.tensor(loss_b), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(probs_p, probs_b, rtol=1e-4, atol=1e-5)
    # the draws differ: measured 8e-5 after 3 steps from the default init scale 0.001; equal draws would differ
    # by float32 rounding only (~1e-7)
    assert probs_p.shape == (4, 6, 2) and (probs_p[0] - probs_p[1]).abs().max() > 1e-5
