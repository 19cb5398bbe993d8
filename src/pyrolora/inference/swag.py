"""SWAG (Maddox et al., 2019), the posterior the B-LoRA-XS paper fits, collected from MAP training of the same model.

MAP training (the point mass at ``loc``, trained by :func:`pyrolora.fit`) runs for a fraction ``start`` of the
steps with the usual schedule; then the learning rate is held at ``collect_lr`` and every ``frequency`` steps
the iterate ``z_t`` (all latents, unconstrained, D numbers) is collected into::

    mean     z̄ = (1/T) Σ_t z_t                        (D,)
    second   s = (1/T) Σ_t z_t²                        (D,)   so  var = s - z̄²
    deviations  the last K columns  z_t - z̄_t         (K, D)  (z̄_t: the running mean after step t)

and the posterior is the low-rank-plus-diagonal Gaussian (the paper's family)::

    q(z) = N(z̄, c · ½ (diag(var) + D̂ D̂ᵀ / (K - 1)))

with ``c`` the sample scale (``scale``; SWAG's default 0.5 halves the variance again). With fewer than two
collected iterates the low-rank part is dropped and the variance sits at its floor; :class:`SWAGWarning` says
so.

How many iterates: with C collection steps, K the rank and E steps per epoch, the default frequency is::

    f = E                  if C // E >= K       (once per epoch, as in the SWAG paper, when that gives K iterates)
    f = max(1, C // K)     otherwise             (spread over the collection stage)

so ``C // f >= min(K, C)`` iterates are collected (if C >= K then f <= C / K, hence C / f >= K; else f = 1).
The paper's once-per-epoch rule alone collects ``C // E`` iterates, e.g. one in a 3-epoch run collecting
from epoch 1.5, which makes the posterior a point mass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import pyro.distributions as dist
import torch
from torch import nn

from pyrolora.errors import ConfigError, SWAGWarning
from pyrolora.inference.latent import PointStart
from pyrolora.inference.svi import FitResult, _num_batches, fit, resolve_steps
from pyrolora.validation import positive_int

__all__ = ["SWAG", "collection_frequency"]

#: Floor on the diagonal variance, so that the Gaussian stays proper when an iterate never moved.
_VAR_FLOOR = 1e-12


def _positive_int(value: Any, what: str) -> int:
    return positive_int(value, f"swag {what}")


def collection_frequency(collect_steps: int, rank: int, epoch_steps: int | None) -> int:
    """The default steps between two collections (see the module docstring): once per epoch when that yields
    at least ``rank`` iterates, else ``max(1, collect_steps // rank)``, so that ``min(rank, collect_steps)`` or
    more are collected."""
    if epoch_steps is not None and epoch_steps > 0 and collect_steps // epoch_steps >= rank:
        return epoch_steps
    return max(1, collect_steps // rank)


class SWAG(PointStart):
    """SWA-Gaussian over all latents, collected from the iterates of MAP training.

    Stores 3·D + K·D numbers (D of them the trainable MAP ``loc``). ``fit_posterior`` runs the whole
    procedure; plain :func:`pyrolora.fit` only trains the MAP (the guide stays a point mass until something is
    collected with :meth:`collect`).

    Args:
        model: the Bayesian model.
        rank: K, the number of deviation columns kept (SWAG's default 20).
        start: when collection starts: a fraction of all steps if < 1, else a step count. Before it, MAP
            training follows ``fit``'s learning-rate schedule.
        frequency: steps between two collections; ``None`` collects once per epoch (every ``len(data)`` steps,
            as in the SWAG paper) when the collection stage spans at least K epochs, else spreads the
            collections evenly so that at least min(K, collection steps) iterates are collected
            (:func:`collection_frequency`).
        collect_lr: the constant learning rate during collection; ``None`` uses ``fit``'s ``lr`` (AdamW only:
            ``collect_optimizer="sgd"`` needs it explicitly).
        scale: the sample scale c (a variance multiplier; 0.5 in the SWAG paper's code, 1 gives the raw
            moment estimate).
        collect_optimizer: the optimizer of the collection stage, ``"adamw"`` or ``"sgd"`` (see
            :func:`pyrolora.fit`); ``None`` (the default) keeps the MAP stage's (``fit``'s ``optimizer``, AdamW
            unless given). The SWAG paper collects constant-lr SGD iterates, whose stationary scatter around
            the optimum has a covariance proportional to lr × the gradient noise, which is what makes the
            moments a posterior approximation; pick ``"sgd"`` with ``collect_lr`` for the paper's method. It
            is not the default because pyrolora's loss is summed over the N training examples: SGD's stable
            step is about 1 / (N · curvature), so the MAP's AdamW ``lr`` (1e-2) would diverge, and the
            switch would change existing runs. AdamW's iterates scatter by about ``lr`` per coordinate
            whatever the curvature, so their spread is a heuristic, not a posterior.
        collect_momentum: SGD momentum of the collection stage (``collect_optimizer="sgd"`` only).
    """

    swag_mean: torch.Tensor
    swag_sq_mean: torch.Tensor
    deviations: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        rank: int = 20,
        start: float = 0.5,
        frequency: int | None = None,
        collect_lr: float | None = None,
        scale: float = 0.5,
        collect_optimizer: Literal["adamw", "sgd"] | None = None,
        collect_momentum: float = 0.0,
    ) -> None:
        super().__init__(model)
        self.rank = _positive_int(rank, "rank K")
        if isinstance(start, bool) or not isinstance(start, int | float) or start < 0:
            raise ConfigError(f"swag start must be >= 0 (a fraction of the steps, or a step count), got {start!r}.")
        self.start = start
        self.frequency = None if frequency is None else _positive_int(frequency, "frequency")
        if collect_lr is not None and not (isinstance(collect_lr, int | float) and collect_lr > 0):
            raise ConfigError(f"swag collect_lr must be a positive number or None, got {collect_lr!r}.")
        self.collect_lr = collect_lr
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise ConfigError(f"swag sample scale must be a positive number, got {scale!r}.")
        self.scale = float(scale)
        if collect_optimizer not in (None, "adamw", "sgd"):
            raise ConfigError(f"swag collect_optimizer must be 'adamw', 'sgd' or None, got {collect_optimizer!r}.")
        if collect_optimizer == "sgd" and collect_lr is None:
            raise ConfigError(
                "swag collect_optimizer='sgd' needs an explicit collect_lr: the loss is summed over the N training "
                "examples, so SGD's stable step is about 1 / (N x curvature), far below the AdamW lr of the MAP stage."
            )
        bad_momentum = isinstance(collect_momentum, bool) or not isinstance(collect_momentum, int | float)
        if bad_momentum or not 0 <= collect_momentum < 1:
            raise ConfigError(f"swag collect_momentum must be a number in [0, 1), got {collect_momentum!r}.")
        if collect_momentum and collect_optimizer != "sgd":
            raise ConfigError(
                f"swag collect_momentum={collect_momentum!r} needs collect_optimizer='sgd', got {collect_optimizer!r}."
            )
        self.collect_optimizer = collect_optimizer
        self.collect_momentum = float(collect_momentum)

    def _setup_state(self) -> None:
        d, like = self.latent_dim, self.loc.detach()
        self.register_buffer("swag_mean", torch.zeros_like(like))  # (D,)
        self.register_buffer("swag_sq_mean", torch.zeros_like(like))  # (D,)
        self.register_buffer("deviations", like.new_zeros(self.rank, d))  # (K, D), a ring buffer
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=like.device))

    # ------------------------------------------------------------------ collection
    @torch.no_grad()
    def collect(self) -> None:
        """Add the current iterate ``loc`` to the running moments and the deviation ring buffer."""
        self._require_setup()
        z = self.loc.detach()
        n = int(self.count)
        self.swag_mean.mul_(n / (n + 1)).add_(z / (n + 1))
        self.swag_sq_mean.mul_(n / (n + 1)).add_(z.square() / (n + 1))
        self.deviations[n % self.rank].copy_(z - self.swag_mean)
        self.count.add_(1)

    def reset(self) -> None:
        """Forget every collected iterate."""
        self._require_setup()
        for buffer in (self.swag_mean, self.swag_sq_mean, self.deviations):
            buffer.zero_()
        self.count.zero_()

    @property
    def num_collected(self) -> int:
        """Iterates collected so far."""
        return 0 if self.prototype_trace is None else int(self.count)

    # ------------------------------------------------------------------ the posterior
    def fitted(self) -> bool:
        return self.num_collected > 0

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z̄ (D,), c/2 · var (D,), factor (D, k))`` with ``factor factorᵀ = c/2 · D̂ D̂ᵀ / (k - 1)``."""
        k = min(int(self.count), self.rank)
        var = (self.swag_sq_mean - self.swag_mean.square()).clamp_min(_VAR_FLOOR)
        diag = 0.5 * self.scale * var
        if k >= 2:
            factor = self.deviations[:k].T * math.sqrt(0.5 * self.scale / (k - 1))  # (D, k)
        else:
            factor = self.swag_mean.new_zeros(self.latent_dim, 1)
        return self.swag_mean, diag, factor

    def fitted_posterior(self) -> dist.Distribution:
        mean, diag, factor = self._moments()
        return dist.LowRankMultivariateNormal(mean, factor, diag)

    def draw_unconstrained(self, num_samples: int) -> torch.Tensor:
        self._require_setup()
        if not self.fitted():
            return self.loc.detach().expand(num_samples, -1).clone()
        mean, diag, factor = self._moments()
        eps_diag = torch.randn(num_samples, mean.numel(), dtype=mean.dtype, device=mean.device)
        eps_low = torch.randn(num_samples, factor.shape[1], dtype=mean.dtype, device=mean.device)
        return mean + eps_diag * diag.sqrt() + eps_low @ factor.T  # (S, D)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fitted():
            return self.loc, torch.full_like(self.loc, 1e-12)
        mean, diag, factor = self._moments()
        return mean, (diag + factor.square().sum(-1)).sqrt()

    # ------------------------------------------------------------------ the procedure
    def fit_posterior(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        num_epochs: float | None = None,
        num_steps: int | None = None,
        lr: float = 1e-2,
        seed: int | None = None,
        callback: Callable[[int, float], None] | None = None,
        **fit_kwargs: Any,
    ):
        """MAP training, then collection at a constant learning rate; returns one merged :class:`FitResult`.

        ``num_epochs`` / ``num_steps`` count both stages; the other arguments are :func:`pyrolora.fit`'s.
        Previously collected iterates are discarded.
        """
        batches = _num_batches(data)
        num_steps = resolve_steps(data, num_epochs, num_steps)  # both stages together, as fit counts them
        pre = round(self.start * num_steps) if self.start < 1 else int(self.start)
        if pre >= num_steps:
            raise ConfigError(f"swag start={self.start!r} leaves no step for collection out of {num_steps}; lower it.")
        collect_steps = num_steps - pre
        frequency = self.frequency or collection_frequency(collect_steps, self.rank, batches)
        results: list[FitResult] = []
        with self.map_stage():
            if pre > 0:
                results.append(fit(model, self, data, num_steps=pre, lr=lr, seed=seed, callback=callback, **fit_kwargs))
            if self.prototype_trace is not None:
                self.reset()

            def collect(step: int, loss: float) -> None:
                if (step + 1) % frequency == 0:
                    self.collect()
                if callback is not None:
                    callback(pre + step, loss)

            extra = {**fit_kwargs, "schedule": "constant", "warmup": 0}
            if self.collect_optimizer is not None:
                extra.update(optimizer=self.collect_optimizer, momentum=self.collect_momentum)
            results.append(
                fit(
                    model,
                    self,
                    data,
                    num_steps=collect_steps,
                    lr=self.collect_lr or lr,
                    seed=None if seed is None else seed + 1,
                    callback=collect,
                    **extra,
                )
            )
        if self.num_collected == 0:
            self.collect()  # fewer collection steps than the frequency: keep at least the final iterate
        if self.num_collected < 2:
            warnings.warn(
                f"SWAG collected {self.num_collected} iterate over {collect_steps} collection steps (frequency "
                f"{frequency}, rank K={self.rank}): its covariance is degenerate (variance at the floor "
                f"{_VAR_FLOOR:g}, no low-rank part), so the posterior is a point mass. Lower `frequency` (or leave "
                "it None), lower `start`, or train longer, so that at least 2 (ideally K) iterates are collected.",
                SWAGWarning,
                stacklevel=2,
            )
        merged = FitResult(dataset_size=results[0].dataset_size)
        for part in results:
            merged.losses += part.losses
            merged.learning_rates += part.learning_rates
            merged.num_steps += part.num_steps
            merged.seconds += part.seconds
        return merged
