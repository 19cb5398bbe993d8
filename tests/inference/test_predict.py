import pytest
import torch

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict
from pyrolora.errors import ConfigError
from pyrolora.inference import draw_latents
from tests.conftest import TINY_MODELS, token_batch


def _fitted(name="bert", guide_name="lowrank", init_scale=0.3):
    factory, targets, _ = TINY_MODELS[name]
    backbone = factory().double()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=15).double()
    data = [(token_batch(seed=i), torch.randint(0, 3, (5,))) for i in range(3)]
    guide = (
        guides.make(guide_name, model, init_scale=init_scale) if guide_name != "delta" else guides.make("delta", model)
    )
    fit(model, guide, data, num_steps=3, progress=False, seed=0)
    return model, guide, data


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_batched_prediction_equals_the_sequential_loop(name):
    model, guide, data = _fitted(name)
    batched = predict(model, guide, data, num_samples=6, seed=3)
    chunked = predict(model, guide, data, num_samples=6, seed=3, samples_per_pass=4)
    sequential = predict(model, guide, data, num_samples=6, seed=3, samples_per_pass=1)
    assert batched.probs.shape == (6, 15, 3) and batched.mean.shape == (15, 3)
    torch.testing.assert_close(batched.probs, sequential.probs, atol=1e-6, rtol=0)  # float32 output rounding
    torch.testing.assert_close(chunked.probs, sequential.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.mean, batched.probs.mean(0))


def test_prediction_equals_a_hand_computed_average():
    model, guide, data = _fitted()
    torch.manual_seed(11)
    draws = draw_latents(guide, model, 4)
    inputs = data[0][0]
    expected = torch.stack(
        [torch.softmax(model.outputs(inputs, {k: v[s] for k, v in draws.items()}), -1) for s in range(4)]
    ).mean(0)
    prediction = predict(model, guide, [data[0]], num_samples=4, seed=11)
    torch.testing.assert_close(prediction.mean, expected.float(), atol=1e-6, rtol=0)


def test_samples_differ_for_a_distribution_and_agree_for_delta():
    model, guide, data = _fitted(init_scale=2.0)
    probs = predict(model, guide, data, num_samples=5).probs
    # the tiny random head squashes logits towards uniform, so differences are small, but float32 noise is ~1e-8
    assert probs.std(0).max() > 1e-6
    model, guide, data = _fitted(guide_name="delta")
    probs = predict(model, guide, data, num_samples=5).probs
    assert torch.equal(probs[0], probs[4])


def test_seed_is_reproducible_and_scoped():
    model, guide, data = _fitted()
    state = torch.get_rng_state()
    a = predict(model, guide, data, num_samples=4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = predict(model, guide, data, num_samples=4, seed=1)
    c = predict(model, guide, data, num_samples=4, seed=2)
    assert torch.equal(a.probs, b.probs) and not torch.equal(a.probs, c.probs)


def test_targets_are_ignored_and_inputs_only_batches_work():
    model, guide, data = _fitted()
    with_targets = predict(model, guide, data, num_samples=2)
    inputs_only = predict(model, guide, [inputs for inputs, _ in data], num_samples=2)
    assert torch.equal(with_targets.probs, inputs_only.probs)


def test_argument_validation():
    model, guide, data = _fitted()
    with pytest.raises(ConfigError, match="num_samples"):
        predict(model, guide, data, num_samples=0)
    with pytest.raises(ConfigError, match="samples_per_pass"):
        predict(model, guide, data, samples_per_pass=0)
    with pytest.raises(ConfigError, match="no batches"):
        predict(model, guide, [], num_samples=2)
