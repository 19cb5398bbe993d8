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
collected iterates the low-rank part is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.latent import PointStart

__all__ = ["SWAG"]

#: Floor on the diagonal variance, so that the Gaussian stays proper when an iterate never moved.
_VAR_FLOOR = 1e-12


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"swag {what} must be a positive integer, got {value!r}.")
    return value


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
            as in the SWAG paper), or every step for data without a length.
        collect_lr: the constant learning rate during collection; ``None`` uses ``fit``'s ``lr``.
        scale: the sample scale c (a variance multiplier; 0.5 in the SWAG paper's code, 1 gives the raw
            moment estimate).
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
        from pyrolora.inference.svi import FitResult, _num_batches, fit

        batches = _num_batches(data)
        if (num_epochs is None) == (num_steps is None):
            raise ConfigError("give exactly one of num_epochs and num_steps.")
        if num_steps is None:
            if batches is None or num_epochs is None or num_epochs <= 0:
                raise ConfigError("num_epochs must be positive and needs data with a length; else pass num_steps.")
            num_steps = max(1, math.ceil(num_epochs * batches))
        pre = round(self.start * num_steps) if self.start < 1 else int(self.start)
        if pre >= num_steps:
            raise ConfigError(f"swag start={self.start!r} leaves no step for collection out of {num_steps}; lower it.")
        frequency = self.frequency or batches or 1
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
            results.append(
                fit(
                    model,
                    self,
                    data,
                    num_steps=num_steps - pre,
                    lr=self.collect_lr or lr,
                    seed=None if seed is None else seed + 1,
                    callback=collect,
                    **extra,
                )
            )
        if self.num_collected == 0:
            self.collect()  # fewer collection steps than the frequency: keep at least the final iterate
        merged = FitResult(dataset_size=results[0].dataset_size)
        for part in results:
            merged.losses += part.losses
            merged.learning_rates += part.learning_rates
            merged.num_steps += part.num_steps
            merged.seconds += part.seconds
        return merged
