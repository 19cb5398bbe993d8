"""Likelihoods: how the backbone's outputs explain the targets.

A likelihood turns a batch of outputs into a distribution over targets (``distribution``) and into what
prediction averages over posterior samples (``predictive``: class probabilities for classification, the mean
for regression).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from pyrolora.errors import ConfigError, DataError

__all__ = ["Categorical", "Gaussian", "Likelihood"]


def check_targets(distribution: dist.Distribution, targets: torch.Tensor) -> None:
    """Refuse targets whose shape is not the distribution's (Pyro would broadcast them: (B, 1) labels against
    (B,) logits rows give a (B, B) log-likelihood and a loss many times too large).

    Raises:
        DataError: naming both shapes and the fix.
    """
    want = tuple(distribution.batch_shape + distribution.event_shape)
    if tuple(targets.shape) != want:
        raise DataError(
            f"targets have shape {tuple(targets.shape)}, but the likelihood expects {want} for this batch; pass "
            f"one target per example, e.g. targets.reshape({', '.join(map(str, want))})."
        )


class Likelihood(nn.Module):
    """Base class. Subclasses implement :meth:`distribution` and :meth:`predictive`."""

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        """The distribution of one target per row of ``outputs``; batch shape (B,)."""
        raise NotImplementedError

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        """What Bayesian model averaging averages: shape (B, C)."""
        raise NotImplementedError

    def log_prob(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Pointwise log-likelihood, shape (B,)."""
        return self.distribution(outputs).log_prob(targets)


class Categorical(Likelihood):
    """``y ~ Categorical(softmax(f(x)))`` for classification and multiple choice.

    ``outputs`` are logits of shape (B, C), computed in float32 whatever the backbone's precision.
    """

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        if outputs.dim() != 2:
            raise ValueError(f"Categorical expects logits of shape (batch, classes), got {tuple(outputs.shape)}")
        return dist.Categorical(logits=outputs.float())

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs.float(), dim=-1)  # (B, C)


class Gaussian(Likelihood):
    """``y ~ N(f(x), scale²)`` for regression; ``scale`` is the noise standard deviation.

    ``outputs`` of shape (B,) or (B, 1) give scalar targets of shape (B,); outputs of shape (B, d) with d > 1
    give vector targets of shape (B, d), independent across the d outputs.
    """

    scale: torch.Tensor

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"Gaussian noise scale must be a positive finite number, got {scale!r}.")
        self.register_buffer("scale", torch.tensor(float(scale)))

    @staticmethod
    def _mean(outputs: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        if outputs.dim() == 2 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return outputs  # (B,) or (B, d)

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        mean = self._mean(outputs)
        d = dist.Normal(mean, self.scale)
        return d.to_event(1) if mean.dim() == 2 else d

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        mean = self._mean(outputs)
        return mean.unsqueeze(-1) if mean.dim() == 1 else mean  # (B, d)

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():g}"
