"""The Pyro-module form (``PyroLoraModel``) is the same model as ``BayesianLoraModel`` (issue 22).

For the same backbone, adapters, prior and data the two forms must have the same sample sites (names, shapes,
distributions), the same log joint density, fit every registered guide to the same losses, and predict the
same probabilities under the same seed; tiny BERT, Llama and GPT-2 (Conv1D) here, the real MiniLM in
``test_pyro_module_minilm.py``. Models run in float64 so that "the same" can be checked to 1e-10.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal
from pyro.nn import PyroModule, PyroParam, PyroSample

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict, priors
from pyrolora.errors import ConfigError
from pyrolora.models.pyro_module import PyroAdapters, PyroLoraModel, PyroLoraXS
from tests.conftest import TINY_MODELS, token_batch

ARCHS = ["bert", "llama", "gpt2"]
#: float64 end to end: both forms run the same operations, so values agree to rounding, far below this.
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _backbone(arch: str):
    factory, targets, _ = TINY_MODELS[arch]
    torch.manual_seed(0)  # the same weights and head for every call: two forms can be fitted side by side
    backbone = factory().double()
    return backbone, inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))


def _model(arch: str, form: type, prior=None, dataset_size: int = 15):
    backbone, adapters = _backbone(arch)
    return form(backbone, adapters, prior=prior, dataset_size=dataset_size).double()


def _data(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(token_batch(seed=i), torch.randint(0, 3, (5,), generator=g)) for i in range(n)]


def _base(fn):
    """The distribution under any ``expand`` / ``to_event`` wrappers."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def _sites(trace) -> list[tuple]:
    """(name, distribution type, batch shape, event shape, observed) of every sample site, in order."""
    out = []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["infer"].get("_do_not_trace"):
            fn = site["fn"]
            if not isinstance(fn, torch.distributions.Distribution):  # the data plate's subsample site
                out.append((name, type(fn).__name__, tuple(site["value"].shape)))
                continue
            out.append((name, type(_base(fn)).__name__, tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape),
                        site["is_observed"]))  # fmt: skip
    return out


#: the first adapted module of each tiny architecture: the per-site prior below gives it a prior of its own
FIRST_SITE = {
    "bert": "bert.encoder.layer.0.attention.self.query",
    "llama": "model.layers.0.self_attn.q_proj",
    "gpt2": "transformer.h.0.attn.c_attn",
}
PRIORS = {
    "isotropic": lambda arch: None,
    "laplace": lambda arch: priors.Laplace(0.05),
    "per_site": lambda arch: priors.PerSite(
        {FIRST_SITE[arch]: priors.StudentT(3.0, 0.2)}, default=priors.IsotropicNormal(0.3)
    ),
    "hierarchical": lambda arch: priors.Hierarchical(per_module=True),
}


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_sites_names_shapes_and_log_joint(arch, prior):
    bayes = _model(arch, BayesianLoraModel, PRIORS[prior](arch))
    pyro_form = PyroLoraModel.from_model(bayes)  # shares backbone, adapters and prior
    inputs, targets = _data(1)[0]
    trace_p = poutine.trace(pyro_form).get_trace(inputs, targets)
    trace_b = poutine.trace(poutine.replay(bayes, trace=trace_p)).get_trace(inputs, targets)
    assert _sites(trace_p) == _sites(trace_b)
    cores = [name for name, *_ in _sites(trace_p) if name in bayes.adapters]
    assert cores == list(bayes.adapters) and all(trace_p.nodes[n]["value"].shape == (2, 2) for n in cores)
    lp_p, lp_b = trace_p.log_prob_sum(), trace_b.log_prob_sum()
    torch.testing.assert_close(lp_p, lp_b, **TIGHT)
    # ... and the other way round, from the hand-written form's own draws
    trace_b = poutine.trace(bayes).get_trace(inputs, targets)
    trace_p = poutine.trace(poutine.replay(pyro_form, trace=trace_b)).get_trace(inputs, targets)
    torch.testing.assert_close(trace_p.log_prob_sum(), trace_b.log_prob_sum(), **TIGHT)
    # the comparison can fail: another prior on the Pyro form moves the log joint by far more than TIGHT
    pyro_form.set_prior(dist.Normal(0.0, 7.0))
    other = poutine.trace(poutine.replay(pyro_form, trace=trace_b)).get_trace(inputs, targets)
    assert abs(other.log_prob_sum() - trace_b.log_prob_sum()) > 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prior_replaced_in_plain_pyro_equals_the_per_site_prior(arch):
    bayes = _model(arch, BayesianLoraModel)
    first = next(iter(bayes.adapters))
    pyro_form = _model(arch, PyroLoraModel)
    r = pyro_form.adapters.config.rank
    pyro_form.adapters[first].R = PyroSample(dist.Laplace(0.0, 0.05).expand([r, r]).to_event(2))
    twin = _model(arch, BayesianLoraModel, {first: priors.Laplace(0.05)})
    inputs, targets = _data(1)[0]
    trace_p = poutine.trace(pyro_form).get_trace(inputs, targets)
    assert type(_base(trace_p.nodes[first]["fn"])).__name__ == "Laplace"
    for model, expected in ((twin, True), (bayes, False)):
        trace_b = poutine.trace(poutine.replay(model, trace=trace_p)).get_trace(inputs, targets)
        # the plain-Pyro Laplace is float32 (built from Python floats): agreement to its rounding, 1e-6;
        # the default normal prior on that site is off by more than 1.0
        same = math.isclose(trace_b.log_prob_sum().item(), trace_p.log_prob_sum().item(), rel_tol=1e-6)
        assert same is expected
    assert _base(pyro_form.prior(first, (r, r))).scale.unique().item() == pytest.approx(0.05)  # diagnostics see it


def test_one_call_sets_every_prior_and_hyperparameters_are_plain_pyro_sites():
    model = _model("bert", PyroLoraModel)
    model.set_prior(priors.StudentT(4.0, 0.2))
    inputs, targets = _data(1)[0]
    trace = poutine.trace(model).get_trace(inputs, targets)
    assert {type(_base(trace.nodes[n]["fn"])).__name__ for n in model.adapters} == {"StudentT"}
    assert isinstance(model.default_prior, priors.StudentT)
    # a shared hyperprior and a per-module scale, in plain Pyro
    model.adapters.tau = PyroSample(dist.HalfNormal(0.2))
    for adapter in model.adapters.values():
        adapter.scale = PyroSample(lambda a: dist.HalfNormal(model.adapters.tau))
        adapter.R = PyroSample(lambda a: dist.Normal(0.0, a.scale).expand(a.shape).to_event(2))
    trace = poutine.trace(model).get_trace(inputs, targets)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    first = next(iter(model.adapters))
    assert names[:3] == ["tau", f"{first}.scale", first]  # hyperparameters before their core, all before "data"
    assert list(trace.nodes).index("data") > max(list(trace.nodes).index(n) for n in names)
    assert len(names) == 1 + 2 * len(model.adapters)
    scale = trace.nodes[f"{first}.scale"]["value"]
    torch.testing.assert_close(_base(trace.nodes[first]["fn"]).scale, scale.expand(2, 2))
    with pytest.raises(ConfigError, match="function of the model"):
        model.prior(first, (2, 2))


def test_the_adapters_are_pyro_modules_and_a_mapping_the_backbone_is_not():
    model = _model("gpt2", PyroLoraModel)
    assert isinstance(model.adapters, PyroAdapters) and isinstance(model.adapters, PyroModule)
    from collections.abc import Mapping

    assert isinstance(model.adapters, Mapping)
    assert list(model.adapters) == list(model.adapters.layers) == list(model.site_names)
    site = next(iter(model.adapters))
    adapter = model.adapters[site]
    assert isinstance(adapter, PyroLoraXS) and adapter.site_name == site and adapter.shape == (2, 2)
    assert adapter.layer is model.backbone.get_submodule(site)
    assert not any(isinstance(m, PyroModule) for m in model.backbone.modules())
    assert not list(model.adapters.parameters())  # the layers are references, not submodules
    with pytest.raises(KeyError, match="no adapter site 'nope'"):
        model.adapters["nope"]


@pytest.mark.parametrize("local", [True, False], ids=["module_local", "global"])
def test_plain_pyro_svi_keeps_the_backbone_frozen(local):
    model = _model("llama", PyroLoraModel)
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    head = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert head == {"score.weight"}
    data = _data(2)
    with pyro.settings.context(module_local_params=local):
        guide = AutoLowRankMultivariateNormal(model, rank=2)
        if local:  # Pyro's idiom in this mode: the ELBO as a module, a torch optimizer over its parameters
            loss_fn = Trace_ELBO()(model, guide)
            loss_fn(*data[0])
            optim = torch.optim.Adam([p for p in loss_fn.parameters() if p.requires_grad], lr=0.05)
            for inputs, targets in data * 2:
                optim.zero_grad()
                loss_fn(inputs, targets).backward()
                optim.step()
        else:
            svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
            for inputs, targets in data * 2:
                svi.step(inputs, targets)
    still = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert still == head  # trap 1: no frozen weight was switched to requires_grad
    for name, value in frozen.items():
        assert torch.equal(model.backbone.get_parameter(name), value), name
    store = set(pyro.get_param_store().keys())
    if local:
        assert not store
    else:  # the guide's parameters only: no backbone weight went into the global store (trap 2)
        assert store and all(k.startswith("AutoLowRankMultivariateNormal") for k in store)


GUIDE_OPTIONS = {"nuts": {"num_samples": 4, "warmup_steps": 2}, "swag": {"rank": 2}}


@pytest.mark.parametrize("name", guides.available())
@pytest.mark.parametrize("arch", ARCHS)
def test_every_guide_fits_the_pyro_form_as_it_fits_the_hand_written_one(arch, name):
    data = _data(2)
    results = {}
    for form in (BayesianLoraModel, PyroLoraModel):
        model = _model(arch, form)
        guide = guides.make(name, model, **GUIDE_OPTIONS.get(name, {}))
        # lean=False: the same Pyro ELBO on both forms (the lean step is compared in the next test)
        fit_result = fit(model, guide, data, num_steps=3, lr=0.05, seed=3, progress=False, lean=False)
        results[form] = (fit_result.losses, [p.detach().clone() for p in guide.parameters()])
    (loss_b, params_b), (loss_p, params_p) = results.values()
    assert len(loss_p) == 3 and all(math.isfinite(v) for v in loss_p)
    torch.testing.assert_close(torch.tensor(loss_p), torch.tensor(loss_b), **TIGHT)
    assert len(params_p) == len(params_b) > 0
    for a, b in zip(params_p, params_b, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("name", ["lowrank", "delta"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_pyro_form_fits_and_predicts_as_the_lean_default(arch, name):
    """fit's default (the lean step) on BayesianLoraModel against Pyro's ELBO on the Pyro form: same losses,
    same fitted guide and head, same predictions under the same seed."""
    data = _data(3)
    results = []
    for form in (BayesianLoraModel, PyroLoraModel):
        model = _model(arch, form)
        guide = guides.make(name, model)
        fit_result = fit(model, guide, data, num_steps=4, lr=0.05, seed=3, progress=False)
        prediction = predict(model, guide, data, num_samples=5, seed=11)
        results.append((fit_result.losses, prediction, model.head_state()))
    (loss_b, pred_b, head_b), (loss_p, pred_p, head_p) = results
    # the lean step sums the same terms in another order: agreement to float64 rounding of sums of ~1e2
    torch.testing.assert_close(torch.tensor(loss_p), torch.tensor(loss_b), rtol=1e-9, atol=1e-9)
    for key in head_b:
        torch.testing.assert_close(head_p[key], head_b[key], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(pred_p.probs, pred_b.probs, rtol=1e-6, atol=1e-6)  # predict returns float32
    assert pred_p.probs.shape == (5, 15, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_pyro_predictive_draws_the_same_labels_from_both_forms(arch):
    data = _data(1)
    inputs, _ = data[0]
    draws = []
    for form in (BayesianLoraModel, PyroLoraModel):
        model = _model(arch, form)
        guide = guides.make("lowrank", model)
        fit(model, guide, data, num_steps=2, seed=0, progress=False)
        with pyro.settings.context(module_local_params=True):
            torch.manual_seed(4)
            draws.append(Predictive(model, guide=guide, num_samples=6)(inputs))
    assert draws[0].keys() == draws[1].keys() and "obs" in draws[0]
    for key in draws[0]:
        torch.testing.assert_close(draws[1][key], draws[0][key], **TIGHT)
    assert draws[0]["obs"].shape == (6, 5)


def test_kl_weight_and_pyro_params_on_the_adapters_are_trained_by_fit():
    data = _data(2)
    losses = []
    for form in (BayesianLoraModel, PyroLoraModel):
        model = _model("bert", form)
        guide = guides.make("lowrank", model)
        losses.append(fit(model, guide, data, num_steps=3, seed=1, kl_weight=0.3, progress=False, lean=False).losses)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), **TIGHT)
    # an empirical-Bayes scale written in plain Pyro: a PyroParam on the container, trained with the guide
    model = _model("bert", PyroLoraModel)
    with pyro.settings.context(module_local_params=True):
        model.adapters.log_sigma = PyroParam(torch.tensor(math.log(0.1), dtype=torch.float64))
    model.set_prior(lambda site, shape: dist.Normal(0.0, model.adapters.log_sigma.exp()).expand(shape).to_event(2))
    assert [n for n, _ in model.adapters.named_parameters()] == ["log_sigma_unconstrained"]
    before = model.prior_state()["adapters.log_sigma_unconstrained"].clone()
    fit(model, guides.make("lowrank", model), data, num_steps=3, lr=0.05, seed=1, progress=False)
    assert not torch.equal(model.prior_state()["adapters.log_sigma_unconstrained"], before)


def test_from_model_refuses_a_pyro_form_and_construction_checks_its_arguments():
    model = _model("bert", PyroLoraModel)
    with pytest.raises(ConfigError, match="already a PyroLoraModel"):
        PyroLoraModel.from_model(model)
    with pytest.raises(ConfigError, match="AdapterSet"):
        PyroAdapters({}, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="LoraXSLinear"):
        PyroLoraXS(torch.nn.Linear(2, 2), dist.Normal(0.0, 1.0))  # type: ignore[arg-type]
