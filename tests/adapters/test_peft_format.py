"""LoRA-XS as standard peft LoRA adapters: peft reproduces pyrolora's outputs; projection of adapters back in.

Every architecture of the tiny-model table runs through peft itself (``PeftModel.from_pretrained``), including
GPT-2, whose ``Conv1D`` layers store (in, out) weights and need peft's ``fan_in_fan_out``.
"""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TinyLoraConfig, get_peft_model

from pyrolora import LoraXSConfig, inject_adapters
from pyrolora.adapters.peft_format import (
    adapter_deltas,
    merged_copy,
    peft_lora_tensors,
    project_update,
    save_peft_adapter,
    unwrapped_copy,
)
from pyrolora.errors import RunFolderError
from tests.conftest import TINY_MODELS, tiny_bert, token_batch

# peft 0.21 reads a transformers-5 attribute that is deprecated; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CASES = list(TINY_MODELS)
HEADS = {"bert": "classifier", "roberta": "classifier", "llama": "score", "gpt2": "score"}

# float32 throughout: peft's forward computes lora_B(lora_A(x)) and pyrolora B((s R)(A x)); the two
# associations of the same float32 products differ by a few ulp per layer (measured <= 1.2e-7 on these models).
ATOL = 1e-5


def _adapted(name, rank=2):
    factory, targets, _ = TINY_MODELS[name]
    base = factory()
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, LoraXSConfig(rank=rank, target_modules=targets))
    return base, model, adapters


def _values(adapters, scale=0.3):
    return {n: scale * torch.randn(s) for n, s in adapters.shapes.items()}


def _head_state(model, name):
    head = HEADS[name]
    with torch.no_grad():  # a trained head differs from the fresh one in the base model
        for p in model.get_submodule(head).parameters():
            p.add_(0.2 * torch.randn_like(p))
    return {f"{head}.{k}": v for k, v in model.get_submodule(head).state_dict().items()}


@pytest.mark.parametrize("name", CASES)
def test_peft_reproduces_pyrolora_logits(name, tmp_path):
    base, model, adapters = _adapted(name)
    values = _values(adapters)
    head = _head_state(model, name)
    batch = token_batch()
    with torch.no_grad(), adapters.use(values):
        expected = model(**batch).logits
    save_peft_adapter(tmp_path / "adapter", adapters, values, head_state=head)
    with torch.no_grad():
        assert (expected - base(**batch).logits).abs().max() > 1e-2  # the adapter and head matter
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        got = peft_model(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    assert config["fan_in_fan_out"] is (name == "gpt2")  # GPT-2's Conv1D
    assert config["modules_to_save"] == [HEADS[name]]
    assert sorted(config["target_modules"]) == sorted(adapters)


def test_exported_factors_are_a_and_scaled_b_r():
    _, _, adapters = _adapted("bert")
    values = _values(adapters)
    tensors = peft_lora_tensors(adapters, values)
    for name, layer in adapters.items():
        lora_a = tensors[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
        lora_b = tensors[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
        assert torch.equal(lora_a, layer.A)
        # the dense updates agree to float32 rounding of two products of the same factors
        torch.testing.assert_close(lora_b @ lora_a, layer.delta_weight(values[name]), atol=1e-6, rtol=1e-5)


def test_a_wrong_scaling_would_be_caught(tmp_path):
    """The equality test above can fail: an adapter without the alpha / r factor gives other logits."""
    base, model, adapters = _adapted("bert")
    values = _values(adapters)
    head = _head_state(model, "bert")
    unscaled = {k: v / adapters.config.scaling for k, v in values.items()}
    save_peft_adapter(tmp_path / "a", adapters, unscaled, head_state=head)
    batch = token_batch()
    with torch.no_grad(), adapters.use(values):
        expected = model(**batch).logits
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")(**batch).logits
    assert (got - expected).abs().max() > 10 * ATOL  # measured 7e-4: 70 times the tolerance


@pytest.mark.parametrize("name", CASES)
def test_merged_copy_equals_the_adapted_model_and_has_no_adapters(name):
    _, model, adapters = _adapted(name)
    values = _values(adapters)
    batch = token_batch()
    merged = merged_copy(model, adapters, values)
    with torch.no_grad(), adapters.use(values):
        expected = model(**batch).logits
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)  # one dense product vs three small ones
    assert not any(type(m).__name__ == "LoraXSLinear" for m in merged.modules())
    assert all(layer.value is None and not layer.merged for layer in adapters.values())  # original untouched


def test_unwrapped_copy_is_the_base_model():
    base, model, _ = _adapted("gpt2")
    plain = unwrapped_copy(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, base(**batch).logits)


def test_projection_recovers_a_lora_xs_update_exactly():
    _, _, adapters = _adapted("bert", rank=3)
    layer = next(iter(adapters.values()))
    value = torch.randn(3, 3)
    core, residual = project_update(layer, layer.delta_weight(value))
    torch.testing.assert_close(core, value, atol=1e-5, rtol=1e-5)  # float32 SVD factors, solved in float64
    assert residual < 1e-6


def test_projection_of_a_dense_update_is_the_two_sided_subspace_projection():
    _, _, adapters = _adapted("bert", rank=3)
    layer = next(iter(adapters.values()))
    delta = torch.randn(layer.out_features, layer.in_features, dtype=torch.float64)
    core, residual = project_update(layer, delta)
    u = layer.B.double()  # (out, r) orthonormal
    q, _ = torch.linalg.qr(layer.A.double().T)  # (in, r): an orthonormal basis of span(V_r)
    expected = u @ u.T @ delta @ q @ q.T  # P_U ΔW P_V, computed independently of project_update
    got = layer.scaling * (u @ core.double() @ layer.A.double())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # R stored in float32
    want = torch.linalg.matrix_norm(delta - expected) / torch.linalg.matrix_norm(delta)
    assert abs(residual - want.item()) < 1e-5 and 0.5 < residual < 1.0  # a random update lives mostly outside


def test_projection_of_an_orthogonal_update_is_zero():
    _, _, adapters = _adapted("bert", rank=2)
    layer = next(iter(adapters.values()))
    u = layer.B.double()
    outside = torch.randn(layer.out_features, layer.in_features, dtype=torch.float64)
    outside = outside - u @ (u.T @ outside)  # column space orthogonal to U_r
    core, residual = project_update(layer, outside)
    assert core.abs().max() < 1e-5 and abs(residual - 1.0) < 1e-6


def _tinylora_folder(tmp_path, rank, seed=0):
    torch.manual_seed(seed)
    base = tiny_bert()
    config = TinyLoraConfig(
        r=rank, u=4, target_modules=["query", "value"], init_weights="uniform", init_v_bound=0.5,
        modules_to_save=["classifier"],
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "tiny")
    return base, peft_model.eval()


@pytest.mark.parametrize(("tiny_rank", "rank", "exact"), [(2, 2, True), (2, 3, True), (3, 2, False)])
def test_tinylora_adapters_project_exactly_when_their_subspace_is_inside(tmp_path, tiny_rank, rank, exact):
    base, peft_model = _tinylora_folder(tmp_path, tiny_rank)
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, LoraXSConfig(rank=rank, target_modules=("query", "value")))
    deltas, head = adapter_deltas(model, tmp_path / "tiny")
    assert set(deltas) == set(adapters) and set(head) == {"classifier.weight", "classifier.bias"}
    results = {n: project_update(layer, deltas[n]) for n, layer in adapters.items()}
    worst = max(res for _, res in results.values())
    batch = token_batch()
    with torch.no_grad():
        for key, value in head.items():
            model.get_submodule("classifier").get_parameter(key.split(".")[1]).copy_(value)
        with adapters.use({n: core for n, (core, _) in results.items()}):
            ours = model(**batch).logits
        theirs = peft_model(**batch).logits
    if exact:
        # TinyLoRA's update U S^½ R_t S^½ Vᵀ lies in the top-r_t ⊆ top-r singular subspaces: only float32
        # rounding of two SVDs of the same weight remains.
        assert worst < 1e-5
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    else:
        # a rank-3 TinyLoRA update has a component along the third singular pair, which rank 2 cannot hold;
        # (the tiny random BERT barely propagates it to the logits, so the residual is the measure here)
        assert worst > 1e-2


def test_a_general_lora_adapter_projects_with_a_large_residual_and_dropped_modules(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "lora")
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=("query", "value")))
    deltas, head = adapter_deltas(model, tmp_path / "lora")
    assert not head
    assert {n for n in deltas if n.endswith("key")} and not {n for n in deltas if n.endswith("value")}
    residuals = [project_update(adapters[n], d)[1] for n, d in deltas.items() if n in adapters]
    assert len(residuals) == 2 and min(residuals) > 0.3  # random LoRA factors are far from the top-2 subspaces


def test_a_folder_that_is_not_an_adapter_is_a_clear_error(tmp_path):
    _, model, _ = _adapted("bert")
    with pytest.raises(RunFolderError, match=r"adapter_config\.json is missing"):
        adapter_deltas(model, tmp_path)
