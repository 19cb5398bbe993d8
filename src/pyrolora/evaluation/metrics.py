"""Classification metrics on predicted probabilities.

Plain tensor functions (NumPy arrays accepted): they know nothing of Pyro or of how the probabilities were
made. Written here rather than taken from torchmetrics because four one-line definitions do not justify its
stateful metric objects, and because the binning convention of ECE must be stated exactly (see :func:`ece`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pyrolora.errors import DataError

__all__ = ["accuracy", "brier", "ece", "entropy", "mcc", "nll", "rank_correlation", "reliability", "summary"]

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).detach()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).detach()
    p = p.to(torch.float64).cpu()
    y = y.to(torch.long).cpu()
    if p.dim() != 2:
        raise ValueError(f"probabilities must have shape (N, C), got {tuple(p.shape)}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {tuple(y.shape)}")
    if p.shape[0] == 0:
        raise ValueError("metrics need at least one example")
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got values in [{y.min()}, {y.max()}]")
    _check_probabilities(p)
    return p, y


#: How far a row of probabilities may sum from 1: float32 averages of softmax rows are off by about 1e-6, float16
#: ones by about 1e-3; logits (what this check is for) almost never sum to 1 within it.
SUM_TOLERANCE = 2e-3


def _check_probabilities(p: torch.Tensor) -> None:
    """Refuse what is not a matrix of probabilities (e.g. logits): every entry in [0, 1], rows summing to 1."""
    if not torch.isfinite(p).all():
        rows = (~torch.isfinite(p)).any(-1).nonzero().flatten()[:5].tolist()
        raise DataError(
            f"probabilities are not finite in rows {rows}: the model's outputs diverged (NaN or inf); check the "
            "run's head and posterior."
        )
    sums = p.sum(-1)
    bad = ((p < -1e-6) | (p > 1 + 1e-6)).any(-1) | ((sums - 1).abs() > SUM_TOLERANCE)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DataError(
            f"metrics need probabilities (rows of numbers in [0, 1] summing to 1), but row {row} is "
            f"{[round(v, 4) for v in p[row, :6].tolist()]} (sum {sums[row].item():.4g}); if these are logits, pass "
            "torch.softmax(logits, -1)."
        )


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of examples whose most probable class is the label (ties go to the lowest index)."""
    p, y = _probs_labels(probs, labels)
    return (p.argmax(-1) == y).double().mean().item()


def nll(probs: ArrayLike, labels: ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-(1/N) Σ log p_i[y_i]``; probabilities are clamped at ``eps``."""
    p, y = _probs_labels(probs, labels)
    return -p.gather(1, y[:, None]).clamp_min(eps).log().mean().item()


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score ``(1/N) Σ_i Σ_c (p_ic - 1[y_i = c])²`` (in [0, 2])."""
    p, y = _probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return ((p - onehot) ** 2).sum(-1).mean().item()


def reliability(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin mean confidence, accuracy and count over equal-width confidence bins.

    Confidence is the top probability ``max_c p_ic``. Bin b (0-based) holds confidences in
    ``(b/n_bins, (b+1)/n_bins]``; a confidence of exactly 0 falls into bin 0.

    Returns:
        ``(confidence, accuracy, count)``, each of shape (n_bins,); empty bins have confidence and accuracy 0.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _probs_labels(probs, labels)
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    index = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)  # (N,)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins: ``Σ_b (n_b / N) |acc_b - conf_b|``.

    Uses the top-label confidence and the bins of :func:`reliability`. 15 bins is the paper's setting.
    """
    conf, acc, count = reliability(probs, labels, n_bins)
    return ((count / count.sum()) * (acc - conf).abs()).sum().item()


def mcc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient of the argmax predictions (multiclass form of Gorodkin 2004)."""
    p, y = _probs_labels(probs, labels)
    k = p.shape[1]
    pred = p.argmax(-1)
    confusion = torch.zeros(k, k, dtype=torch.float64).index_put_(
        (y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True
    )
    t = confusion.sum(1)  # true counts per class
    q = confusion.sum(0)  # predicted counts per class
    c = confusion.trace()
    s = confusion.sum()
    denom = torch.sqrt((s**2 - (q * q).sum()) * (s**2 - (t * t).sum()))
    return 0.0 if denom == 0 else ((c * s - (t * q).sum()) / denom).item()


def entropy(probs: ArrayLike, eps: float = 1e-12) -> torch.Tensor:
    """Entropy ``-Σ_c p_c log p_c`` of each row, in nats; shape (N,)."""
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).double()
    return -(p * p.clamp_min(eps).log()).sum(-1)


def rank_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation between two per-example scores (ties get average ranks)."""
    from scipy.stats import spearmanr

    x = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    y = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"rank_correlation needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    return float(spearmanr(x, y).statistic)


def summary(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    human_probs: ArrayLike | None = None,
    keys: Sequence[str] = ("accuracy", "ece", "nll", "brier", "mcc"),
) -> dict[str, float]:
    """The metrics every report of pyrolora shows, of averaged probabilities (N, C) against labels (N,).

    Returns ``{"accuracy", "ece", "nll", "brier", "mcc", "num_examples"}`` (only the listed ``keys`` of the
    first five), plus ``"spearman_human_disagreement"`` when ``human_probs`` (N, C), the distribution of human
    ratings, is given: the rank correlation between the predictive entropy ``H[p(y|x)]`` and the entropy of the
    human label distribution (do the model and the raters find the same items hard?).
    """
    functions = {
        "accuracy": accuracy,
        "ece": lambda p, y: ece(p, y, n_bins=n_bins),
        "nll": nll,
        "brier": brier,
        "mcc": mcc,
    }
    unknown = sorted(set(keys) - set(functions))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(functions)}.")
    result: dict[str, float] = {key: functions[key](probs, labels) for key in keys}
    result["num_examples"] = len(labels)
    if human_probs is not None:
        result["spearman_human_disagreement"] = rank_correlation(entropy(probs), entropy(human_probs))
    return result
