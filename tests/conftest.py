"""Shared fixtures: seeds, a clean Pyro state, tiny transformers built from configs, the real-data folder.

Warnings are errors (pyproject's ``filterwarnings``), so a new deprecation in a dependency fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyro
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny models are all overhead: one thread runs them about 4x faster than two competing OpenMP threads.
# Tests on the real MiniLM raise it again for their duration (see ``real_model_threads``).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_state():
    """A fixed seed per test and an empty global param store before and after (fit must never fill it)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def tiny_bert(num_labels: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_roberta(num_labels: int = 3) -> torch.nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        num_labels=num_labels,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_llama(num_labels: int = 3) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def tiny_gpt2(num_labels: int = 3) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        num_labels=num_labels,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2ForSequenceClassification(config).eval()


#: name -> (factory, target_modules, number of adapted modules): the table every invariant test runs through.
TINY_MODELS: dict[str, tuple[Callable[..., torch.nn.Module], object, int]] = {
    "bert": (tiny_bert, ("query", "value"), 4),
    "roberta": (tiny_roberta, "all-linear", 2 * 6),  # 6 linear layers per layer; the classifier head is excluded
    "llama": (tiny_llama, ("q_proj", "v_proj", "down_proj"), 6),
    "gpt2": (tiny_gpt2, ("c_attn", "c_proj"), 6),  # c_proj is in attention and in the MLP
}


def token_batch(batch: int = 5, length: int = 7, vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def real_model_threads():
    """Use every core for the duration of a module of tests on a real pretrained model."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def data_dir() -> Path:
    """The real GLUE / QA files: $PYROLORA_DATA, else ../shared/data beside the repository; skip if absent."""
    env = os.environ.get("PYROLORA_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(
            f"real datasets not found at {path} (set PYROLORA_DATA); the tests on real GLUE/QA data did not run"
        )
    return path


def write_mcqa_folder(folder: Path, n_train: int = 24, n_dev: int = 6) -> Path:
    """A multiple-choice task folder in the AI2 schema (``train.jsonl``, ``dev.jsonl``): question i has the
    options i .. i + 3 labelled A-D and the answer ``"ABCD"[i % 4]``."""
    import json

    folder.mkdir()
    for name, n in (("train", n_train), ("dev", n_dev)):
        records = [
            {
                "question": {
                    "stem": f"which is {i}?",
                    "choices": [{"text": str(i + k), "label": "ABCD"[k]} for k in range(4)],
                },
                "answerKey": "ABCD"[i % 4],
            }
            for i in range(n)
        ]  # fmt: skip
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def save_tiny_model(folder: Path, seed: int = 0, max_positions: int = 32) -> Path:
    """A 2-layer BERT (hidden 16) with the real all-MiniLM-L6-v2 tokenizer, saved as a loadable model folder.

    It loads through ``pyrolora.models.backbones`` like any hub model, so configs, the CLI and run folders can be
    exercised end to end in seconds.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from pyrolora.models.backbones import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=max_positions,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT model folder with a real tokenizer (see :func:`save_tiny_model`)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
