"""Adapter dropout: ``y = W0 x + b + (alpha / r) · B R A dropout(x)``; MC dropout for backbones without dropout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyrolora import LoraXSConfig, fit, guides, inject_adapters, predict
from pyrolora.adapters.layer import LoraXSLinear
from pyrolora.errors import ConfigError
from pyrolora.models import BayesianLoraModel
from pyrolora.runs.config import RunConfig
from pyrolora.runs.methods.dropout import mc_dropout
from tests.conftest import tiny_llama, token_batch

TARGETS = ("q_proj", "v_proj", "down_proj")


def _llama_model(dropout: float) -> tuple[BayesianLoraModel, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = tiny_llama()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=TARGETS, dropout=dropout))
    return BayesianLoraModel(backbone, adapters, dataset_size=10), backbone


def test_the_update_branch_reads_dropped_inputs_and_the_base_path_does_not():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoraXSLinear(base, rank=3, alpha=6.0, site_name="lin", dropout=0.5).train()
    r = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    layer.value = r
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask: nn.Dropout draws the same numbers
    expected = base(x) + (6.0 / 3) * dropped @ layer.A.T @ r.T @ layer.B.T  # (alpha / r) B R A dropout(x)
    torch.testing.assert_close(out, expected)  # float64, one order of operations apart: default tolerance
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ layer.A.T @ r.T @ layer.B.T)  # eval: no dropout


def test_zero_dropout_adds_no_module_and_leaves_every_output_as_before():
    plain, _ = _llama_model(0.0)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert all(layer.dropout is None for layer in plain.adapters.values())
    values = {n: 0.3 * torch.randn(s) for n, s in plain.adapters.shapes.items()}
    batch = token_batch(3)
    plain.train()
    with plain.adapters.use(values):
        train_out = plain.outputs(batch, values)
    plain.eval()
    torch.testing.assert_close(train_out, plain.outputs(batch, values), rtol=0, atol=0)  # deterministic: no masks
    dropped, _ = _llama_model(0.2)  # same seed, same weights: in eval mode equal to p = 0
    dropped.eval()
    torch.testing.assert_close(dropped.outputs(batch, values), plain.outputs(batch, values), rtol=0, atol=0)


def test_mc_dropout_counts_adapter_dropout_and_samples_one_mask_per_sample_row():
    model, backbone = _llama_model(0.3)
    guide = guides.setup(guides.make("delta", model), model)  # deliberately unfitted: the initial point
    data = [(token_batch(4), torch.zeros(4, dtype=torch.long))]
    plain = predict(model, guide, data, num_samples=4).probs
    torch.testing.assert_close(plain[0], plain[3])  # eval mode: dropout off, 4 copies of the MAP
    with torch.no_grad():  # a non-zero R, so that the update branch (and its dropout) matters
        for p in guide.parameters():
            p.add_(0.5 * torch.randn_like(p))
    with mc_dropout(backbone) as switched:
        assert switched == 6  # Llama has no dropout of its own: exactly one per adapted module
        sampled = predict(model, guide, data, num_samples=4).probs
    assert not torch.allclose(sampled[0], sampled[1])  # a different mask for each sample row
    after = predict(model, guide, data, num_samples=4).probs
    torch.testing.assert_close(after[0], after[2])  # off again outside the block


def test_mc_dropout_still_refuses_llama_without_adapter_dropout():
    _, backbone = _llama_model(0.0)
    with pytest.raises(ConfigError, match=r"no dropout layer.*\[adapters\] dropout"):
        with mc_dropout(backbone):
            pass


def test_fit_trains_with_adapter_dropout_active_and_predicts_without_it():
    model, _ = _llama_model(0.5)
    seen: list[bool] = []
    hooks = [
        layer.dropout.register_forward_hook(lambda m, i, o: seen.append(m.training))
        for layer in model.adapters.values()
    ]
    guide = guides.make("delta", model)
    data = [(token_batch(4, seed=s), torch.tensor([0, 1, 2, 0])) for s in range(2)]
    fit(model, guide, data, num_steps=2, lr=1e-2, progress=False)
    assert seen and all(seen)  # every adapter forward of MAP training drew a mask (train mode)
    seen.clear()
    predict(model, guide, data, num_samples=2)
    assert seen and not any(seen)  # prediction runs in eval mode: no mask unless under mc_dropout
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.1"])
def test_dropout_must_be_a_probability_below_one(bad):
    with pytest.raises(ConfigError, match="dropout"):
        LoraXSConfig(rank=2, dropout=bad)


def test_dropout_is_a_config_key_and_old_configs_read_as_zero():
    config = RunConfig.from_dict({"adapters": {"rank": 2, "dropout": 0.1}})
    assert config.adapters.dropout == 0.1
    assert RunConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    del old["adapters"]["dropout"]  # a run folder saved before adapter dropout existed
    assert RunConfig.from_dict(old).adapters.dropout == 0.0
