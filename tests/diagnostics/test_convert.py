"""InferenceData from every guide, from explicit multi-chain draws and from Pyro's NUTS, with every group checked."""

import warnings

import arviz as az
import numpy as np
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc import api as mcmc_api

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters
from pyrolora.diagnostics import (
    chain_draws,
    load_inference_data,
    save_inference_data,
    site_summary,
    to_inference_data,
)
from pyrolora.errors import ConfigError, DataError
from tests.conftest import tiny_bert, token_batch
from tests.inference.test_closed_form import _problem

GUIDES = ["lowrank", "diagonal", "full", "delta"]


def _setup():
    backbone = tiny_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=["query", "value"]))
    model = BayesianLoraModel(backbone, adapters, dataset_size=20)
    data = [
        (token_batch(seed=i), torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(i))) for i in range(4)
    ]
    return model, data


@pytest.mark.parametrize("name", GUIDES)
def test_every_guide_gives_every_group_and_survives_netcdf(name, tmp_path):
    model, data = _setup()
    guide = guides.make(name, model)
    fit(model, guide, data, num_steps=10, progress=False)
    idata = to_inference_data(model, guide, data, num_samples=30, num_chains=2, samples_per_pass=7)
    assert set(idata.groups()) == {"posterior", "log_likelihood", "posterior_predictive", "observed_data"}
    post = idata.posterior
    assert list(post.data_vars) == list(model.site_names)  # one variable per site, named by module path
    for site in model.site_names:
        assert post[site].dims == ("chain", "draw", "row", "col") and post[site].shape == (2, 30, 2, 2)
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "example")
    assert idata.log_likelihood["obs"].shape == (2, 30, 20)
    assert idata.posterior_predictive["obs"].shape == (2, 30, 20)
    assert set(np.unique(idata.posterior_predictive["obs"].values)) <= {0, 1, 2}
    targets = torch.cat([t for _, t in data]).numpy()
    np.testing.assert_array_equal(idata.observed_data["obs"].values, targets)

    # Reference: the log-likelihood of draw (chain 1, draw 7), recomputed with the plain one-sample forward.
    values = {s: torch.as_tensor(post[s].values[1, 7]).float() for s in model.site_names}
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model.outputs(x, values) for x, _ in data])
    expected = torch.distributions.Categorical(logits=logits).log_prob(torch.as_tensor(targets)).numpy()
    # float32 forward, batched vs one sample at a time: measured differences ~1e-6; 1e-4 allows reassociation.
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[1, 7], expected, atol=1e-4)

    if name == "delta":
        # a point mass: every draw equals the MAP
        np.testing.assert_allclose(post[model.site_names[0]].values.std(axis=(0, 1)), 0.0, atol=0)
    else:
        # draws follow the guide: the mean of 60 draws lies within 5 posterior sds/sqrt(60) of the guide's median
        site = model.site_names[0]
        sd = post[site].values.std(axis=(0, 1))
        err = np.abs(post[site].values.mean(axis=(0, 1)) - guide.median()[site].numpy())
        assert (err < 5 * sd / np.sqrt(60)).all(), err / sd

    path = save_inference_data(idata, tmp_path / "posterior.nc")
    back = load_inference_data(path)
    for group in idata.groups():
        for var in getattr(idata, group).data_vars:
            np.testing.assert_array_equal(getattr(back, group)[var].values, getattr(idata, group)[var].values)
    assert back.posterior.attrs["pyrolora_num_latents"] == model.num_latents
    save_inference_data(back, path)  # the loaded file is closed, so it can be overwritten

    with warnings.catch_warnings():
        # ArviZ warns when pointwise k is high (always for a point mass, whose draws are all equal): a
        # statement about the model, not about the conversion tested here.
        warnings.simplefilter("ignore", UserWarning)
        loo, waic = az.loo(idata, pointwise=True), az.waic(idata)
    # WAIC by hand: Σ_i log mean_s p(y_i|θ_s) - Var_s log p(y_i|θ_s); ArviZ must agree to round-off.
    ll = idata.log_likelihood["obs"].values.reshape(60, 20)
    lppd = np.log(np.exp(ll).mean(0))
    by_hand = float((lppd - ll.var(0, ddof=1)).sum())
    assert waic.elpd_waic == pytest.approx(by_hand, rel=1e-9)
    assert np.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (20,)


def test_explicit_chains_give_rhat_near_one_and_shifted_chains_far_from_it():
    model, _ = _setup()
    g = torch.Generator().manual_seed(3)
    good = {s: torch.randn(4, 500, 2, 2, generator=g) for s in model.site_names}
    idata = to_inference_data(model, draws=good, sample_stats={"diverging": np.zeros((4, 500), dtype=bool)})
    assert set(idata.groups()) == {"posterior", "sample_stats"}
    assert idata.sample_stats["diverging"].dims == ("chain", "draw")
    table = site_summary(idata)
    # iid N(0, 1) chains: rank-normalised split R-hat of 2,000 draws stays within 1 ± 0.01 (its sd is ~0.002)
    assert (table["max_r_hat"] < 1.01).all(), table
    # iid draws: bulk ESS near 2,000; 1,500 leaves room for the estimator's noise (~5%) and the min over 4
    assert (table["min_ess_bulk"] > 1500).all(), table

    shifted = {s: v + 3.0 * torch.arange(4.0).reshape(4, 1, 1, 1) for s, v in good.items()}
    table = site_summary(to_inference_data(model, draws=shifted))
    # chain means 0, 3, 6, 9 with unit sd: R-hat ~ sqrt(1 + 11.25) ≈ 3.5; 2 is far above any healthy value
    assert (table["max_r_hat"] > 2.0).all(), table

    one_chain = {s: v[0] for s, v in good.items()}  # (draws, r, r) is one chain
    assert to_inference_data(model, draws=one_chain).posterior.sizes["chain"] == 1
    assert np.isnan(site_summary(to_inference_data(model, draws=one_chain))["max_r_hat"]).all()


def test_bad_draws_and_data_are_refused_with_the_fix():
    model, data = _setup()
    with pytest.raises(ConfigError, match="lack adapter sites"):
        chain_draws(model, draws={model.site_names[0]: torch.zeros(1, 3, 2, 2)})
    with pytest.raises(ConfigError, match=r"shape \(chains, draws, 2, 2\)"):
        chain_draws(model, draws={s: torch.zeros(3, 2) for s in model.site_names})
    with pytest.raises(ConfigError, match="sample_stats"):
        to_inference_data(
            model, draws={s: torch.zeros(2, 3, 2, 2) for s in model.site_names}, sample_stats={"x": np.zeros(5)}
        )
    with pytest.raises(ConfigError, match="guide or explicit draws"):
        to_inference_data(model)
    guide = guides.make("diagonal", model)
    with pytest.raises(DataError, match="targets"):
        to_inference_data(model, guide, [x for x, _ in data], num_samples=2)


@pytest.mark.slow
def test_nuts_chains_feed_every_group_and_match_the_exact_posterior(monkeypatch):
    """Pyro's MCMC object goes in as is: its per-chain samples and its ``diverging`` field."""
    model, data, mean, cov = _problem()
    # Pyro runs several chains in worker processes when it sees spare cores; draw them one after the other here.
    monkeypatch.setattr(mcmc_api.mp, "cpu_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=2 is more than available_cpu")
        mcmc = MCMC(NUTS(model), num_samples=150, warmup_steps=100, num_chains=2, disable_progbar=True)
    mcmc.run(data[0][0], data[0][1])
    idata = to_inference_data(model, draws=mcmc, data=data, seed=0)
    assert set(idata.groups()) == {
        "posterior",
        "log_likelihood",
        "posterior_predictive",
        "observed_data",
        "sample_stats",
    }
    assert idata.posterior["0"].shape == (2, 150, 2, 2)
    assert idata.log_likelihood["obs"].shape == (2, 150, 40)
    assert idata.posterior_predictive["obs"].shape == (2, 150, 40, 3)
    assert "diverging" in idata.sample_stats
    table = site_summary(idata)
    # NUTS on a 4-d Gaussian mixes fast: R-hat within 1.05 over 300 draws (split R-hat noise ~0.01-0.02)
    assert table["max_r_hat"].iloc[0] < 1.05, table
    theta = torch.as_tensor(idata.posterior["0"].values).reshape(-1, 4)
    sd = cov.diagonal().sqrt()
    # posterior mean within 5 MC standard errors (ESS ≥ 100 of 300 draws): 5 sd / sqrt(100)
    assert ((theta.mean(0) - mean).abs() / sd < 0.5).all()


@pytest.mark.parametrize("name", ["swag", "nuts", "laplace"])
def test_swag_nuts_and_laplace_give_every_group(name):
    from pyrolora import fit_posterior

    model, data = _setup()
    options = {
        "swag": {"rank": 4, "frequency": 1},
        "nuts": {"num_chains": 2, "num_samples": 6, "warmup_steps": 4, "max_tree_depth": 2},
        "laplace": {},
    }[name]
    guide = guides.make(name, model, **options)
    fit_posterior(model, guide, data, num_steps=12, progress=False, seed=0)
    if name == "nuts":  # the sampler's own chains, kept apart so that R-hat sees them
        draws = guide.chain_samples()
        assert all(v.shape == (2, 6, 2, 2) for v in draws.values())
        idata = to_inference_data(model, guide, data, draws=draws)
        shape = (2, 6)
    else:  # guide draws through sample_latents, split into two chains
        idata = to_inference_data(model, guide, data, num_samples=10, num_chains=2)
        shape = (2, 10)
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(idata.groups())
    for site in model.site_names:
        assert idata.posterior[site].dims == ("chain", "draw", "row", "col")
        assert idata.posterior[site].shape == (*shape, 2, 2)
        # a posterior, not a point: the draws of every site spread (the MAP would give a spread of exactly 0)
        assert idata.posterior[site].values.std() > 1e-6
    assert idata.log_likelihood["obs"].shape == (*shape, 20)
    assert np.isfinite(idata.log_likelihood["obs"].values).all()
    assert idata.posterior_predictive["obs"].shape == (*shape, 20)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, torch.cat([t for _, t in data]).numpy())
