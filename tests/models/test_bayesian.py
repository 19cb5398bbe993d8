import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, likelihoods, priors
from pyrolora.errors import ConfigError
from tests.conftest import TINY_MODELS, token_batch


def _model(name="bert", **kwargs):
    factory, targets, _ = TINY_MODELS[name]
    backbone = factory()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))
    return BayesianLoraModel(backbone, adapters, dataset_size=kwargs.pop("dataset_size", 50), **kwargs)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_trace_has_one_r_site_per_module_and_no_backbone_parameter(name):
    model = _model(name)
    batch = token_batch()
    targets = torch.randint(0, 3, (5,))
    trace = poutine.trace(model).get_trace(batch, targets)
    latent = {
        n: node
        for n, node in trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"] and not site_is_subsample(node)
    }
    assert set(latent) == set(model.adapters)
    assert all(node["value"].shape == (2, 2) for node in latent.values())
    assert all(not node["cond_indep_stack"] for node in latent.values())  # sampled outside the data plate
    assert not [n for n, node in trace.nodes.items() if node["type"] == "param"]
    assert trace.nodes["obs"]["is_observed"]
    assert len(pyro.get_param_store()) == 0


def test_minibatch_log_likelihood_is_scaled_by_n_over_b():
    model = _model(dataset_size=40)
    batch = token_batch()
    targets = torch.randint(0, 3, (5,))
    trace = poutine.trace(model).get_trace(batch, targets)
    trace.compute_log_prob()
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(40 / 5)
    logits = obs["fn"].logits
    expected = torch.distributions.Categorical(logits=logits).log_prob(targets).sum() * 8
    torch.testing.assert_close(obs["log_prob_sum"], expected)  # Pyro stores the scaled log-probability


def test_only_the_head_and_guide_are_trainable_after_fit():
    model = _model()
    head = {id(p) for p in model.backbone.classifier.parameters()}
    trainable = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert trainable == head
    guide = guides.make("lowrank", model)
    data = [(token_batch(seed=i), torch.randint(0, 3, (5,))) for i in range(2)]
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    fit(model, guide, data, num_steps=3, progress=False)
    changed = {n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in guide.parameters())
    assert len(pyro.get_param_store()) == 0


def test_head_none_freezes_everything_and_explicit_head_names_work():
    model = _model(head=())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model = _model(head=("bert.pooler",))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    with pytest.raises(ConfigError, match="not in the backbone"):
        _model(head=("nothing",))
    with pytest.raises(ConfigError, match="overlaps adapter sites"):
        _model(head=("bert.encoder",))


def test_plain_module_backbone_with_tensor_inputs():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0"]))
    model = BayesianLoraModel(net, adapters, dataset_size=10, likelihood=likelihoods.Gaussian(0.1), head=("2",))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["0"]["value"].shape == (2, 2)
    assert trace.nodes["obs"]["fn"].event_shape == (2,)


def test_prior_is_used_for_every_site():
    model = _model(prior=priors.IsotropicNormal(0.02))
    trace = poutine.trace(model).get_trace(None)
    for name in model.adapters:
        assert trace.nodes[name]["fn"].base_dist.scale.max().item() == pytest.approx(0.02)
    assert "obs" not in trace.nodes  # inputs=None samples the latents only


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_dataset_size_is_validated(bad):
    with pytest.raises(ConfigError, match="dataset_size"):
        _model(dataset_size=bad)


def test_batch_larger_than_dataset_is_an_error():
    model = _model(dataset_size=3)
    with pytest.raises(ConfigError, match="larger than dataset_size"):
        model(token_batch(), torch.zeros(5, dtype=torch.long))


def test_sample_outputs_equal_per_sample_outputs():
    model = _model().double()
    batch = token_batch()
    values = {n: 0.3 * torch.randn(3, *s, dtype=torch.float64) for n, s in model.adapters.shapes.items()}
    batched = model.sample_outputs(batch, values)
    single = torch.stack([model.outputs(batch, {n: v[s] for n, v in values.items()}) for s in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-10, rtol=1e-10)
