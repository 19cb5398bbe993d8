"""Backward-compatible path of :mod:`pyrolora.models.backbones` (the notebooks and README examples import it)."""

from pyrolora.models.backbones import (
    DEFAULT_MODEL,
    check_tokenizer,
    input_length_limit,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model,
    weights_fingerprint,
)

__all__ = [
    "DEFAULT_MODEL",
    "check_tokenizer",
    "input_length_limit",
    "load_sequence_classifier",
    "load_tokenizer",
    "resolve_model",
    "weights_fingerprint",
]
