"""Uncertainty a user can act on: decomposition, selective prediction and out-of-distribution detection.

Plain functions of per-sample predictive probabilities, shape (S, N, C), as :func:`pyrolora.predict` returns them;
they know nothing of Pyro or of how the S samples were made, so posterior draws (B-LoRA-XS), ensemble members or
MC-dropout passes all plug in unchanged. A point estimate is the case S = 1 (or S identical samples).

Multiple choice is the same computation with C = number of options. Questions with fewer options than the widest
one are padded with options of probability exactly 0 in every sample; such options change none of the values
below, because ``0 · log 0 = 0``.

Every *score* is oriented so that **higher means more uncertain**; selective prediction accepts the examples with
the lowest scores first, and OOD detection treats the shifted data as the positive class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from pyrolora.errors import DataError
from pyrolora.evaluation.metrics import ArrayLike

__all__ = [
    "COVERAGE_GRID",
    "SCORES",
    "Decomposition",
    "RiskCoverage",
    "aupr",
    "aurc",
    "auroc",
    "decompose",
    "excess_aurc",
    "format_uncertainty_table",
    "risk_coverage",
    "score_correlation",
    "selective_accuracy",
    "uncertainty_report",
    "uncertainty_scores",
]

#: The scores every report contains, in this order (see :func:`uncertainty_scores`).
SCORES = ("max_prob", "entropy", "expected_entropy", "mutual_information", "variance")

#: Coverages at which reports store the accuracy-coverage curve (1%, 2%, ..., 100%).
COVERAGE_GRID = tuple(round(0.01 * k, 2) for k in range(1, 101))

_SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; 1e-3 only catches logits or unnormalised input


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu().to(torch.float64)


def _sample_probs(probs: ArrayLike) -> torch.Tensor:
    p = _as_tensor(probs)
    if p.dim() != 3:
        raise DataError(
            f"per-sample probabilities must have shape (S, N, C), got {tuple(p.shape)}; "
            "for a single model pass probs[None]."
        )
    if p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 2:
        raise DataError(f"need S >= 1 samples, N >= 1 examples and C >= 2 classes, got shape {tuple(p.shape)}.")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise DataError("probabilities must be finite and non-negative; pass softmax outputs, not logits.")
    worst = (p.sum(-1) - 1).abs().max().item()
    if worst > _SUM_TOLERANCE:
        raise DataError(f"probabilities must sum to 1 over the last axis; the worst row is off by {worst:.3g}.")
    return p


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """``-Σ_c p_c log p_c`` over the last axis with ``0 log 0 = 0`` exactly (no clamping)."""
    return -torch.special.xlogy(p, p).sum(-1)


class Decomposition(NamedTuple):
    """Per-example split of predictive uncertainty (nats), each of shape (N,).

    Attributes:
        total: entropy of the model average, ``H[p̄]`` with ``p̄ = (1/S) Σ_s p_s``.
        aleatoric: expected entropy, ``(1/S) Σ_s H[p_s]``: the noise each sample already sees.
        epistemic: mutual information between label and parameters, ``H[p̄] - (1/S) Σ_s H[p_s]``
            ``= (1/S) Σ_s KL(p_s ‖ p̄)`` (≥ 0): the samples' disagreement. Exactly zero where all samples agree
            (a point estimate).
    """

    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


def decompose(probs: ArrayLike) -> Decomposition:
    """Total = aleatoric + epistemic uncertainty of each example, from S samples of its predictive.

    Args:
        probs: per-sample probabilities, shape (S, N, C) (C classes or answer options).

    Returns:
        :class:`Decomposition` of float64 tensors of shape (N,). Mutual information is computed in its KL form
        and clamped at 0; ``total - (aleatoric + epistemic)`` is rounding error only (~1e-16).
    """
    p = _sample_probs(probs)
    mean = p.mean(0)  # (N, C)
    total = _entropy(mean)  # (N,)
    aleatoric = _entropy(p).mean(0)  # (N,)
    # MI as the mean KL(p_s || p̄) rather than as total - aleatoric: same value, but it carries no cancellation
    # error, and examples whose S samples are identical get exactly 0 (else a point estimate would get a
    # ranking of rounding noise).
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, mean)).sum(-1)  # (S, N)
    epistemic = kl.mean(0).clamp_min(0.0).masked_fill(_identical(p), 0.0)
    return Decomposition(total, aleatoric, epistemic)


def _identical(p: torch.Tensor) -> torch.Tensor:
    """Whether all S samples of each example are equal, shape (N,)."""
    return (p == p[:1]).all(-1).all(0)


def uncertainty_scores(probs: ArrayLike) -> dict[str, torch.Tensor]:
    """Every score of :data:`SCORES` for each example (higher = more uncertain), each of shape (N,).

    - ``max_prob``: ``1 - max_c p̄_c``, one minus the confidence of the model average.
    - ``entropy``: total predictive entropy ``H[p̄]``.
    - ``expected_entropy``: aleatoric part ``(1/S) Σ_s H[p_s]``.
    - ``mutual_information``: epistemic part ``H[p̄] - (1/S) Σ_s H[p_s]``.
    - ``variance``: mean over classes of the across-sample variance, ``(1/C) Σ_c (1/S) Σ_s (p_sc - p̄_c)²``.

    Args:
        probs: per-sample probabilities, shape (S, N, C).
    """
    p = _sample_probs(probs)
    mean = p.mean(0)  # (N, C)
    parts = decompose(p)
    return {
        "max_prob": 1.0 - mean.max(-1).values,
        "entropy": parts.total,
        "expected_entropy": parts.aleatoric,
        "mutual_information": parts.epistemic,
        "variance": p.var(0, unbiased=False).mean(-1).masked_fill(_identical(p), 0.0),
    }


# ---------------------------------------------------------------------------------------------------------------
# selective prediction


def _score_and_flags(score: ArrayLike, flags: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = _as_tensor(score).numpy()
    f = np.asarray(flags.cpu() if isinstance(flags, torch.Tensor) else flags)
    if s.ndim != 1 or s.shape != f.shape or s.size == 0:
        raise DataError(f"score and {what} must be non-empty 1-D arrays of equal length, got {s.shape} and {f.shape}.")
    if not np.isfinite(s).all():
        raise DataError("uncertainty scores must be finite.")
    return s, f.astype(bool)


class RiskCoverage(NamedTuple):
    """Risk-coverage curve of a score, shape (N,) each.

    Attributes:
        coverage: ``k / N`` for ``k = 1..N``.
        risk: expected error rate among the k least uncertain examples. Examples with equal scores are
            accepted in random order; the curve is the expectation over that order (exact, not sampled).
    """

    coverage: torch.Tensor
    risk: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """The accuracy-coverage curve, ``1 - risk``."""
        return 1.0 - self.risk


def risk_coverage(score: ArrayLike, correct: ArrayLike) -> RiskCoverage:
    """Selective prediction: accept examples in order of increasing uncertainty and track the error rate.

    With scores sorted ascending and ties grouped, the expected number of errors among the first k accepted
    examples is ``E_<g + (k - n_<g) · e_g / n_g`` for the tie group g holding position k (``E_<g``, ``n_<g``:
    errors and size of the groups before; ``e_g``, ``n_g``: those of g), and ``risk(k) = errors(k) / k``.

    Args:
        score: uncertainty per example (higher = more uncertain), shape (N,).
        correct: whether the prediction for each example is right, shape (N,) (bool or 0/1).
    """
    s, ok = _score_and_flags(score, correct, "correct")
    order = np.argsort(s, kind="stable")
    s, err = s[order], (~ok[order]).astype(np.float64)
    _, starts, sizes = np.unique(s, return_index=True, return_counts=True)  # groups of equal scores, ascending
    group_errors = np.add.reduceat(err, starts)
    group = np.repeat(np.arange(len(sizes)), sizes)  # (N,) group of each sorted position
    errors_before = (np.cumsum(group_errors) - group_errors)[group]
    k = np.arange(1, len(s) + 1, dtype=np.float64)
    expected = errors_before + (k - starts[group]) * group_errors[group] / sizes[group]
    return RiskCoverage(torch.from_numpy(k / len(s)), torch.from_numpy(expected / k))


def aurc(score: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve, ``(1/N) Σ_k risk(k)`` (lower is better; Geifman et al., 2019)."""
    return risk_coverage(score, correct).risk.mean().item()


def excess_aurc(score: ArrayLike, correct: ArrayLike) -> float:
    """AURC minus that of the ideal score (all errors ranked last): ``E-AURC`` (0 is a perfect ranking)."""
    _, ok = _score_and_flags(score, correct, "correct")
    ideal = aurc(np.where(ok, 0.0, 1.0), ok)
    return aurc(score, correct) - ideal


def selective_accuracy(score: ArrayLike, correct: ArrayLike, coverage: float) -> float:
    """Expected accuracy on the ``ceil(coverage · N)`` least uncertain examples."""
    if not 0 < coverage <= 1:
        raise DataError(f"coverage must lie in (0, 1], got {coverage!r}.")
    curve = risk_coverage(score, correct)
    k = int(np.ceil(coverage * len(curve.risk) - 1e-9))  # 1e-9: 0.5 · 100 must give 50, not 51
    return 1.0 - curve.risk[max(k, 1) - 1].item()


# ---------------------------------------------------------------------------------------------------------------
# out-of-distribution detection


def _in_out(score_in: ArrayLike, score_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_tensor(score_in).numpy(), _as_tensor(score_out).numpy()
    if a.ndim != 1 or b.ndim != 1 or a.size == 0 or b.size == 0:
        raise DataError(f"OOD metrics need two non-empty 1-D score arrays, got shapes {a.shape} and {b.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("uncertainty scores must be finite.")
    return a, b


def auroc(score_in: ArrayLike, score_out: ArrayLike) -> float:
    """Area under the ROC curve for telling shifted (positive) from in-distribution data by the score.

    Exactly ``P(s_out > s_in) + ½ P(s_out = s_in)`` over all pairs (Mann-Whitney U with average ranks), so a
    constant score gives 0.5.
    """
    from scipy.stats import rankdata

    a, b = _in_out(score_in, score_out)
    ranks = rankdata(np.concatenate([a, b]))  # average ranks for ties
    n_in, n_out = len(a), len(b)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def aupr(score_in: ArrayLike, score_out: ArrayLike, positive: str = "out") -> float:
    """Area under the precision-recall curve as average precision, ``Σ_t (R_t - R_{t-1}) P_t``.

    Thresholds t run over the distinct score values from the highest down; examples with equal scores enter
    together (the convention of scikit-learn's and torchmetrics' average precision).

    Args:
        score_in: scores of in-distribution examples, shape (N,).
        score_out: scores of shifted examples, shape (M,).
        positive: ``"out"`` (AUPR-Out: shifted data positive, high score flags it) or ``"in"`` (AUPR-In:
            in-distribution positive, flagged by a low score).
    """
    a, b = _in_out(score_in, score_out)
    if positive == "out":
        s, y = np.concatenate([a, b]), np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    elif positive == "in":
        s, y = -np.concatenate([a, b]), np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    else:
        raise DataError(f"positive must be 'out' or 'in', got {positive!r}.")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------------------------------------------
# agreement with human disagreement


def score_correlation(score: ArrayLike, reference: ArrayLike) -> float:
    """Spearman rank correlation of a score with a reference (e.g. rater disagreement); NaN if either is constant.

    A constant score (mutual information of a point estimate) has no ranking; that is reported as NaN rather
    than as a number that looks like a weak correlation.
    """
    from pyrolora.evaluation.metrics import rank_correlation

    x, y = _as_tensor(score).numpy(), _as_tensor(reference).numpy()
    if x.shape != y.shape or x.ndim != 1:
        raise DataError(f"score and reference must be 1-D of equal length, got {x.shape} and {y.shape}.")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return rank_correlation(x, y)


# ---------------------------------------------------------------------------------------------------------------
# one report


def _nan_to_none(value: float) -> float | None:
    return None if value != value else value  # JSON has no NaN


def uncertainty_report(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    ood_probs: ArrayLike | None = None,
    human_probs: ArrayLike | None = None,
    coverages: tuple[float, ...] = (0.5, 0.8, 0.9),
) -> dict[str, Any]:
    """Everything in one JSON-ready dictionary: decomposition, selective prediction, OOD detection, human agreement.

    Args:
        probs: per-sample probabilities on the in-distribution evaluation split, shape (S, N, C).
        labels: its labels, shape (N,).
        ood_probs: per-sample probabilities on shifted data, shape (S', M, C) (S' may differ from S).
        human_probs: human label distribution per in-distribution example, shape (N, C); rater disagreement is
            its entropy.
        coverages: coverages at which to report selective accuracy.

    Returns:
        ``{"num_samples", "num_examples", "decomposition": {"in": {...}, ["out": {...}]}, "scores": {score: {...}},
        "curves": {"coverage": [...], score: [accuracy, ...]}}``; per score: ``aurc``, ``excess_aurc``,
        ``selective_accuracy@c``, and with ``ood_probs`` ``auroc``, ``aupr_out``, ``aupr_in``, and with
        ``human_probs`` ``spearman_human_disagreement`` (None where a score is constant).
    """
    p = _sample_probs(probs)
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels), dtype=torch.long)
    if y.shape != (p.shape[1],) or (y < 0).any() or (y >= p.shape[2]).any():
        raise DataError(f"labels must have shape ({p.shape[1]},) with values in [0, {p.shape[2]}).")
    correct = p.mean(0).argmax(-1) == y
    scores = uncertainty_scores(p)
    report: dict[str, Any] = {
        "num_samples": p.shape[0],
        "num_examples": p.shape[1],
        "accuracy": correct.double().mean().item(),
        "decomposition": {"in": _mean_decomposition(p)},
        "scores": {},
    }
    ood_scores = None
    if ood_probs is not None:
        q = _sample_probs(ood_probs)
        if q.shape[2] != p.shape[2]:
            raise DataError(f"OOD probabilities have {q.shape[2]} classes, in-distribution ones {p.shape[2]}.")
        ood_scores = uncertainty_scores(q)
        report["num_ood_examples"] = q.shape[1]
        report["decomposition"]["out"] = _mean_decomposition(q)
    disagreement = None
    if human_probs is not None:
        h = _as_tensor(human_probs)
        if h.shape != p.shape[1:]:
            raise DataError(f"human_probs must have shape {tuple(p.shape[1:])}, got {tuple(h.shape)}.")
        disagreement = _entropy(h)
    curve_k = [max(int(np.ceil(c * p.shape[1] - 1e-9)), 1) - 1 for c in COVERAGE_GRID]
    curves: dict[str, list[float]] = {"coverage": list(COVERAGE_GRID)}
    for name in SCORES:
        score = scores[name]
        curve = risk_coverage(score, correct)
        row: dict[str, Any] = {"aurc": curve.risk.mean().item(), "excess_aurc": excess_aurc(score, correct)}
        for c in coverages:
            row[f"selective_accuracy@{c:g}"] = selective_accuracy(score, correct, c)
        if ood_scores is not None:
            row["auroc"] = auroc(score, ood_scores[name])
            row["aupr_out"] = aupr(score, ood_scores[name], "out")
            row["aupr_in"] = aupr(score, ood_scores[name], "in")
        if disagreement is not None:
            row["spearman_human_disagreement"] = _nan_to_none(score_correlation(score, disagreement))
        report["scores"][name] = row
        curves[name] = curve.accuracy[curve_k].tolist()
    report["curves"] = curves
    return report


def _mean_decomposition(p: torch.Tensor) -> dict[str, float]:
    parts = decompose(p)
    return {
        "total_entropy": parts.total.mean().item(),
        "expected_entropy": parts.aleatoric.mean().item(),
        "mutual_information": parts.epistemic.mean().item(),
    }


_TABLE_COLUMNS = (
    ("aurc", "AURC ↓"),
    ("selective_accuracy@0.8", "acc@80% ↑"),
    ("auroc", "AUROC ↑"),
    ("aupr_out", "AUPR-Out ↑"),
    ("aupr_in", "AUPR-In ↑"),
    ("spearman_human_disagreement", "Spearman vs raters ↑"),
)


def format_uncertainty_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table with one row per (method, score); columns a report lacks are left out, NaN shows as ``-``.

    Args:
        reports: method name -> report of :func:`uncertainty_report`.
    """
    present = [
        (key, label)
        for key, label in _TABLE_COLUMNS
        if any(key in row for r in reports.values() for row in r["scores"].values())
    ]
    lines = [
        "| method | score | " + " | ".join(label for _, label in present) + " |",
        "|---|---|" + "---:|" * len(present),
    ]
    for method, report in reports.items():
        for score, row in report["scores"].items():
            cells = []
            for key, _ in present:
                value = row.get(key)
                cells.append("-" if value is None or value != value else f"{value:.3f}")
            lines.append(f"| {method} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
