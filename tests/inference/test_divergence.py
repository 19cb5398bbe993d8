"""Divergence is always DivergenceError naming the last good checkpoint: a failed Cholesky, a runaway loss."""

import pytest
import torch

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters
from pyrolora.errors import DivergenceError
from tests.conftest import tiny_bert, token_batch


def _setup(guide: str):
    backbone = tiny_bert()
    model = BayesianLoraModel(backbone, inject_adapters(backbone, LoraXSConfig(rank=2)), dataset_size=50)
    data = [(token_batch(seed=i), torch.tensor([0, 1, 2, 0, 1])) for i in range(4)]
    return model, guides.make(guide, model), data


@pytest.mark.parametrize(
    ("guide", "match"),
    [
        ("lowrank", "covariance could not be factorised at step 2"),  # was a raw torch.linalg.LinAlgError
        ("delta", "the loss ran away at step 2"),  # was a silent exit with a loss of 6.5e10
    ],
)
@pytest.mark.parametrize("lr", [1e4, 1e6])
def test_a_wild_learning_rate_raises_divergence_naming_the_checkpoint(tmp_path, guide, match, lr):
    model, guide_, data = _setup(guide)
    with pytest.raises(DivergenceError, match=match) as caught:
        fit(model, guide_, data, num_steps=20, lr=lr, warmup=0, seed=0, progress=False, checkpoint_dir=tmp_path,
            checkpoint_every=1)  # fmt: skip
    assert "lower lr" in str(caught.value).lower()
    assert f"{tmp_path / 'checkpoint.safetensors'} (step 1), is intact" in str(caught.value)


def test_a_sane_fit_with_kl_warmup_is_not_called_a_runaway():
    """The KL term growing under a warm-up raises the loss, but by far less than the runaway factor."""
    model, guide, data = _setup("lowrank")
    result = fit(model, guide, data, num_steps=30, lr=1e-2, kl_weight=lambda step, n: (step + 1) / n, seed=0,
                 progress=False)  # fmt: skip
    assert result.num_steps == 30 and max(result.losses) > result.losses[0]  # it did grow, and was accepted


def test_predict_refuses_an_unfitted_guide():
    from pyrolora import predict
    from pyrolora.errors import ConfigError

    model, guide, data = _setup("lowrank")
    with pytest.raises(ConfigError, match="guide has not been fitted"):
        predict(model, guide, data, num_samples=2)
