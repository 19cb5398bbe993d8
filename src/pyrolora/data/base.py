"""Task data in memory, and batching it for a tokenizer-driven backbone."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrolora.errors import DataError, TruncationWarning

__all__ = ["ClassificationSplit", "TokenizedLoader", "read_text", "split_indices"]


@dataclass(frozen=True)
class ClassificationSplit:
    """One split of a text classification task.

    Attributes:
        texts: the input texts, length N.
        labels: class indices, shape (N,).
        label_names: name of each class, length C.
        text_pairs: optional second texts (sentence-pair tasks), length N.
        human_probs: optional human label distribution per example, shape (N, C) (rows sum to 1).
        ids: optional identifier per example, length N.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None
    human_probs: np.ndarray | None = None
    ids: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if n == 0:
            raise DataError("a data split has no examples.")
        for name, seq in (("text", self.texts), ("second text", self.text_pairs or ())):
            bad = next((i for i, t in enumerate(seq) if not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(f"example {bad}: the {name} must be a string, got {seq[bad]!r}.")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype.kind not in "iu":
            raise DataError(
                f"labels must be a NumPy array of integer class indices, got {type(self.labels).__name__} of "
                f"{getattr(self.labels, 'dtype', '?')}; map label names to indices first."
            )
        if self.labels.shape != (n,):
            raise DataError(f"{n} texts but labels of shape {self.labels.shape}.")
        c = len(self.label_names)
        if c < 2:
            raise DataError(f"a classification task needs at least two classes, got {list(self.label_names)}.")
        if self.labels.min() < 0 or self.labels.max() >= c:
            raise DataError(f"labels must lie in [0, {c}), got values in [{self.labels.min()}, {self.labels.max()}].")
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise DataError(f"{n} texts but {len(self.text_pairs)} second texts.")
        if self.human_probs is not None and self.human_probs.shape != (n, c):
            raise DataError(f"human_probs must have shape ({n}, {c}), got {self.human_probs.shape}.")
        if self.human_probs is not None and not (np.isfinite(self.human_probs).all() and (self.human_probs >= 0).all()):
            raise DataError("human_probs must be finite and non-negative (a distribution over the classes per row).")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, index: Sequence[int] | np.ndarray) -> ClassificationSplit:
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)

        def pick(seq: tuple | None) -> tuple | None:
            return None if seq is None else tuple(seq[i] for i in index)

        return ClassificationSplit(
            texts=pick(self.texts),
            labels=self.labels[index],
            label_names=self.label_names,
            text_pairs=pick(self.text_pairs),
            human_probs=None if self.human_probs is None else self.human_probs[index],
            ids=pick(self.ids),
        )


def read_text(path: Path) -> str:
    """The whole text of a data file, line ends untouched ("\r" stays visible), a byte-order mark dropped.

    Raises:
        DataError: when the file is missing (naming where data are looked for and the hub alternative) or is
            not UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist; point the task's data folder (task.data_dir or $PYROLORA_DATA) at the "
            "folder that holds it, or load the task from the hub (task.source = 'hub')."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from err


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions (the last takes the rest)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f <= 0 for f in fractions):
        raise DataError(f"split fractions must be positive and sum to 1, got {list(fractions)}.")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([round(f * n) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(order, bounds)]


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
            from pyrolora.data.glue import dataset_to_split  # glue imports this module

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
