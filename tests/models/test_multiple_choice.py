"""Option scoring with a causal LM: both scorings against a direct computation, masking, the Bayesian model."""

import pyro
import pytest
import torch

from pyrolora import LoraXSConfig, inject_adapters
from pyrolora.errors import ConfigError
from pyrolora.models import BayesianLoraModel
from pyrolora.models.multiple_choice import MultipleChoiceLM


def tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().double()


def loglik_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (2, 3, 9), generator=g)
    mask = torch.ones(2, 3, 9, dtype=torch.long)
    mask[0, 1, 7:] = 0  # a shorter row, right-padded
    ids[0, 1, 7:] = 0
    target = torch.zeros(2, 3, 9, dtype=torch.long)
    target[:, :, 5:] = 1
    target[0, 1, 7:] = 0
    choice = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second question has two options
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target, "choice_mask": choice}


def test_loglik_scores_are_mean_option_token_log_probabilities():
    lm = tiny_causal_lm()
    model = MultipleChoiceLM(lm, "loglik")
    batch = loglik_batch()
    with torch.no_grad():
        logits = model(**batch)  # (2, 3)
        for b in range(2):
            for k in range(3):
                if not batch["choice_mask"][b, k]:
                    assert logits[b, k] == -1e9  # a missing option has probability 0
                    continue
                n = int(batch["attention_mask"][b, k].sum())
                ids = batch["input_ids"][b, k, :n]
                logp = torch.log_softmax(lm(ids[None]).logits[0], -1)  # (n, V), the plain LM on the real tokens
                positions = batch["target_mask"][b, k, :n].nonzero().squeeze(1)
                expected = logp[positions - 1, ids[positions]].mean()
                # float64 throughout: only summation order differs
                torch.testing.assert_close(logits[b, k], expected.float(), atol=1e-5, rtol=0)


def test_letters_scores_are_the_letter_logits_after_the_prompt():
    lm = tiny_causal_lm()
    model = MultipleChoiceLM(lm, "letters", letter_ids=[5, 6, 7, 8])
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, choice_mask=torch.ones(2, 4, dtype=torch.long))
        last = lm(ids[1:, :4]).logits[0, -1]  # the shorter row's last real token
    torch.testing.assert_close(logits[1], last[[5, 6, 7, 8]].float(), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="letter"):
        MultipleChoiceLM(lm, "letters")


@pytest.mark.parametrize("scoring", ["loglik", "letters"])
def test_option_scores_take_the_vocabulary_projection_in_float32_under_bf16_autocast(scoring, monkeypatch):
    # bf16 autocast may round the backbone's activations, but not the logits the option scores are read from:
    # bf16 keeps 8 bits of mantissa, so at logit magnitudes of 10-30 it resolves only 0.06-0.125, more than
    # options differ by (with bf16 logits SmolLM2 MAP fits on ARC-Easy ended at chance in 2 of 7 seeds)
    lm = tiny_causal_lm().float()
    with torch.no_grad():
        lm.lm_head.weight.mul_(40)  # logits of an LM's size, where bf16 rounding is coarse
    model = MultipleChoiceLM(lm, scoring, letter_ids=[5, 6, 7, 8])
    if scoring == "loglik":
        batch = loglik_batch()
    else:
        ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(2))
        batch = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
        batch["choice_mask"] = torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        hidden = model._hidden(*[batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "attention_mask")])
        monkeypatch.setattr(model, "_hidden", lambda *_: hidden)  # the same hidden states with and without autocast
        reference = model(**batch)  # float32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**batch)
    # float32 against float32, only the summation order may differ; a bf16 projection is off by ~1e-2
    torch.testing.assert_close(mixed, reference, atol=1e-4, rtol=0)


def test_bayesian_model_over_options_has_only_latents_and_the_temperature_head():
    backbone = MultipleChoiceLM(tiny_causal_lm().float(), "loglik")
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules="all-linear"))
    assert not any("lm_head" in name for name in adapters)  # the vocabulary projection is never adapted
    model = BayesianLoraModel(backbone, adapters, dataset_size=10)
    assert model.head_names == ("score",)
    assert [n for n, p in backbone.named_parameters() if p.requires_grad] == ["score.log_temperature"]
    batch = loglik_batch()
    trace = pyro.poutine.trace(model).get_trace(batch, torch.tensor([0, 1]))
    assert trace.nodes["obs"]["fn"].probs.shape == (2, 3)
    assert trace.nodes["obs"]["fn"].probs[1, 2] == 0  # the missing option
    values = {n: torch.randn(3, *s) * 0.1 for n, s in adapters.shapes.items()}
    with torch.no_grad():  # the batched-sample forward (options folded into rows) equals the sequential one
        batched = model.sample_outputs(batch, values)  # (3, 2, 3)
        for s in range(3):
            single = model.outputs(batch, {n: v[s] for n, v in values.items()})
            torch.testing.assert_close(batched[s], single, atol=1e-4, rtol=1e-4)  # float32 reassociation
