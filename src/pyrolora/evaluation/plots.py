"""Plots. matplotlib is imported inside each function, so importing pyrolora never needs it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pyrolora.evaluation.metrics import ArrayLike, ece, reliability

__all__ = ["accuracy_coverage_plot", "reliability_diagram"]


def reliability_diagram(
    results: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | Path, n_bins: int = 15, title: str = ""
) -> Path:
    """Reliability diagrams with confidence histograms, one column per method, saved as an image.

    Args:
        results: method name -> ``(probs (N, C), labels (N,))``.
        path: output file (PNG, SVG or PDF by suffix).
        n_bins: equal-width confidence bins, as in :func:`~pyrolora.evaluation.metrics.ece`.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(
        2, len(names), figsize=(4.2 * len(names), 6.0), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}
    )
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    for col, name in enumerate(names):
        probs, labels = results[name]
        conf, acc, count = (t.numpy() for t in reliability(probs, labels, n_bins))
        filled = count > 0
        top, bottom = axes[0, col], axes[1, col]
        top.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        top.bar(
            centers[filled],
            conf[filled] - acc[filled],
            bottom=acc[filled],
            width=width,
            color="tab:red",
            alpha=0.35,
            edgecolor="tab:red",
            hatch="//",
            label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
        top.set(
            xlim=(0, 1),
            ylim=(0, 1),
            ylabel="accuracy",
            title=f"{name}  (ECE {ece(probs, labels, n_bins):.3f})",
        )
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(centers, count / max(count.sum(), 1), width=width, color="tab:gray", edgecolor="black")
        bottom.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="share of examples")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_coverage_plot(reports: Mapping[str, Mapping], path: str | Path, title: str = "") -> Path:
    """Accuracy-coverage curves of every uncertainty score, one panel per method, saved as an image.

    Args:
        reports: method name -> report of :func:`pyrolora.evaluation.uncertainty.uncertainty_report` (its
            ``curves`` and ``scores`` entries are used; the legend shows each score's AURC).
        path: output file (PNG, SVG or PDF by suffix).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(reports)
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4.0), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        curves = reports[name]["curves"]
        coverage = np.asarray(curves["coverage"])
        styles = ["-", "--", ":", "-.", (0, (5, 1))]  # scores that rank alike draw on top of each other
        for i, (score, row) in enumerate(reports[name]["scores"].items()):
            ax.plot(coverage, curves[score], linestyle=styles[i % 5], label=f"{score} (AURC {row['aurc']:.3f})")
        ax.set(xlim=(0, 1), xlabel="coverage (share of examples answered)", title=name)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    axes[0, 0].set_ylabel("accuracy on the answered examples")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
