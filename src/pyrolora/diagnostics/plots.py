"""Diagnostic pictures: ELBO trace, forest plot of sites, covariance spectrum, uncertainty vs human disagreement.

matplotlib (and ArviZ, for the forest plot) are imported inside each function. The reliability diagram lives in
:func:`pyrolora.evaluation.plots.reliability_diagram`. Every function writes one image and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pyrolora.diagnostics.spectrum import Spectrum
from pyrolora.errors import ConfigError
from pyrolora.evaluation.metrics import ArrayLike, entropy, rank_correlation

if TYPE_CHECKING:
    import arviz

__all__ = ["elbo_trace", "forest", "spectrum_plot", "uncertainty_vs_disagreement"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def elbo_trace(losses: Sequence[float], path: str | Path, *, dataset_size: int | None = None, title: str = "") -> Path:
    """The loss (negative ELBO) of every SVI step with its running mean, on a symmetric-log scale if it spans decades.

    Args:
        losses: one value per step, as in :attr:`pyrolora.FitResult.losses` (the minibatch estimate of the
            negative ELBO scaled to the whole training set).
        path: output image.
        dataset_size: N; when given the y axis shows the loss per training example (``loss / N``).
        title: figure title.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        raise ConfigError("the loss history is empty; nothing to plot (was the run trained?).")
    per = "per example" if dataset_size else "whole training set"
    if dataset_size:
        values = values / dataset_size
    window = max(1, values.size // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    steps = np.arange(1, values.size + 1)
    ax.plot(steps, values, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=0.8, label="step")
    if window > 1:
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", linewidth=2.0, label=f"running mean ({window} steps)")
    ax.set(xlabel="SVI step", ylabel=f"negative ELBO ({per})", title=title or "ELBO trace")
    if values.min() > 0 and values.max() / values.min() > 30:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def forest(
    idata: arviz.InferenceData,
    path: str | Path,
    *,
    sites: Sequence[str] | None = None,
    max_sites: int = 3,
    max_entries: int = 3,
    hdi_prob: float = 0.94,
) -> Path:
    """Forest plot (posterior mean and HDI per entry) of the top-left ``max_entries x max_entries`` block of R.

    Args:
        idata: an InferenceData from :func:`~pyrolora.diagnostics.to_inference_data`.
        path: output image.
        sites: sites to show; default the first ``max_sites`` in the posterior.
        max_sites: how many sites when ``sites`` is not given.
        max_entries: rows and columns of each R shown (r² entries per site would make a very long plot).
        hdi_prob: probability mass of the intervals.
    """
    import arviz as az

    post = idata.posterior
    names = list(sites) if sites is not None else list(post.data_vars)[:max_sites]
    unknown = [n for n in names if n not in post.data_vars]
    if unknown:
        raise ConfigError(f"unknown sites {unknown}; the posterior has {list(post.data_vars)[:5]}...")
    row_dim, col_dim = post[names[0]].dims[2:]
    coords = {row_dim: list(range(max_entries)), col_dim: list(range(max_entries))}
    coords = {k: v[: post.sizes[k]] for k, v in coords.items()}
    entries = len(names) * len(coords[row_dim]) * len(coords[col_dim])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.3 * entries))
    az.plot_forest(idata, var_names=names, coords=coords, combined=True, hdi_prob=hdi_prob, ax=ax)
    ax.axvline(0.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"value of R entry (posterior mean, {hdi_prob:.0%} HDI)")
    ax.set_ylabel("site [row, col]")
    shown = len(coords[row_dim])
    ax.set_title(f"R entries [row, col] < {shown} per site", fontsize=11)
    return _save(fig, path)


def spectrum_plot(spectra: Mapping[str, Spectrum], path: str | Path, *, top: int = 50, title: str = "") -> Path:
    """Eigenvalues (log scale) and the cumulative share of variance against the number of directions k.

    Args:
        spectra: label -> :class:`~pyrolora.diagnostics.spectrum.Spectrum` (one line per guide or run).
        path: output image.
        top: eigenvalues shown (the first ``top`` directions).
        title: figure title.
    """
    if not spectra:
        raise ConfigError("no spectra to plot.")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for label, spectrum in spectra.items():
        eig = spectrum.eigenvalues.numpy()
        total = eig.sum()
        n = min(top, eig.size)
        tag = f"{label} ({spectrum.source}, eff. rank {spectrum.effective_rank():.1f})"
        positive = eig[:n] > 0
        if positive.any():
            left.plot(np.arange(1, n + 1)[positive], eig[:n][positive], marker="o", markersize=3, label=tag)
        share = np.cumsum(eig) / total if total > 0 else np.zeros_like(eig)
        right.plot(np.arange(1, n + 1), share[:n], marker="o", markersize=3, label=label)
    left.set(xlabel="direction i (largest first)", ylabel="eigenvalue λ_i of the posterior covariance", yscale="log")
    left.set_title("covariance spectrum")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set(xlabel="top k directions", ylabel="share of total variance", ylim=(0, 1.02))
    right.set_title("cumulative share of variance")
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def uncertainty_vs_disagreement(
    probs: ArrayLike, human_probs: ArrayLike, path: str | Path, *, n_bins: int = 10, title: str = ""
) -> Path:
    """Predictive entropy of the model against the entropy of the human raters' label distribution.

    Each point is one example; the line is the mean model entropy within equal-count bins of human entropy.
    The title gives Spearman's rank correlation between the two.

    Args:
        probs: averaged predictive probabilities, shape (N, C).
        human_probs: human label distribution per example, shape (N, C).
        path: output image.
        n_bins: bins of the running mean.
        title: figure title.
    """
    model_h = entropy(probs).numpy()
    human_h = entropy(human_probs).numpy()
    if model_h.shape != human_h.shape:
        raise ConfigError(f"probs and human_probs disagree in shape: {model_h.shape} vs {human_h.shape}.")
    rho = rank_correlation(model_h, human_h)
    order = np.argsort(human_h, kind="stable")
    bins = [b for b in np.array_split(order, n_bins) if b.size]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    jitter = np.random.default_rng(0).uniform(-0.01, 0.01, size=human_h.shape)  # human entropies take few values
    ax.scatter(human_h + jitter, model_h, s=6, alpha=0.3, color="tab:blue", label="example")
    ax.plot(
        [human_h[b].mean() for b in bins],
        [model_h[b].mean() for b in bins],
        color="tab:red",
        marker="o",
        linewidth=2,
        label="mean per bin of human entropy",
    )
    ax.set(
        xlabel="human rater disagreement (entropy of label distribution, nats)",
        ylabel="model predictive entropy (nats)",
        title=title or f"Uncertainty vs human disagreement (Spearman ρ = {rho:.3f})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
