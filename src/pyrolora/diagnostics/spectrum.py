"""The covariance spectrum of a posterior over the stacked adapter latents θ (dimension D = Σ_l r²).

The paper's second claim is that the posterior covariance over θ has low rank. This module measures it for any
guide: the eigenvalues of the *fitted* covariance where the guide has one in closed form, the *empirical*
covariance of posterior draws otherwise (SWAG without a closed form, MCMC chains, flows, point masses).

Closed forms, read through the guide contract ``get_posterior()``:

- ``lowrank`` (``AutoLowRankMultivariateNormal``): ``Σ = L Lᵀ + diag(d)``, L of shape (D, K);
- ``full`` (``AutoMultivariateNormal``): ``Σ = L Lᵀ`` with L lower-triangular (D, D);
- ``diagonal`` (``AutoDiagonalNormal``): ``Σ = diag(σ²)``, whose eigenvalues are the variances themselves.
- ``blockwise``: ``Σ = F Fᵀ + diag(d)`` with F block-diagonal (one low-rank block per module).

The empirical covariance of S draws ``Σ̂ = (1/(S-1)) Σ_s (θ_s - θ̄)(θ_s - θ̄)ᵀ`` has rank at most S - 1, so
its spectrum beyond index S - 1 is zero by construction; draw more than D samples to see the whole spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pyrolora.errors import ConfigError

__all__ = ["Spectrum", "covariance_spectrum", "empirical_spectrum", "flatten_draws"]


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a posterior covariance, largest first, and the summaries built on them.

    Attributes:
        eigenvalues: shape (D,), float64, descending, clipped at zero (round-off can make tiny ones negative).
        source: ``"fitted"`` (closed-form covariance of the guide) or ``"empirical"`` (covariance of draws).
        num_draws: S for an empirical spectrum, ``None`` for a fitted one.
    """

    eigenvalues: torch.Tensor
    source: Literal["fitted", "empirical"]
    num_draws: int | None = None

    @property
    def total_variance(self) -> float:
        """``tr Σ = Σ_i λ_i``."""
        return float(self.eigenvalues.sum())

    def effective_rank(self) -> float:
        """Entropy effective rank (Roy & Vetterli, 2007): ``exp(-Σ_i p_i log p_i)`` with ``p_i = λ_i / Σ_j λ_j``.

        Equals m when the variance is spread evenly over m directions and 1 when one direction holds all of
        it. Zero for a covariance without variance (a point mass).
        """
        total = self.total_variance
        if total <= 0:
            return 0.0
        p = self.eigenvalues / total
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    def participation_ratio(self) -> float:
        """``(Σ λ_i)² / Σ λ_i²``: another effective dimension (1: one direction, D: isotropic); 0 without variance."""
        total = self.total_variance
        if total <= 0:
            return 0.0
        return total**2 / float((self.eigenvalues**2).sum())

    def share_top(self, k: int) -> float:
        """Share of the total variance in the top ``k`` directions, ``Σ_{i≤k} λ_i / Σ_i λ_i``; NaN if no variance."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}.")
        total = self.total_variance
        if total <= 0:
            return math.nan
        return float(self.eigenvalues[:k].sum()) / total

    def to_dict(self, ks: tuple[int, ...] = (1, 2, 5, 10)) -> dict[str, Any]:
        """JSON-ready summary: dimension, source, total variance, effective ranks and top-k shares."""
        return {
            "dimension": int(self.eigenvalues.numel()),
            "source": self.source,
            "num_draws": self.num_draws,
            "total_variance": self.total_variance,
            "effective_rank": self.effective_rank(),
            "participation_ratio": self.participation_ratio(),
            **{f"share_top_{k}": self.share_top(k) for k in ks if k <= self.eigenvalues.numel()},
        }


def _descending(eigenvalues: torch.Tensor) -> torch.Tensor:
    return eigenvalues.double().clamp_min(0).sort(descending=True).values


def flatten_draws(draws: Mapping[str, torch.Tensor], sites: tuple[str, ...] | None = None) -> torch.Tensor:
    """Stack draws of every site into θ: ``{site: (..., r, r)}`` -> (S, D), leading dimensions flattened.

    Chains are pooled: draws of shape (chains, draws, r, r) become chains·draws rows.
    """
    sites = tuple(draws) if sites is None else sites
    if not sites:
        raise ConfigError("no draws given; pass a non-empty dict site -> tensor of shape (..., r, r).")
    parts = []
    for name in sites:
        value = draws[name]
        if value.dim() < 3:
            raise ConfigError(f"draws of site {name!r} must have shape (..., r, r), got {tuple(value.shape)}.")
        parts.append(value.reshape(-1, value.shape[-2] * value.shape[-1]))
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise ConfigError(f"every site needs the same number of draws, got {sorted(rows)}.")
    return torch.cat(parts, dim=1).double()  # (S, D)


def empirical_spectrum(draws: Mapping[str, torch.Tensor] | torch.Tensor) -> Spectrum:
    """Spectrum of the sample covariance of draws (a dict of site draws, or θ of shape (S, D)), S ≥ 2.

    Computed from the singular values of the centred (S, D) matrix, so D may be large: ``λ_i = s_i² / (S-1)``.
    """
    theta = draws.double() if isinstance(draws, torch.Tensor) else flatten_draws(draws)
    if theta.dim() != 2 or theta.shape[0] < 2:
        raise ConfigError(
            f"need at least 2 draws of shape (S, D) for an empirical covariance, got {tuple(theta.shape)}."
        )
    s, d = theta.shape
    centred = theta - theta.mean(0)
    singular = torch.linalg.svdvals(centred)  # (min(S, D),)
    eig = torch.zeros(d, dtype=torch.float64)
    eig[: singular.numel()] = singular**2 / (s - 1)
    return Spectrum(_descending(eig), "empirical", num_draws=s)


def fitted_covariance(guide: nn.Module) -> torch.Tensor | None:
    """The guide's closed-form covariance (D, D) or its diagonal (D,), or ``None`` when it has no Gaussian form."""
    get_posterior = getattr(guide, "get_posterior", None)
    if get_posterior is None:
        return None
    try:
        posterior = get_posterior()
    except (NotImplementedError, TypeError):
        return None
    base = getattr(posterior, "base_dist", posterior)  # Independent(Normal) for the diagonal guide
    if hasattr(base, "covariance_matrix") and base.batch_shape == ():
        return base.covariance_matrix.detach()
    if isinstance(base, torch.distributions.Normal):
        return base.scale.detach().reshape(-1) ** 2  # the variances: the eigenvalues of diag(σ²)
    return None


def covariance_spectrum(
    guide: nn.Module,
    model: nn.Module | None = None,
    *,
    draws: Mapping[str, torch.Tensor] | None = None,
    num_samples: int = 2000,
    seed: int = 0,
) -> Spectrum:
    """Eigenvalues of the posterior covariance of a guide: fitted when it has a closed form, else empirical.

    Args:
        guide: a fitted guide. Gaussian autoguides give their fitted covariance (``lowrank``: ``L Lᵀ + diag(d)``;
            ``full``: ``L Lᵀ``; ``diagonal``: ``diag(σ²)``); any other guide is sampled.
        model: the model, needed to sample a guide without a closed form (see
            :func:`pyrolora.inference.draw_latents`).
        draws: use these draws (e.g. MCMC chains, shape (chains, draws, r, r) per site) instead of sampling.
        num_samples: draws for the empirical covariance; its rank is at most ``num_samples - 1``.
        seed: seed of those draws (the global RNG state is restored).
    """
    if draws is None:
        if guide is not None and model is not None:
            from pyrolora.inference.families import setup

            setup(guide, model)
        cov = fitted_covariance(guide) if guide is not None else None
        if cov is not None:
            eig = torch.linalg.eigvalsh(cov.double()) if cov.dim() == 2 else cov.double()
            return Spectrum(_descending(eig), "fitted")
        if model is None:
            raise ConfigError(
                f"{type(guide).__name__} has no closed-form covariance; pass model=... to sample it, or draws=...."
            )
        from pyrolora.inference.predict import draw_latents

        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            draws = draw_latents(guide, model, num_samples)
    return empirical_spectrum(draws)
