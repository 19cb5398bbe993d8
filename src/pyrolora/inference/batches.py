"""Batch plumbing shared by fit and predict: ``(inputs, targets)`` pairs moved to a device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["split_batch", "to_device"]


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
    """``(inputs, targets)`` from a batch; a batch that is not a pair is all inputs, with no targets."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None
