"""MC dropout: a module's ``nn.Dropout`` layers keep sampling while the rest of the model is in eval mode.

Combined with :func:`pyrolora.predict` on a ``delta`` (MAP) guide, whose S "posterior samples" are S copies of
the MAP, every sample row gets its own dropout mask, so the S rows are S MC-dropout passes and the average is
the MC-dropout predictive. ``predict`` itself is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pyrolora.errors import ConfigError

__all__ = ["dropout_layers", "mc_dropout"]


def _sampling_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x, module.p, training=True, inplace=module.inplace)


def dropout_layers(module: nn.Module) -> list[nn.Dropout]:
    """The ``nn.Dropout`` layers with p > 0 inside ``module`` (the backbone's and the adapters' own)."""
    return [m for m in module.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@contextlib.contextmanager
def mc_dropout(module: nn.Module) -> Iterator[int]:
    """Within the block, every ``nn.Dropout`` (p > 0) inside ``module`` samples a mask even in eval mode.

    Only dropout *modules* are switched; attention-probability dropout that transformers applies inside its
    fused attention kernels (``dropout_p=... if self.training``) stays off. LoRA-XS adapter dropout
    (``LoraXSConfig(dropout=p)``, an ``nn.Dropout`` on each adapter's input) counts as a dropout layer, so a
    backbone without dropout of its own (Llama) gets MC dropout through its adapters. Yields the number of
    layers switched.

    Raises:
        ConfigError: when ``module`` has no dropout layer with p > 0 (e.g. Llama without adapter dropout): MC
            dropout would be a deterministic model.
    """
    switched = dropout_layers(module)
    if not switched:
        raise ConfigError(
            f"{type(module).__name__} has no dropout layer with p > 0, so MC dropout would equal the MAP model; "
            "set adapter dropout ([adapters] dropout = 0.1), use a backbone trained with dropout (e.g. BERT/MiniLM), "
            "or choose another method."
        )
    for m in switched:
        m.forward = functools.partial(_sampling_dropout, m)  # an instance attribute shadows Dropout.forward
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.forward
