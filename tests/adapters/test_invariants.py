"""Invariants every adapted architecture must satisfy (one table of cases, many properties)."""

import copy

import pytest
import torch

from pyrolora import LoraXSConfig, inject_adapters
from tests.conftest import TINY_MODELS, token_batch

CASES = list(TINY_MODELS)


def _adapted(name, dtype=torch.float64, rank=2):
    factory, targets, _ = TINY_MODELS[name]
    base = factory().to(dtype)
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, LoraXSConfig(rank=rank, target_modules=targets))
    return base, model, adapters


def _random_values(adapters, scale=0.3, samples=None, dtype=torch.float64):
    shape = (samples,) if samples else ()
    return {n: scale * torch.randn(*shape, *s, dtype=dtype) for n, s in adapters.shapes.items()}


@pytest.mark.parametrize("name", CASES)
def test_zero_core_is_exactly_the_base_model(name):
    base, model, adapters = _adapted(name)
    batch = token_batch()
    expected = base(**batch).logits
    assert torch.equal(model(**batch).logits, expected)  # no value set: the update is skipped
    with adapters.use(adapters.zeros(torch.float64)):
        assert torch.equal(model(**batch).logits, expected)  # R = 0: the update adds exact zeros


@pytest.mark.parametrize("name", CASES)
def test_nonzero_core_changes_the_output(name):
    base, model, adapters = _adapted(name)
    batch = token_batch()
    with adapters.use(_random_values(adapters)):
        changed = model(**batch).logits
    assert not torch.allclose(changed, base(**batch).logits)


@pytest.mark.parametrize("name", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(name):
    _, model, adapters = _adapted(name)
    batch = token_batch()
    values = _random_values(adapters)
    weights = {n: layer.base.weight.clone() for n, layer in adapters.items()}
    with adapters.use(values):
        unmerged = model(**batch).logits
    adapters.merge(values)
    assert all(layer.merged for layer in adapters.values())
    with adapters.use(values):  # the merged layer ignores the value: no double counting
        merged = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-10, rtol=1e-10)  # float64 reassociation only
    adapters.unmerge()
    for n, layer in adapters.items():
        torch.testing.assert_close(layer.base.weight, weights[n], atol=1e-12, rtol=0)  # add-then-subtract rounding


@pytest.mark.parametrize("name", CASES)
def test_batched_samples_equal_the_sequential_loop(name):
    _, model, adapters = _adapted(name)
    batch = token_batch()
    samples = 4
    values = _random_values(adapters, samples=samples)
    sequential = []
    for s in range(samples):
        with adapters.use({n: v[s] for n, v in values.items()}):
            sequential.append(model(**batch).logits)
    tiled = {k: v.repeat(samples, 1) for k, v in batch.items()}
    with adapters.use(values):
        batched = model(**tiled).logits.reshape(samples, 5, -1)
    torch.testing.assert_close(batched, torch.stack(sequential), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_frozen_factors_are_buffers_and_nothing_is_trainable_in_adapters(name):
    _, _, adapters = _adapted(name)
    for layer in adapters.values():
        assert {n for n, _ in layer.named_buffers(recurse=False)} == {"A", "B"}
        assert not list(layer.parameters(recurse=False))
        assert not any(p.requires_grad for p in layer.base.parameters())


def test_use_restores_previous_values_on_error():
    _, _, adapters = _adapted("bert")
    values = _random_values(adapters)
    with pytest.raises(RuntimeError), adapters.use(values):
        raise RuntimeError("boom")
    assert all(layer.value is None for layer in adapters.values())
    with pytest.raises(KeyError, match="missing"):
        adapters.set_values({})
