"""Summaries of a posterior: ArviZ tables per site, and the Pareto-k check of a variational fit.

Pareto-k ("Yes, but did it work?", Yao, Vehtari, Simpson & Gelman, ICML 2018)
--------------------------------------------------------------------------------
For S draws ``θ_s ~ q`` the importance ratios ``w_s = p(y, θ_s) / q(θ_s)`` would reweight the guide into the
exact posterior. A generalised Pareto distribution is fitted to the largest ratios (PSIS, Vehtari et al. 2024);
its shape k estimates how heavy the ratios' tail is, and so how far q is from the posterior where it matters:

- ``k < 0.5``: the ratios have finite variance; q is close to the posterior and importance sampling converges
  quickly;
- ``0.5 ≤ k < 0.7``: the variance is infinite but PSIS still gives usable estimates, more slowly;
- ``k ≥ 0.7``: the tail is too heavy: q misses mass of the posterior and its moments (means, variances,
  predictive probabilities) cannot be trusted as posterior estimates; increase S, or use a richer guide.
  With S draws, the sample-size-dependent threshold ``min(1 - 1 / log10(S), 0.7)`` replaces 0.7.

In high dimension (D in the thousands) every Gaussian guide tends to exceed 0.7: the diagnostic is a strict
test of the whole joint, not of the predictive distribution alone.

Cost: S draws from the guide and S evaluations of ``log p(y, θ_s) = log p(θ_s) + Σ_{i=1}^{N} log p(y_i | θ_s)``
over the **whole** training set (the posterior the guide approximates is conditioned on all of it), i.e.
``S · N`` forward passes of the backbone, with memory bounded by ``samples_per_pass · batch`` examples. A
point mass (``delta``) has no density, so the diagnostic is undefined for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta
from torch import nn

from pyrolora.diagnostics.convert import pointwise
from pyrolora.errors import ConfigError
from pyrolora.inference.families import setup
from pyrolora.models import BayesianLoraModel

if TYPE_CHECKING:
    import arviz
    import pandas

__all__ = ["ParetoK", "pareto_k", "pareto_k_threshold", "site_summary", "summary"]


def summary(idata: arviz.InferenceData, var_names: Sequence[str] | None = None, **kwargs: Any) -> pandas.DataFrame:
    """``az.summary`` over the adapter sites (one row per entry of each R): mean, sd, HDI, MCSE, ESS, R-hat.

    R-hat needs at least two chains; with one chain ArviZ's column is NaN.
    """
    import arviz as az

    names = list(var_names) if var_names is not None else list(idata.posterior.data_vars)
    return az.summary(idata, var_names=names, **kwargs)


def site_summary(idata: arviz.InferenceData) -> pandas.DataFrame:
    """One row per site: mean |mean|, mean sd, smallest bulk/tail ESS and largest R-hat over the entries of R.

    ESS and R-hat are the rank-normalised versions of Vehtari et al. (2021). R-hat is NaN for a single chain;
    ESS and R-hat are NaN where every draw is equal (a point mass).
    """
    import arviz as az
    import pandas as pd

    post = idata.posterior
    num_chains = post.sizes["chain"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ess_bulk = az.ess(idata, method="bulk")
        ess_tail = az.ess(idata, method="tail")
        rhat = az.rhat(idata) if num_chains > 1 else None
    rows = []
    for name in post.data_vars:
        values = post[name].values  # (chains, draws, r, r)
        sd = values.std(axis=(0, 1), ddof=1)
        varies = sd > 0  # ESS and R-hat are undefined for an entry that never changes

        def worst(stat: Any, reduce: Any, name: str = name, varies: np.ndarray = varies) -> float:
            if stat is None or not varies.any():
                return math.nan
            picked = stat[name].values[varies]
            return float(reduce(picked)) if np.isfinite(picked).any() else math.nan

        rows.append(
            {
                "site": name,
                "entries": int(np.prod(values.shape[2:])),
                "mean_abs_mean": float(np.abs(values.mean(axis=(0, 1))).mean()),
                "mean_sd": float(sd.mean()),
                "min_ess_bulk": worst(ess_bulk, np.nanmin),
                "min_ess_tail": worst(ess_tail, np.nanmin),
                "max_r_hat": worst(rhat, np.nanmax),
            }
        )
    return pd.DataFrame(rows).set_index("site")


def pareto_k_threshold(num_samples: int) -> float:
    """The sample-size-dependent PSIS threshold ``min(1 - 1 / log10(S), 0.7)`` (Vehtari et al., 2024)."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


@dataclass(frozen=True)
class ParetoK:
    """Result of :func:`pareto_k`.

    Attributes:
        k: the fitted generalised-Pareto shape of the importance ratios' tail.
        log_weights: ``log p(y, θ_s) - log q(θ_s)``, shape (S,), unnormalised, float64.
        threshold: ``min(1 - 1 / log10(S), 0.7)``; below it the PSIS estimates are reliable.
        ess: effective sample size of the Pareto-smoothed normalised weights, ``1 / Σ_s w̃_s²``.
    """

    k: float
    log_weights: np.ndarray = field(repr=False)
    threshold: float
    ess: float

    @property
    def num_samples(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def verdict(self) -> str:
        """``good`` (k < 0.5), ``ok`` (k below the threshold) or ``unreliable``."""
        if self.k < 0.5:
            return "good"
        if self.k < self.threshold:
            return "ok"
        return "unreliable"

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "threshold": self.threshold,
            "verdict": self.verdict,
            "num_samples": self.num_samples,
            "ess": self.ess,
        }


def _draws_with_log_q(
    guide: nn.Module, model: BayesianLoraModel, num: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """S draws of every site and ``log q(θ_s)``: from ``guide.sample_latents_with_log_prob`` or a Pyro trace."""
    if hasattr(guide, "sample_latents_with_log_prob"):
        draws, log_q = guide.sample_latents_with_log_prob(num)
        return draws, torch.as_tensor(log_q).double()
    if isinstance(guide, AutoDelta):
        raise ConfigError(
            "the delta guide is a point mass with no density, so Pareto-k of log p(y, θ) - log q(θ) is undefined; "
            "use a guide with a density (lowrank, diagonal, full)."
        )
    if hasattr(guide, "sample_latents") and not isinstance(guide, pyro.nn.PyroModule):
        raise ConfigError(
            f"{type(guide).__name__} has sample_latents but no density; give it "
            "sample_latents_with_log_prob(num) -> (draws, log_q) to compute Pareto-k."
        )
    setup(guide, model)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in model.site_names}
    log_q = []
    with pyro.settings.context(module_local_params=True), torch.no_grad():
        for _ in range(num):
            trace = poutine.trace(guide).get_trace(None)
            log_q.append(trace.log_prob_sum().double())  # the joint latent, plus zero-Jacobian Delta sites
            for name in model.site_names:
                values[name].append(trace.nodes[name]["value"].detach())
    return {k: torch.stack(v) for k, v in values.items()}, torch.stack(log_q)


def pareto_k(
    model: BayesianLoraModel,
    guide: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int = 100,
    samples_per_pass: int | None = 8,
    seed: int | None = 0,
    progress: bool = False,
) -> ParetoK:
    """Pareto-k of the importance ratios ``log p(y, θ_s) - log q(θ_s)``, θ_s ~ q (see the module docstring).

    Args:
        model: the model, with its head as trained.
        guide: a fitted guide with a density (autoguides; others via ``sample_latents_with_log_prob``).
        data: the **whole training set** the guide was fitted to, as batches ``(inputs, targets)``.
        num_samples: S; the estimate of k is noisy below about 100 draws.
        samples_per_pass: draws per forward pass (memory ~ samples_per_pass x batch examples).
        seed: seed of the draws (global RNG restored).
        progress: a progress bar over batches.
    """
    import arviz as az

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ConfigError(f"num_samples must be an integer >= 10 for a Pareto fit, got {num_samples!r}.")
    with contextlib.ExitStack() as scope:
        if seed is not None:
            scope.enter_context(torch.random.fork_rng())
            torch.manual_seed(seed)
        draws, log_q = _draws_with_log_q(guide, model, num_samples)
    log_prior = torch.zeros(num_samples, dtype=torch.float64)
    with torch.no_grad():
        for name, shape in model.adapters.shapes.items():
            value = draws[name].to(model.device)
            prior = model.prior(name, shape)
            log_prior += prior.log_prob(value).reshape(num_samples, -1).sum(-1).double().cpu()
    log_lik, _, _ = pointwise(
        model, draws, data, samples_per_pass=samples_per_pass, predictive_draws=False, progress=progress
    )
    log_w = (log_prior + log_lik.sum(1) - log_q.cpu()).numpy()  # (S,)
    smoothed, k = az.psislw(log_w.copy())
    weights = np.exp(smoothed)  # normalised
    return ParetoK(
        k=float(k),
        log_weights=log_w,
        threshold=pareto_k_threshold(num_samples),
        ess=float(1.0 / np.sum(weights**2)),
    )
