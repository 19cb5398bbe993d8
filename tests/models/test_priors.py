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
