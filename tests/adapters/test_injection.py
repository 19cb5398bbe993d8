import pytest
import torch
from torch import nn

from pyrolora import LoraXSConfig, LoraXSLinear, inject_adapters
from pyrolora.errors import ConfigError, TargetError
from tests.conftest import TINY_MODELS, tiny_bert, tiny_gpt2, tiny_llama, token_batch


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_injects_the_expected_sites(name):
    factory, targets, count = TINY_MODELS[name]
    model = factory()
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=targets))
    assert len(adapters) == count
    for site, layer in adapters.items():
        assert model.get_submodule(site) is layer
        assert layer.site_name == site
        assert layer.shape == (2, 2)
    assert adapters.num_latents == 4 * count


def test_suffix_semantics_match_whole_components():
    model = tiny_bert()
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=["output.dense"]))
    # attention.output.dense and the FFN's output.dense, twice each; never intermediate.dense or pooler.dense
    assert sorted(adapters) == sorted(
        f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")
    )


def test_regex_matches_the_whole_path():
    model = tiny_bert()
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert sorted(adapters) == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.query",
    ]


def test_all_linear_skips_head_and_output_layer():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    adapters = inject_adapters(lm, LoraXSConfig(rank=2, target_modules="all-linear"))
    assert "lm_head" not in adapters and adapters  # Conv1D layers are adapted, the tied output layer is not
    bert = tiny_bert()
    adapters = inject_adapters(bert, LoraXSConfig(rank=2, target_modules="all-linear"))
    assert not any(s.startswith("classifier") for s in adapters)
    assert "bert.pooler.dense" in adapters


def test_layers_to_transform():
    model = tiny_llama()
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=["q_proj"], layers_to_transform=(1,)))
    assert list(adapters) == ["model.layers.1.self_attn.q_proj"]


def test_conv1d_is_adapted_with_the_right_orientation():
    model = tiny_gpt2()
    adapters = inject_adapters(model, LoraXSConfig(rank=3, target_modules=["c_attn"]))
    layer = adapters["transformer.h.0.attn.c_attn"]
    assert (layer.in_features, layer.out_features) == (16, 48)  # Conv1D stores (in, out) = (16, 48)
    assert layer.A.shape == (3, 16) and layer.B.shape == (48, 3)


def test_no_match_lists_the_linear_layers():
    with pytest.raises(TargetError, match=r"no module matches.*query"):
        inject_adapters(tiny_bert(), LoraXSConfig(rank=2, target_modules=["not_there"]))


def test_rank_too_large_names_the_module_and_leaves_the_backbone_untouched():
    model = tiny_bert()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetError, match=r"rank 17 exceeds min\(out=16, in=16\)"):
        inject_adapters(model, LoraXSConfig(rank=17, target_modules=["query"]))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unsupported_layer_type():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TargetError, match="LayerNorm"):
        inject_adapters(net, LoraXSConfig(rank=2, target_modules=["1"]))


def test_double_injection_is_refused():
    model = tiny_bert()
    inject_adapters(model, LoraXSConfig(rank=2, target_modules=["query"]))
    with pytest.raises(TargetError, match="already carries"):
        inject_adapters(model, LoraXSConfig(rank=2, target_modules=["query"]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"rank": 2, "alpha": -1.0},
        {"rank": 2, "alpha": float("nan")},
        {"rank": 2, "target_modules": []},
        {"rank": 2, "target_modules": ""},
        {"rank": 2, "layers_to_transform": (-1,)},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        LoraXSConfig(**kwargs)


def test_config_round_trip_records_the_convention():
    config = LoraXSConfig(rank=4, alpha=8, target_modules=["q", "v"], layers_to_transform=[0, 2])
    data = config.to_dict()
    assert data["svd_convention"] == "A=diag(s_r)V_r^T,B=U_r"
    assert LoraXSConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="convention"):
        LoraXSConfig.from_dict({**data, "svd_convention": "A=V^T,B=U diag(s)"})


def test_injected_model_still_runs():
    model = tiny_bert()
    inject_adapters(model, LoraXSConfig(rank=2, target_modules="all-linear"))
    out = model(**token_batch()).logits
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    assert all(isinstance(m, LoraXSLinear) for n, m in model.named_modules() if n.endswith("query"))
