"""Batch plumbing shared by fit and predict: ``(inputs, targets)`` pairs moved to a device.

Two batch forms are understood: a pair ``(inputs, targets)`` (inputs a dict of keyword arguments for the backbone or
a tensor), and a dict of keyword arguments that holds the targets under ``"labels"``, the Hugging Face convention
(what ``DataCollatorWithPadding`` and the ``Trainer`` use). Anything else is all inputs, with no targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyrolora.errors import DataError

__all__ = ["check_batches", "require_targets", "split_batch", "to_device"]

#: the key under which a dict batch carries its targets (Hugging Face's ``labels``)
LABELS_KEY = "labels"


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and mappings to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, targets)`` from a batch.

    A pair is ``(inputs, targets)``; a mapping with a ``"labels"`` entry gives the other entries as inputs and
    the labels as targets; any other batch is all inputs, with no targets.
    """
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and LABELS_KEY in batch:
        return {k: v for k, v in batch.items() if k != LABELS_KEY}, batch[LABELS_KEY]
    return batch, None


def require_targets(targets: torch.Tensor | None, step: int) -> torch.Tensor:
    """``targets``, or a :class:`DataError` saying which batch forms carry them (training needs them)."""
    if targets is None:
        raise DataError(
            f"the batch of step {step} has no targets, so there is nothing to fit. Pass batches of "
            "(inputs, targets) pairs, or dicts with the targets under 'labels' (e.g. a DataLoader with "
            "transformers' DataCollatorWithPadding over a tokenized dataset whose label column is 'label' or "
            "'labels'), or a pyrolora.data.TokenizedLoader."
        )
    return targets


def check_batches(data: Any) -> None:
    """Refuse a Hugging Face ``datasets.Dataset`` given where batches are expected, saying what to pass instead.

    Iterating a ``Dataset`` yields single rows (dicts of one example), not batches.
    """
    if type(data).__module__.split(".")[0] == "datasets":
        raise DataError(
            f"got a datasets.{type(data).__name__}, which yields single rows, where batches are expected. Pass "
            "pyrolora.data.TokenizedLoader(dataset, tokenizer, batch_size=32) for a dataset of texts with a "
            "'text' (or 'sentence') and a 'label' column, or torch.utils.data.DataLoader(tokenized, batch_size=32, "
            "collate_fn=transformers.DataCollatorWithPadding(tokenizer)) for a tokenized one (its label column "
            "becomes 'labels', which fit reads as the targets)."
        )
