"""One contract matrix over every registered guide and a representative set of priors.

Each family is fit in the mode ``fit`` uses (Pyro's module-local parameters, DESIGN traps 6 and 7), then must
predict, save and load, give finite metrics, and be distinct from the point estimate where it should be.
"""

import math

import pyro
import pytest
import torch

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, metrics, predict, priors
from pyrolora.inference import draw_latents, fit_posterior
from pyrolora.inference.state import load_state, save_state
from tests.conftest import tiny_bert, token_batch

#: Options that keep every family to a second or two on the tiny model.
CHEAP = {
    "nuts": {"num_chains": 2, "num_samples": 4, "warmup_steps": 2, "max_tree_depth": 2},
    "swag": {"rank": 4, "frequency": 1},
    "flow": {"hidden_dim": 40, "num_mc": 200},  # the MADE needs a width >= D = 16
}
POINT_MASSES = {"delta"}


def _build(prior=None, seed=0):
    torch.manual_seed(seed)
    backbone = tiny_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=["query", "value"]))
    return BayesianLoraModel(backbone, adapters, prior=prior, dataset_size=20)


def _data():
    return [
        (token_batch(seed=i), torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(i))) for i in range(4)
    ]


def test_the_registry_holds_the_zoo():
    assert {"meanfield", "blockwise", "laplace", "flow", "swag", "nuts"} <= set(guides.available())


@pytest.mark.parametrize("name", guides.available())
def test_plain_fit_trains_every_guide_in_local_mode(name):
    model, data = _build(), _data()
    guide = guides.make(name, model, **CHEAP.get(name, {}))
    guides.check_local(guide)
    result = fit(model, guide, data, num_steps=3, progress=False, seed=0)
    assert result.num_steps == 3 and all(math.isfinite(v) for v in result.losses)
    assert len(pyro.get_param_store()) == 0  # module-local: nothing leaked into the global store
    trainable = [p for p in guide.parameters() if p.requires_grad]
    assert trainable, "every family has trainable parameters in its SVI/MAP stage"


@pytest.mark.parametrize("name", guides.available())
def test_every_guide_fits_predicts_saves_and_loads(tmp_path, name):
    model, data = _build(), _data()
    guide = guides.make(name, model, **CHEAP.get(name, {}))
    fit_posterior(model, guide, data, num_steps=6, progress=False, seed=0)
    assert len(pyro.get_param_store()) == 0

    median = guide.median()
    quantiles = guide.quantiles([0.05, 0.95])
    for site in model.site_names:
        assert median[site].shape == (2, 2) and quantiles[site].shape == (2, 2, 2)
        assert (quantiles[site][0] <= quantiles[site][1]).all()

    prediction = predict(model, guide, data, num_samples=4, seed=3)
    assert prediction.probs.shape == (4, 20, 3)
    labels = torch.cat([t for _, t in data]).numpy()
    for metric in (metrics.accuracy, metrics.ece, metrics.nll, metrics.brier):
        assert math.isfinite(metric(prediction.mean.numpy(), labels))

    draws = draw_latents(guide, model, 8)
    spread = min(v.std(0).max().item() for v in draws.values())
    if name in POINT_MASSES:
        assert spread == 0.0
    else:
        # A posterior, not a point: every site's draws vary (guides start at scale 0.05, SWAG's iterates move
        # by about lr = 1e-2 per step, NUTS chains start 0.01 apart), far above float noise.
        assert spread > 1e-4, spread
        assert (quantiles[model.site_names[0]][0] < quantiles[model.site_names[0]][1]).any()

    save_state(tmp_path / "state.safetensors", model, guide)
    fresh = _build()
    fresh_guide = guides.make(name, fresh, **CHEAP.get(name, {}))
    load_state(tmp_path / "state.safetensors", fresh, fresh_guide)
    again = predict(fresh, fresh_guide, data, num_samples=4, seed=3)
    assert torch.equal(again.probs, prediction.probs)


def test_laplace_swag_and_nuts_provide_sample_latents_and_nuts_keeps_its_chains():
    model, data = _build(), _data()
    for name in ("laplace", "swag", "nuts"):
        guide = guides.make(name, model, **CHEAP.get(name, {}))
        fit_posterior(model, guide, data, num_steps=4, progress=False, seed=0)
        draws = guide.sample_latents(5)
        assert set(draws) == set(model.site_names) and all(v.shape == (5, 2, 2) for v in draws.values())
    assert guide.chains.shape == (2, 4, model.num_latents)
    per_site = guide.chain_samples()
    assert all(v.shape == (2, 4, 2, 2) for v in per_site.values())
    # sample_latents thins the pooled chains deterministically: the first and last stored draws are included.
    pooled = guide.chains.reshape(-1, model.num_latents)
    first_site = model.site_names[0]
    picked = guide.sample_latents(8)[first_site].reshape(8, -1)
    assert torch.equal(picked[0], pooled[0, :4]) and torch.equal(picked[-1], pooled[-1, :4])


def test_swag_collects_on_schedule_and_samples_its_low_rank_gaussian():
    model, data = _build(), _data()
    guide = guides.make("swag", model, rank=3, start=4, frequency=2, collect_lr=5e-3, scale=1.0)
    result = fit_posterior(model, guide, data, num_steps=12, progress=False, seed=0)
    assert result.num_steps == 12 and guide.num_collected == 4  # steps 5..12, every second one
    assert result.learning_rates[4:] == [5e-3] * 8  # constant collection learning rate
    posterior = guide.get_posterior()
    assert posterior.cov_factor.shape == (model.num_latents, 3)  # the last K = 3 deviations
    with torch.random.fork_rng():
        torch.manual_seed(0)
        z = guide.draw_unconstrained(20000)
    # Sample covariance against the stated SWAG covariance: 20000 draws give ~1-2% relative error per entry.
    expected = posterior.covariance_matrix
    assert (torch.cov(z.T) - expected).abs().max() / expected.abs().max() < 0.05
    plain = guides.make("swag", model, start=5)
    with pytest.raises(Exception, match="leaves no step"):
        fit_posterior(model, plain, data, num_steps=2, progress=False)
    with pytest.raises(Exception, match="rank K"):
        guides.make("swag", model, rank=0)


def test_swag_default_frequency_collects_enough_iterates_for_a_covariance():
    # The notebook's setting scaled down: 3 epochs of 4 batches, collection from half-way (6 steps), K = 4. The
    # once-per-epoch rule alone collected 1 iterate here (the variance at its floor, no low-rank part).
    model, data = _build(), _data()
    guide = guides.make("swag", model, rank=4, start=0.5)
    fit_posterior(model, guide, data, num_epochs=3, lr=1e-2, progress=False, seed=0)
    assert guide.num_collected >= min(4, 6)
    posterior = guide.get_posterior()
    sd = posterior.variance.sqrt()
    # AdamW moves every coordinate by about lr = 1e-2 per step, so the iterates scatter by ~1e-3..1e-2; a
    # collapsed SWAG has sd = sqrt(0.5 * 0.5 * 1e-12) = 5e-7. 1e-4 sits two orders of magnitude from both.
    assert sd.median() > 1e-4, sd.median()
    assert posterior.cov_factor.abs().sum(0).gt(0).sum() >= 2  # a real low-rank part of at least two columns


@pytest.mark.parametrize("epoch_steps", [None, 1, 3, 10])
@pytest.mark.parametrize("collect_steps", [1, 2, 5, 19, 20, 21, 100, 1000])
@pytest.mark.parametrize("rank", [1, 2, 20])
def test_swag_collection_frequency_yields_min_of_rank_and_steps(collect_steps, rank, epoch_steps):
    from pyrolora.inference.swag import collection_frequency

    frequency = collection_frequency(collect_steps, rank, epoch_steps)
    assert collect_steps // frequency >= min(rank, collect_steps)
    if epoch_steps is not None and collect_steps // epoch_steps >= rank:
        assert frequency == epoch_steps  # the paper's once-per-epoch rule when it suffices


def test_swag_warns_when_fewer_than_two_iterates_are_collected():
    from pyrolora.errors import SWAGWarning

    model, data = _build(), _data()
    guide = guides.make("swag", model, rank=4, start=0.5, frequency=100)
    with pytest.warns(SWAGWarning, match=r"collected 1 iterate over 2 collection steps \(frequency 100"):
        fit_posterior(model, guide, data, num_steps=4, progress=False, seed=0)
    assert guide.num_collected == 1


def test_swag_collects_sgd_iterates_when_asked(monkeypatch):
    model, data = _build(), _data()
    with pytest.raises(Exception, match="explicit collect_lr"):
        guides.make("swag", model, collect_optimizer="sgd")
    with pytest.raises(Exception, match="needs collect_optimizer='sgd'"):
        guides.make("swag", model, collect_momentum=0.9)
    guide = guides.make("swag", model, rank=2, start=2, frequency=1, collect_optimizer="sgd", collect_lr=1e-3)
    seen = []
    original = torch.optim.SGD.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("momentum"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "__init__", spy)
    result = fit_posterior(model, guide, data, num_steps=5, lr=1e-2, progress=False, seed=0)
    assert seen == [0.0]  # one SGD optimizer, for the collection stage only
    assert result.learning_rates[2:] == [1e-3] * 3 and guide.num_collected == 3


def test_blockwise_joint_posterior_is_the_product_of_its_blocks():
    from pyrolora.diagnostics.spectrum import covariance_spectrum

    model, data = _build(priors.Hierarchical(per_module=True)), _data()  # adapter blocks and mean-field scales
    guide = guides.make("blockwise", model, rank=2)
    fit(model, guide, data, num_steps=5, lr=0.05, progress=False, seed=0)  # move every parameter off its init
    joint = guide.get_posterior()
    reference = guides.make("lowrank", model)
    guides.setup(reference, model)
    d = reference.latent_dim
    order = [(site["name"], u.numel()) for site, u in reference._unpack_latent(torch.zeros(d))]
    assert joint.loc.shape == (d,) and len(order) == 8  # 4 adapter cores and 4 per-module prior scales
    # the blocks, read from the parts, in the order every AutoContinuous guide flattens the sites
    parts = {}
    for part in guide:
        for name, _ in part.prototype_trace.iter_stochastic_nodes():
            if isinstance(part, pyro.infer.autoguide.AutoLowRankMultivariateNormal):
                parts[name] = part.get_posterior()
            else:
                loc, scale = part._get_loc_and_scale(name)
                parts[name] = pyro.distributions.Normal(loc.reshape(-1), scale.reshape(-1)).to_event(1)
    with torch.no_grad():
        z = joint.sample((6,))  # (6, D)
        pieces = torch.split(z, [n for _, n in order], dim=-1)
        by_blocks = sum(parts[name].log_prob(piece) for (name, _), piece in zip(order, pieces, strict=True))
        # float32 log densities of ~20 terms of size ~10: rounding stays far below 1e-3
        assert torch.allclose(joint.log_prob(z), by_blocks, atol=1e-3, rtol=0)
        cov, start = joint.covariance_matrix, 0
        for name, n in order:
            block = parts[name]
            assert torch.allclose(joint.loc[start : start + n], block.mean, atol=1e-6)
            block_cov = getattr(block, "covariance_matrix", None)
            if block_cov is None:
                block_cov = torch.diag(block.variance)
            assert torch.allclose(cov[start : start + n, start : start + n], block_cov, atol=1e-6)
            outside = torch.cat([cov[start : start + n, :start], cov[start : start + n, start + n :]], dim=1)
            assert outside.abs().max() == 0  # independent blocks
            start += n
        spectrum = covariance_spectrum(guide)  # consumed like any Gaussian guide: the fitted covariance
        assert spectrum.source == "fitted"
        expected = torch.linalg.eigvalsh(cov.double()).flip(0)
        assert torch.allclose(spectrum.eigenvalues, expected, atol=1e-9)


REPRESENTATIVE_PRIORS = {
    "isotropic": lambda: priors.IsotropicNormal(0.1),
    "per_module": lambda: {"query": priors.IsotropicNormal(0.05), "value": priors.IsotropicNormal(0.3)},
    "hierarchical": lambda: priors.Hierarchical(),
    "hierarchical_per_module": lambda: {"query": priors.Hierarchical(per_module=True)},
    "student_t": lambda: priors.StudentT(df=3.0, scale=0.1),
    "laplace": lambda: priors.Laplace(0.1),
    "callable": lambda: (
        lambda name, shape: (
            pyro.distributions.Normal(0.0, 0.2 if "query" in name else 0.1).expand(shape).to_event(len(shape))
        )
    ),
}


#: Every prior with the SVI, Laplace and SWAG families; NUTS (the slowest) with the hierarchical priors only.
PAIRS = [(p, g) for p in sorted(REPRESENTATIVE_PRIORS) for g in ("lowrank", "blockwise", "laplace", "swag")] + [
    ("hierarchical", "nuts"),
    ("hierarchical_per_module", "nuts"),
    ("student_t", "flow"),
    ("hierarchical", "meanfield"),
]


@pytest.mark.parametrize(("prior_name", "guide_name"), PAIRS)
def test_priors_by_guides(tmp_path, prior_name, guide_name):
    model, data = _build(REPRESENTATIVE_PRIORS[prior_name]()), _data()
    guide = guides.make(guide_name, model, **CHEAP.get(guide_name, {}))
    result = fit_posterior(model, guide, data, num_steps=4, progress=False, seed=0)
    assert all(math.isfinite(v) for v in result.losses)
    median = guide.median()
    hyper = sorted(set(median) - set(model.site_names))
    if prior_name == "hierarchical":
        assert hyper == ["prior_scale"]
    elif prior_name == "hierarchical_per_module":
        assert hyper == [f"prior_scale/{s}" for s in model.site_names if s.endswith("query")]
    else:
        assert hyper == []
    assert all((median[h] > 0).all() for h in hyper)  # scales stay on their support
    prediction = predict(model, guide, data, num_samples=3, seed=1)
    assert torch.isfinite(prediction.probs).all()
    save_state(tmp_path / "s.safetensors", model, guide)
    fresh = _build(REPRESENTATIVE_PRIORS[prior_name]())
    fresh_guide = guides.make(guide_name, fresh, **CHEAP.get(guide_name, {}))
    load_state(tmp_path / "s.safetensors", fresh, fresh_guide)
    assert torch.equal(predict(fresh, fresh_guide, data, num_samples=3, seed=1).probs, prediction.probs)
