import pyro.distributions as dist
import pytest
import torch

from pyrolora import priors
from pyrolora.errors import ConfigError


def test_isotropic_normal_shape_and_scale():
    d = priors.IsotropicNormal(0.5)("a.query", (3, 3))
    assert d.event_shape == (3, 3) and d.batch_shape == ()
    x = torch.randn(3, 3)
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum()
    torch.testing.assert_close(d.log_prob(x), expected)


@pytest.mark.parametrize("scale", [0, -1, float("inf"), "0.1", True])
def test_isotropic_normal_rejects_bad_scales(scale):
    with pytest.raises(ConfigError, match="prior scale"):
        priors.IsotropicNormal(scale)


def test_per_site_exact_name_beats_suffix_and_default_applies():
    prior = priors.PerSite(
        {"layer.0.query": priors.IsotropicNormal(0.3), "query": priors.IsotropicNormal(0.2)},
        default=priors.IsotropicNormal(0.05),
    )
    assert prior("layer.0.query", (2, 2)).base_dist.scale.max().item() == pytest.approx(0.3)
    assert prior("layer.1.query", (2, 2)).base_dist.scale.max().item() == pytest.approx(0.2)
    assert prior("layer.1.value", (2, 2)).base_dist.scale.max().item() == pytest.approx(0.05)


def test_per_site_ambiguous_suffix_is_an_error():
    prior = priors.PerSite({"query": priors.IsotropicNormal(0.3), "self.query": priors.IsotropicNormal(0.2)})
    with pytest.raises(ConfigError, match="several prior keys"):
        prior("a.self.query", (2, 2))


def test_resolve_accepts_distributions_callables_and_mappings():
    fixed = priors.resolve(dist.Laplace(0.0, 0.1))
    d = fixed("s", (2, 2))
    assert isinstance(d.base_dist, dist.Laplace) and d.event_shape == (2, 2)
    fn = priors.resolve(lambda name, shape: dist.Normal(torch.zeros(shape), 2.0).to_event(2))
    assert fn("s", (2, 2)).event_shape == (2, 2)
    assert isinstance(priors.resolve({"q": dist.Normal(0.0, 1.0)}), priors.PerSite)
    assert isinstance(priors.resolve(None), priors.IsotropicNormal)
    with pytest.raises(ConfigError):
        priors.resolve(3.0)
    with pytest.raises(ConfigError, match="event shape"):
        priors.resolve(dist.Normal(torch.zeros(3), 1.0).to_event(1))("s", (2, 2))


def test_builtin_priors_move_with_the_module():
    prior = priors.IsotropicNormal(0.1).to(torch.float64)
    assert prior("s", (2, 2)).base_dist.scale.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- the zoo
def test_heavy_tailed_priors_match_torch():
    x = torch.randn(3, 3)
    t = priors.StudentT(df=3.0, scale=0.2)("a.query", (3, 3))
    torch.testing.assert_close(t.log_prob(x), torch.distributions.StudentT(3.0, 0.0, 0.2).log_prob(x).sum())
    lap = priors.Laplace(0.2)("a.query", (3, 3))
    torch.testing.assert_close(lap.log_prob(x), torch.distributions.Laplace(0.0, 0.2).log_prob(x).sum())
    assert t.event_shape == lap.event_shape == (3, 3)
    with pytest.raises(ConfigError, match="df"):
        priors.StudentT(df=0.0)


def _model(prior):
    from pyrolora import BayesianLoraModel, LoraXSConfig, inject_adapters
    from tests.conftest import tiny_bert

    backbone = tiny_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=["query", "value"]))
    return BayesianLoraModel(backbone, adapters, prior=prior, dataset_size=10)


@pytest.mark.parametrize("per_module", [False, True])
def test_hierarchical_prior_samples_its_scales_before_the_cores(per_module):
    from pyro import poutine

    model = _model(priors.Hierarchical(median=0.2, log_scale=0.5, per_module=per_module))
    trace = poutine.trace(model).get_trace(None)
    names = list(trace.stochastic_nodes)
    hyper = [n for n in names if n.startswith("prior_scale")]
    assert len(hyper) == (len(model.site_names) if per_module else 1)
    assert names.index(hyper[-1]) < names.index(model.site_names[0])  # scales first, then every core
    for site in model.site_names:
        scale_site = f"prior_scale/{site}" if per_module else "prior_scale"
        sigma = trace.nodes[scale_site]["value"]
        core_dist = trace.nodes[site]["fn"]
        torch.testing.assert_close(core_dist.base_dist.scale, sigma.expand(2, 2))
    hyperprior = trace.nodes[hyper[0]]["fn"]  # LogNormal(log m, s): its median is m
    torch.testing.assert_close(hyperprior.loc.exp(), torch.tensor(0.2))
    torch.testing.assert_close(hyperprior.scale, torch.tensor(0.5))


def test_hierarchical_prior_outside_a_model_and_inside_a_mapping():
    with pytest.raises(ConfigError, match="sampled by the model"):
        priors.Hierarchical()("a.query", (2, 2))
    from pyro import poutine

    model = _model({"query": priors.Hierarchical(per_module=True), "value": priors.IsotropicNormal(0.3)})
    trace = poutine.trace(model).get_trace(None)
    hyper = sorted(n for n in trace.stochastic_nodes if n.startswith("prior_scale"))
    assert hyper == sorted(f"prior_scale/{s}" for s in model.site_names if s.endswith("query"))
