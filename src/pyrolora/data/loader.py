"""Batching a task's split (or a Hugging Face ``datasets.Dataset``) for a tokenizer-driven backbone."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch

from pyrolora.data.base import ClassificationSplit
from pyrolora.data.glue import dataset_to_split
from pyrolora.errors import DataError, TruncationWarning

__all__ = ["TokenizedLoader"]


class TokenizedLoader:
    """Batches ``(inputs, targets)`` of a split, tokenized once up front and padded per batch.

    Re-iterable: every pass yields all examples; with ``shuffle`` each pass uses a new permutation from a
    generator seeded with ``seed``, so two loaders with the same seed yield the same batches.

    Args:
        split: the examples; or a ``datasets.Dataset`` of texts and labels (one call from a Hugging Face
            dataset to batches: its ``text`` or ``sentence`` column and its ``label`` column are read by
            :func:`pyrolora.data.glue.dataset_to_split`; convert it yourself to name other columns).
        tokenizer: a Hugging Face tokenizer.
        batch_size: examples per batch (the last batch may be smaller).
        max_length: token limit per example; longer inputs are truncated, with one :class:`TruncationWarning`
            per loader that says how many were.
        shuffle: reshuffle every pass.
        seed: seed of the shuffling.
        truncation_hint: what the truncation warning suggests; default: raise ``max_length``.
    """

    def __init__(
        self,
        split: ClassificationSplit | Any,
        tokenizer,
        *,
        batch_size: int,
        max_length: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        truncation_hint: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}.")
        if not isinstance(split, ClassificationSplit) and hasattr(split, "column_names"):
            split = dataset_to_split(split)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise DataError(f"max_length must be a positive number of tokens, got {max_length!r}.")
        hint = truncation_hint or "raise model.max_length (up to the model's limit) to keep them whole"
        encoded = self._encode(tokenizer, split, max_length, hint)
        self._features = {k: [torch.tensor(v) for v in vs] for k, vs in encoded.items()}
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.targets = torch.as_tensor(split.labels, dtype=torch.long)

    @staticmethod
    def _encode(tokenizer, split: ClassificationSplit, max_length: int, hint: str) -> dict:
        """Tokenize once with one token of headroom: a row that uses it was longer than ``max_length``."""
        texts = list(split.texts)
        pairs = list(split.text_pairs) if split.text_pairs is not None else None
        try:
            encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length + 1)
            longer = sum(len(row) > max_length for row in encoded["input_ids"])
            if longer:
                encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"the tokenizer rejected the texts of this split ({err}); every text must be a string."
            ) from err
        if longer:
            warnings.warn(
                f"{longer} of {len(texts)} examples are longer than max_length={max_length} tokens and were "
                f"truncated; {hint}.",
                TruncationWarning,
                stacklevel=3,
            )
        return encoded

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shuffling generator's state: with it, the next pass yields the same batches again."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._generator.set_state(state["generator"])

    def _collate(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {}
        for key, rows in self._features.items():
            pad = self._pad_id if key == "input_ids" else 0
            inputs[key] = torch.nn.utils.rnn.pad_sequence(
                [rows[i] for i in index.tolist()], batch_first=True, padding_value=pad
            )
        return inputs, self.targets[index]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self._collate(order[start : start + self.batch_size])
