"""Export, merge and import at the level of a model and its guide, on tiny transformers (any guide)."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

import pyrolora as pl
from pyrolora.errors import ConfigError
from pyrolora.inference.guides import setup
from pyrolora.inference.interop import (
    MANIFEST_NAME,
    export_peft,
    import_peft,
    initialize_guide,
    merge_to_pretrained,
    point_latents,
)
from tests.conftest import TINY_MODELS, token_batch

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# float32: peft's lora_B(lora_A(x)) vs pyrolora's B((s R)(A x)), or one merged matmul vs three small ones,
# differ by float32 reassociation only (the peft path measured <= 1.2e-7 on these models).
ATOL = 1e-5


def _fitted(name="bert", guide="lowrank", **options):
    """A model and a guide with a non-trivial location (as after training) and a changed head."""
    factory, targets, _ = TINY_MODELS[name]
    base = factory()
    backbone = copy.deepcopy(base)
    adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=2, target_modules=targets))
    model = pl.BayesianLoraModel(backbone, adapters, dataset_size=20)
    g = pl.guides.make(guide, model, **options)
    setup(g, model)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for p in model.head_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return base, model, g


def test_mean_and_median_of_gaussian_and_point_mass_guides():
    _, model, lowrank = _fitted(guide="lowrank")
    median = point_latents(model, lowrank, "median")
    mean = point_latents(model, lowrank, "mean")
    assert set(median) == set(model.adapters)
    for name, value in median.items():
        assert value.shape == (2, 2)
        assert torch.equal(mean[name], value)  # a Gaussian's mean is its median
    _, model, delta = _fitted(guide="delta")
    mean, median = point_latents(model, delta, "mean"), delta.median()
    assert all(torch.equal(mean[name], median[name]) for name in model.adapters)  # a point mass: both are the point


class _Skewed(torch.nn.Module):
    """A guide outside Pyro: exponential draws, median log(2), mean 1 (exercises the Monte Carlo mean)."""

    def __init__(self, model):
        super().__init__()
        self.shapes = model.adapters.shapes

    def sample_latents(self, num_samples):
        return {n: torch.empty(num_samples, *s).exponential_() for n, s in self.shapes.items()}

    def median(self):
        return {n: torch.full(s, 0.6931) for n, s in self.shapes.items()}


def test_mean_of_other_guides_is_a_monte_carlo_average():
    _, model, _ = _fitted()
    mean = point_latents(model, _Skewed(model), "mean", num_samples=20_000)
    for value in mean.values():
        # the standard error of a mean of 20,000 Exp(1) draws is 0.007; 0.04 is more than five of them
        assert (value - 1.0).abs().max() < 0.04
    with pytest.raises(ConfigError, match="which"):
        point_latents(model, _Skewed(model), "sample")  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["median", "mean"])
def test_exported_point_reloads_in_peft(tmp_path, which):
    base, model, guide = _fitted("gpt2")
    values = point_latents(model, guide, which)
    batch = token_batch()
    with torch.no_grad():
        expected = model.outputs(batch, values)
    folders = export_peft(model, guide, tmp_path / "point", which=which)
    assert folders == [tmp_path / "point"]
    manifest = json.loads((tmp_path / "point" / MANIFEST_NAME).read_text())
    assert manifest["which"] == which and manifest["modules_to_save"] == ["score"]
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base), folders[0])(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_exported_draws_average_to_the_bayesian_model_average(tmp_path):
    base, model, guide = _fitted("llama")  # the tiny Llama responds most to its adapters (see the last check)
    batch = token_batch()
    prediction = pl.predict(model, guide, [(batch, None)], num_samples=3, seed=7)
    folders = export_peft(model, guide, tmp_path / "draws", which="sample", num_samples=3, seed=7)
    assert [f.name for f in folders] == ["draw_00", "draw_01", "draw_02"]
    manifest = json.loads((tmp_path / "draws" / MANIFEST_NAME).read_text())
    assert manifest["adapters"] == ["draw_00", "draw_01", "draw_02"] and manifest["seed"] == 7
    # one base model, three named adapters, switched in turn: how a multi-adapter server holds the ensemble
    server = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="draw_00")
    for folder in folders[1:]:
        server.load_adapter(folder, adapter_name=folder.name)
    probs = []
    with torch.no_grad():
        for folder in folders:
            server.set_adapter(folder.name)
            probs.append(server(**batch).logits.softmax(-1))
    probs = torch.stack(probs)  # (S, B, C)
    torch.testing.assert_close(probs, prediction.probs, atol=ATOL, rtol=0)  # the same three draws
    torch.testing.assert_close(probs.mean(0), prediction.mean, atol=ATOL, rtol=0)
    assert (probs[0] - probs[1]).abs().max() > 10 * ATOL  # the draws differ: an ensemble, not three copies


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_merged_model_reloads_with_equal_outputs(tmp_path, name):
    _, model, guide = _fitted(name)
    values = point_latents(model, guide, "median")
    batch = token_batch()
    with torch.no_grad():
        expected = model.outputs(batch, values)
    out = merge_to_pretrained(model, guide, tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="not empty"):
        merge_to_pretrained(model, guide, tmp_path / "merged")


@pytest.mark.parametrize("guide_name", ["lowrank", "diagonal", "full", "delta"])
def test_import_of_an_exported_adapter_restores_location_and_head(tmp_path, guide_name):
    base, model, guide = _fitted("bert")
    values = point_latents(model, guide, "median")
    head = {k: v.clone() for k, v in model.head_state().items()}
    export_peft(model, guide, tmp_path / "a")
    # a fresh model (fresh head) and a fresh guide of any family
    backbone = copy.deepcopy(base)
    adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=2, target_modules=("query", "value")))
    fresh = pl.BayesianLoraModel(backbone, adapters, dataset_size=20)
    new_guide = pl.guides.make(guide_name, fresh)
    report = import_peft(fresh, new_guide, tmp_path / "a")
    assert report.exact() and report.head_loaded and not report.missing
    assert report.max_residual < 1e-5  # float32 factors solved in float64
    restored = point_latents(fresh, new_guide, "median")
    for name, value in values.items():
        torch.testing.assert_close(restored[name], value, atol=1e-5, rtol=1e-5)
    for key, value in fresh.head_state().items():
        assert torch.equal(value, head[key])


def test_import_reports_missing_sites_and_initialize_rejects_unknown_guides(tmp_path):
    base, model, guide = _fitted("bert")
    export_peft(model, guide, tmp_path / "a")
    backbone = copy.deepcopy(base)
    adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=2, target_modules=("query", "value", "key")))
    fresh = pl.BayesianLoraModel(backbone, adapters, dataset_size=20)
    report = import_peft(fresh, pl.guides.make("lowrank", fresh), tmp_path / "a")
    assert sorted(report.missing) == [f"bert.encoder.layer.{i}.attention.self.key" for i in (0, 1)]
    assert all(report.values[n].abs().max() == 0 for n in report.missing)
    with pytest.raises(ConfigError, match="_Skewed"):
        initialize_guide(_Skewed(fresh), fresh, report.values)


def test_cli_rejects_a_bad_point_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from pyrolora.cli import app

    for command in ("export", "merge"):
        result = CliRunner().invoke(app, [command, str(tmp_path), "--out", str(tmp_path / "x"), "--which", "mode"])
        assert result.exit_code == 2 and "which must be" in result.output
        assert not (tmp_path / "x").exists()
