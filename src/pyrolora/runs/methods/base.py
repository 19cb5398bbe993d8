"""The method protocol and its registry: what ``pyrolora train`` / ``evaluate`` need from every method.

A method turns a :class:`~pyrolora.runs.config.RunConfig` into a trained model and a run folder, and a run
folder back into a trained model. A trained model (:class:`Fitted`) predicts per-sample probabilities of shape
(S, N, C): S posterior draws, dropout masks, ensemble members, or S = 1 for a point estimate. Everything after
that (metrics, uncertainty reports, tables) is the same for every method.

Adding a method is one module with a class that implements :class:`Method` and one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pyrolora.errors import ConfigError
from pyrolora.evaluation import metrics
from pyrolora.runs.config import RunConfig

__all__ = ["METHODS", "Fitted", "Method", "count_numel", "get", "register", "split_metrics"]


@runtime_checkable
class Fitted(Protocol):
    """A trained method: the run that lends loaders and splits, and a probability function over them.

    Attributes:
        config: the run's configuration.
        run: a :class:`~pyrolora.runs.build.Run` (tokenizer, loaders, splits, and for Pyro methods model and
            guide).
        train_seconds: wall-clock seconds of training (0 for a loaded folder without a fit record).
        trainable_params: numbers the optimizer updated (task head included).
        stored_params: numbers the run folder stores to reproduce the predictions on the frozen backbone.
    """

    config: RunConfig
    run: Any
    train_seconds: float
    trainable_params: int
    stored_params: int

    def probs(self, data: Any, *, progress: bool = False) -> torch.Tensor:
        """Per-sample probabilities (S, N, C) of a split (a name of the run's splits, or a split object)."""
        ...

    def save(self, directory: Path, metrics: Mapping[str, Any] | None = None) -> None:
        """Write the run folder into ``directory`` (it exists); ``metrics`` (``{split: {...}}``) go beside the state."""
        ...


class Method(Protocol):
    """One way of obtaining a posterior (or its stand-in). ``name`` is the ``[method] name`` of configs."""

    name: str
    #: whether ``[guide]`` is part of the method (``description`` of a run names the guide)
    uses_guide: bool

    def train(
        self,
        config: RunConfig,
        splits: dict[str, Any],
        *,
        device: torch.device,
        progress: bool = True,
        out: Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ) -> Fitted:
        """Train on ``splits["train"]``; with ``out``, training may write checkpoints and logs there."""
        ...

    def load(
        self, directory: Path, config: RunConfig, *, model_name: str | None = None, device: torch.device | None = None
    ) -> Fitted:
        """Rebuild the trained method from its run folder (written by :meth:`Fitted.save`)."""
        ...


#: ``[method] name`` -> the method. Filled by :func:`register` as the method modules are imported.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under ``method.name``."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``, or a ConfigError that lists the registered ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; the registered methods are {sorted(METHODS)}.") from None


def count_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(t.numel() for t in tensors)


def split_metrics(probs: torch.Tensor, split: Any, n_bins: int = 15) -> dict[str, float]:
    """:func:`pyrolora.evaluation.metrics.summary` of averaged probabilities (N, C) on a split, with the Spearman
    correlation with rater disagreement when the split carries human label distributions."""
    return metrics.summary(probs, np.asarray(split.labels), n_bins=n_bins, human_probs=split.human_probs)
