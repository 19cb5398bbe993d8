"""MC dropout without touching predict, and peft LoRA injected into the same backbones."""

import pytest
import torch

from pyrolora import LoraXSConfig, guides, inject_adapters, predict
from pyrolora.errors import ConfigError
from pyrolora.models import BayesianLoraModel
from pyrolora.runs.methods.dropout import mc_dropout
from pyrolora.runs.methods.peft_lora import inject_peft_lora, predict_point
from tests.conftest import tiny_llama, token_batch


def dropout_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def test_mc_dropout_samples_masks_in_eval_mode_and_restores_them():
    backbone = dropout_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=("query", "value")))
    model = BayesianLoraModel(backbone, adapters, dataset_size=10)
    guide = guides.setup(guides.make("delta", model), model)  # deliberately unfitted: the initial point, R = 0
    data = [(token_batch(4), torch.zeros(4, dtype=torch.long))]
    plain = predict(model, guide, data, num_samples=4).probs  # (4, 4, 3): a point mass, so 4 equal samples
    torch.testing.assert_close(plain[0], plain[3])
    with mc_dropout(backbone) as switched:
        assert switched > 0
        sampled = predict(model, guide, data, num_samples=4).probs
    assert not torch.allclose(sampled[0], sampled[1])  # one dropout mask per sample row
    after = predict(model, guide, data, num_samples=4).probs
    torch.testing.assert_close(after, plain)  # dropout is off again outside the block


def test_mc_dropout_refuses_a_model_without_dropout():
    with pytest.raises(ConfigError, match="no dropout layer"):
        with mc_dropout(tiny_llama()):
            pass


def test_peft_lora_trains_only_lora_and_head_and_starts_at_the_base_model():
    backbone = dropout_bert()
    batch = token_batch(3)
    before = predict_point(backbone, [(batch, None)])
    lora, head = inject_peft_lora(backbone, rank=4, alpha=8, targets=["query", "value"])
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.named_parameters() if "lora_" in n or n.startswith("classifier.")}
    assert sum(p.numel() for p in lora) == 2 * 2 * 4 * (16 + 16)  # 2 layers x (query, value) x r (in + out)
    torch.testing.assert_close(predict_point(backbone, [(batch, None)]), before)  # LoRA's B starts at zero
    assert len(head) == 2
