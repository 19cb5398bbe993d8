import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict
from pyrolora.errors import ConfigError
from tests.conftest import TINY_MODELS, tiny_bert, token_batch

REQUIRED = {"lowrank", "diagonal", "full", "delta"}


def _setup():
    backbone = tiny_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=["query", "value"]))
    model = BayesianLoraModel(backbone, adapters, dataset_size=20)
    data = [(token_batch(seed=i), torch.randint(0, 3, (5,))) for i in range(4)]
    return model, data


def test_registry_holds_the_required_guides():
    assert REQUIRED <= set(guides.available())
    model, _ = _setup()
    with pytest.raises(ConfigError, match=r"unknown guide 'nope'.*lowrank"):
        guides.make("nope", model)
    with pytest.raises(ConfigError, match="rejected options"):
        guides.make("delta", model, rank=3)
    with pytest.raises(ConfigError, match="rank K"):
        guides.make("lowrank", model, rank=0)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_guide_fits_in_local_mode_and_honours_the_contract(name):
    model, data = _setup()
    guide = guides.make(name, model)
    result = fit(model, guide, data, num_steps=4, progress=False)
    assert result.num_steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(pyro.get_param_store()) == 0  # every parameter lives in the guide module
    median = guide.median()
    assert set(median) == set(model.adapters) and all(v.shape == (2, 2) for v in median.values())
    quantiles = guide.quantiles([0.1, 0.9])
    assert all(q.shape == (2, 2, 2) for q in quantiles.values())
    if name != "delta":
        assert guide.get_posterior().event_shape == (model.num_latents,)
        assert (quantiles[next(iter(quantiles))][1] > quantiles[next(iter(quantiles))][0]).all()
    prediction = predict(model, guide, data, num_samples=3)
    assert prediction.probs.shape == (3, 20, 3)


def test_lowrank_stores_d_times_k_plus_two_numbers():
    model, _ = _setup()
    guide = guides.make("lowrank", model, rank=3)
    guides.setup(guide, model)
    d = model.num_latents
    assert sum(p.numel() for p in guide.parameters()) == d * (3 + 2)


def test_a_factory_callable_is_accepted_and_global_mode_guides_are_refused():
    model, data = _setup()
    guide = guides.make(lambda m: AutoDiagonalNormal(m), model)
    fit(model, guide, data, num_steps=2, progress=False)
    global_mode = AutoDiagonalNormal(model)  # built outside module-local mode
    with pytest.raises(ConfigError, match="global-parameter mode"):
        fit(model, global_mode, data, num_steps=1, progress=False)


def test_setup_without_data_matches_setup_with_data():
    model, data = _setup()
    g1 = guides.make("lowrank", model)
    guides.setup(g1, model)
    g2 = guides.make("lowrank", model)
    fit(model, g2, data, num_steps=1, progress=False)
    assert {k: v.shape for k, v in g1.state_dict().items()} == {k: v.shape for k, v in g2.state_dict().items()}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("name", ["delta", "meanfield", "lowrank", "swag", "laplace", "nuts"])
def test_fit_moves_every_site_on_every_architecture(family, name):
    # Llama's and most decoders' module paths start with `model.`; a guide that keeps its parameters by dotted
    # site name on itself then hands them to the model's attribute of that name, where fit never trains them.
    factory, targets, _ = TINY_MODELS[family]
    backbone = factory()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=20)
    data = [(token_batch(seed=i), torch.randint(0, 3, (5,))) for i in range(2)]
    guide = guides.make(name, model)
    guides.setup(guide, model)
    before = {k: v.clone() for k, v in guide.median().items()}
    fit(model, guide, data, num_steps=3, lr=0.05, progress=False)
    after = guide.median()
    assert sum(p.numel() for p in guide.parameters()) >= model.num_latents
    unmoved = [k for k in before if torch.equal(before[k], after[k])]
    assert not unmoved, f"{name} on {family} never trained {unmoved}"
