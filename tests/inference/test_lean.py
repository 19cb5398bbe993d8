"""The fast paths of issue 6: the lean ELBO, bf16 autocast, torch.compile and memory-budgeted batched prediction."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, autoguide

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict, priors
from pyrolora.errors import ConfigError
from pyrolora.inference.guides import setup
from pyrolora.inference.lean import LeanELBO, supports
from pyrolora.inference.predict import samples_per_pass_for
from tests.conftest import TINY_MODELS, token_batch


def _model(name="bert", prior=None, dtype=torch.float64, dataset_size=15):
    factory, targets, _ = TINY_MODELS[name]
    backbone = factory().to(dtype)
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))
    return BayesianLoraModel(backbone, adapters, prior=prior, dataset_size=dataset_size).to(dtype)


def _guide(name, model):
    options = {} if name == "delta" else {"init_scale": 0.3}
    guide = setup(guides.make(name, model, **options), model)
    if name == "delta":  # move the point mass off the prior's mode so the likelihood term matters
        with pyro.settings.context(module_local_params=True), torch.no_grad():
            for p in guide.parameters():
                p.normal_(0, 0.3)
    return guide


def _data(n=3):
    return [
        (token_batch(seed=i), torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(i))) for i in range(n)
    ]


def _loss_and_grads(loss_fn, model, guide):
    with pyro.settings.context(module_local_params=True):
        params = [p for p in guide.parameters() if p.requires_grad] + model.head_parameters()
        for p in params:
            p.grad = None
        torch.manual_seed(5)
        value = loss_fn()
        value.backward()
    return value.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("guide_name", ["lowrank", "diagonal", "full", "delta"])
@pytest.mark.parametrize("prior", [None, priors.PerSite({"query": priors.IsotropicNormal(0.3)})], ids=["iso", "site"])
@pytest.mark.parametrize("particles", [1, 2])
def test_lean_elbo_equals_trace_elbo_value_and_gradients(guide_name, prior, particles):
    model = _model(prior=prior)
    guide = _guide(guide_name, model)
    inputs, targets = _data(1)[0]
    assert supports(model, guide)
    lean = LeanELBO(model, guide, num_particles=particles)
    trace = Trace_ELBO(num_particles=particles)
    v_lean, g_lean = _loss_and_grads(lambda: lean.differentiable_loss(inputs, targets), model, guide)
    v_pyro, g_pyro = _loss_and_grads(lambda: trace.differentiable_loss(model, guide, inputs, targets), model, guide)
    # same random draws, same terms, float64: only summation order differs
    torch.testing.assert_close(v_lean, v_pyro, atol=1e-9, rtol=1e-9)
    for a, b in zip(g_lean, g_pyro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_lean_step_makes_no_pyro_sample_statements(monkeypatch):
    model = _model()
    guide = _guide("lowrank", model)
    inputs, targets = _data(1)[0]
    calls = []
    original = pyro.sample
    monkeypatch.setattr(pyro, "sample", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    LeanELBO(model, guide).differentiable_loss(inputs, targets)
    assert calls == []  # the per-site Pyro machinery is what the lean step removes


def test_unsupported_pairs_take_pyro_path():
    model = _model()
    with pyro.settings.context(module_local_params=True):
        normal = autoguide.AutoNormal(model)
    setup(normal, model)
    assert not supports(model, normal)  # a guide outside the AutoContinuous / AutoDelta families

    class Custom(BayesianLoraModel):
        def forward(self, inputs, targets=None):
            return super().forward(inputs, targets)

    custom = Custom(model.backbone, model.adapters, dataset_size=15)
    assert not supports(custom, _guide("lowrank", custom))
    assert not supports(model, guides.make("lowrank", model))  # not set up yet
    with pytest.raises(ConfigError, match="lean ELBO"):
        LeanELBO(model, normal)
    result = fit(model, normal, _data(), num_steps=2, progress=False, seed=0)  # Pyro's path still trains it
    assert len(result.losses) == 2


@pytest.mark.parametrize("guide_name", ["lowrank", "delta"])
def test_fit_lean_equals_fit_through_pyro(guide_name):
    results = []
    for lean in (True, False):
        torch.manual_seed(0)  # the same tiny backbone for both runs
        model = _model()
        guide = guides.make(guide_name, model, **({} if guide_name == "delta" else {"init_scale": 0.3}))
        results.append(fit(model, guide, _data(), num_steps=6, progress=False, seed=3, lean=lean).losses)
    # identical draws and updates; float64 summation order may differ in the last bits and compound over steps
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(results[1]), atol=1e-8, rtol=1e-8)


def test_bf16_autocast_runs_the_backbone_in_bf16_and_keeps_the_guide_float32():
    model = _model(dtype=torch.float32)
    guide = setup(guides.make("lowrank", model, init_scale=0.3), model)  # no float32 prototype pass inside fit
    seen = []
    layer = next(iter(model.adapters.values()))
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = fit(model, guide, _data(), num_steps=4, progress=False, seed=0, precision="bf16")
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # the adapted layers ran under autocast
    assert all(p.dtype == torch.float32 for p in guide.parameters())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert torch.bfloat16 in {key[0] for key in layer._compute_cache}  # factors cast once and cached
    full = predict(model, guide, _data(), num_samples=4, seed=1)
    half = predict(model, guide, _data(), num_samples=4, seed=1, precision="bf16")
    assert half.probs.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (relative error ~4e-3 per op); the tiny models' probabilities move far less
    # than 0.02 through two layers, while a wrong sample or dropped adapter moves them by more than that
    torch.testing.assert_close(half.probs, full.probs, atol=2e-2, rtol=0)
    with pytest.raises(ConfigError, match="precision"):
        fit(model, guide, _data(), num_steps=1, progress=False, precision="fp8")


@pytest.mark.slow
def test_compiled_backbone_matches_eager_in_fit_and_predict():
    # aot_eager traces forward and backward through dynamo and AOTAutograd without needing a C++ compiler
    options = {"backend": "aot_eager"}
    runs = []
    for compile in (False, options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _model(dtype=torch.float32)
        guide = guides.make("lowrank", model, init_scale=0.3)
        losses = fit(model, guide, _data(), num_steps=3, progress=False, seed=0, compile=compile).losses
        runs.append((losses, predict(model, guide, _data(), num_samples=3, compile=compile).probs))
    # float32 reassociation in the traced graph only
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(runs[1][0]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=0)
    model = _model()
    with pyro.settings.context(module_local_params=True):
        normal = autoguide.AutoNormal(model)
    with pytest.raises(ConfigError, match="compile needs the lean step"):
        fit(model, normal, _data(), num_steps=1, progress=False, compile=options)


def test_samples_per_pass_follows_the_token_budget():
    assert samples_per_pass_for(15, 8 * 128, 65_536) == 15  # batch 8 x 128: all 15 draws in one pass
    assert samples_per_pass_for(15, 64 * 128, 65_536) == 8  # 8 fit, so two passes of 8 and 7
    assert samples_per_pass_for(15, 10**6, 65_536) == 1  # a batch over the budget alone: one draw at a time
    assert samples_per_pass_for(6, 35, 70) == 2


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_budgeted_batched_prediction_equals_the_sequential_loop(name):
    model = _model(name)
    guide = guides.make("lowrank", model, init_scale=0.3)
    data = _data()
    fit(model, guide, data, num_steps=2, progress=False, seed=0)
    rows = []
    hook = model.backbone.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    budgeted = predict(model, guide, data, num_samples=6, seed=3, max_tokens_per_pass=2 * 5 * 7)
    hook.remove()
    assert rows == [10] * 9  # 3 batches x 3 passes of 2 draws x 5 rows: the budget of 70 tokens is honoured
    sequential = predict(model, guide, data, num_samples=6, seed=3, samples_per_pass=1)
    default = predict(model, guide, data, num_samples=6, seed=3)  # all 6 folded into one pass
    torch.testing.assert_close(budgeted.probs, sequential.probs, atol=1e-6, rtol=0)  # float32 output rounding
    torch.testing.assert_close(default.probs, sequential.probs, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="max_tokens_per_pass"):
        predict(model, guide, data, max_tokens_per_pass=0)


def test_compute_factors_follow_changes_of_the_buffers():
    model = _model()
    layer = next(iter(model.adapters.values()))
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    value = torch.randn(2, 2, dtype=torch.float64)
    layer.value = value
    layer(x)  # fills the cache
    with torch.no_grad():
        layer.A.mul_(2.0)  # an in-place change must invalidate it
    expected = layer.base(x) + layer.scaling * x @ layer.A.T @ value.T @ layer.B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)  # float64 reassociation
    layer.float()  # a move replaces the buffers
    torch.testing.assert_close(layer(x.float()), expected.float(), atol=1e-5, rtol=1e-5)  # float32 rounding
    layer.value = None
