"""Uncertainty decomposition, selective prediction and OOD metrics: known cases and independent references.

References: a NumPy decomposition written from the definitions, an O(N·M) pairwise AUROC, a brute-force
average precision and risk-coverage curve that average over every tie order, and torchmetrics' AUROC and
average precision.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from pyrolora.errors import DataError
from pyrolora.evaluation import uncertainty as U


def _samples(s=7, n=50, c=3, seed=0, concentration=0.8):
    return np.random.default_rng(seed).dirichlet(np.full(c, concentration), size=(s, n))  # (S, N, C)


def _decompose_reference(probs):
    mean = probs.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lambda p: -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)  # noqa: E731
    total, aleatoric = h(mean), h(probs).mean(0)
    return total, aleatoric, total - aleatoric


# --- decomposition -------------------------------------------------------------------------------------------


def test_identical_samples_have_zero_mutual_information():
    one = _samples(s=1)
    probs = np.repeat(one, 5, axis=0)
    parts = U.decompose(probs)
    assert (parts.epistemic == 0).all()  # exactly: a point estimate must not rank examples by rounding noise
    assert (U.uncertainty_scores(probs)["variance"] == 0).all()
    torch.testing.assert_close(parts.total, parts.aleatoric, rtol=0, atol=1e-12)


def test_two_disagreeing_one_hot_samples_give_log2():
    probs = np.array([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # (S=2, N=1, C=3)
    parts = U.decompose(probs)
    # exact values: each sample is certain (H = 0); their average is (½, ½, 0) with entropy log 2
    assert parts.aleatoric.item() == 0.0
    assert parts.total.item() == pytest.approx(math.log(2), abs=1e-15)
    assert parts.epistemic.item() == pytest.approx(math.log(2), abs=1e-15)


def test_uniform_samples_are_purely_aleatoric():
    probs = np.full((4, 2, 5), 0.2)
    parts = U.decompose(probs)
    torch.testing.assert_close(parts.aleatoric, torch.full((2,), math.log(5), dtype=torch.float64))
    assert parts.epistemic.abs().max() < 1e-12  # rounding only


@pytest.mark.parametrize("c", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_decomposition_matches_numpy_reference(c, seed):
    probs = _samples(c=c, seed=seed)
    total, aleatoric, mi = _decompose_reference(probs)
    parts = U.decompose(probs)
    # float64 on both sides: agreement to 1e-12 is rounding only
    np.testing.assert_allclose(parts.total.numpy(), total, atol=1e-12)
    np.testing.assert_allclose(parts.aleatoric.numpy(), aleatoric, atol=1e-12)
    np.testing.assert_allclose(parts.epistemic.numpy(), mi, atol=1e-12)
    assert (parts.epistemic >= 0).all()
    scores = U.uncertainty_scores(probs)
    np.testing.assert_allclose(scores["max_prob"].numpy(), 1 - probs.mean(0).max(-1), atol=1e-12)
    np.testing.assert_allclose(scores["variance"].numpy(), probs.var(0).mean(-1), atol=1e-12)


def test_multiple_choice_padding_with_zero_probability_options_changes_nothing():
    three = _samples(c=3, n=20, seed=4)  # questions with 3 options
    padded = np.concatenate([three, np.zeros((*three.shape[:2], 2))], axis=-1)  # as 5-option questions
    for key, value in U.uncertainty_scores(three).items():
        if key == "variance":  # a mean over options: the padded options dilute it by 3/5 exactly
            torch.testing.assert_close(U.uncertainty_scores(padded)[key], value * 3 / 5)
        else:
            torch.testing.assert_close(U.uncertainty_scores(padded)[key], value, rtol=0, atol=1e-14)


def test_bad_inputs_are_refused():
    with pytest.raises(DataError, match=r"shape \(S, N, C\)"):
        U.decompose(np.full((4, 2), 0.5))
    with pytest.raises(DataError, match="sum to 1"):
        U.decompose(np.full((2, 3, 2), 0.7))
    with pytest.raises(DataError, match="logits"):
        U.decompose(np.array([[[2.0, -1.0]]]))


# --- selective prediction ------------------------------------------------------------------------------------


def _risk_coverage_brute_force(score, correct):
    """Average the risk curve over every order that is consistent with the score ranking (small N only)."""
    n = len(score)
    curves = []
    for perm in itertools.permutations(range(n)):
        if all(score[perm[i]] <= score[perm[i + 1]] for i in range(n - 1)):
            err = np.cumsum([not correct[j] for j in perm])
            curves.append(err / np.arange(1, n + 1))
    return np.mean(curves, axis=0)


@pytest.mark.parametrize("seed", range(4))
def test_risk_coverage_equals_average_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 3, size=7).astype(float)  # many ties
    correct = rng.random(7) < 0.6
    curve = U.risk_coverage(score, correct)
    # exact rational arithmetic on both sides apart from float64 rounding
    np.testing.assert_allclose(curve.risk.numpy(), _risk_coverage_brute_force(score, correct), atol=1e-12)
    np.testing.assert_allclose(curve.coverage.numpy(), np.arange(1, 8) / 7)


def test_aurc_known_values():
    correct = np.array([True, True, False, True])
    # a perfect ranking puts the error last: risks 0, 0, 0, 1/4
    assert U.aurc([0.1, 0.2, 0.9, 0.3], correct) == pytest.approx(0.25 / 4, abs=1e-15)
    assert U.excess_aurc([0.1, 0.2, 0.9, 0.3], correct) == pytest.approx(0.0, abs=1e-15)
    # the worst ranking puts it first: risks 1, 1/2, 1/3, 1/4
    assert U.aurc([0.1, 0.2, 0.0, 0.3], correct) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=1e-15)
    # a constant score: the risk at every coverage is the overall error rate
    assert U.aurc(np.zeros(4), correct) == pytest.approx(0.25, abs=1e-15)
    assert U.selective_accuracy([0.1, 0.2, 0.0, 0.3], correct, 0.5) == pytest.approx(0.5, abs=1e-15)
    assert U.selective_accuracy([0.1, 0.2, 0.9, 0.3], correct, 0.75) == 1.0


# --- OOD detection -------------------------------------------------------------------------------------------


def _auroc_pairwise(a, b):
    diff = b[None, :] - a[:, None]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr_against_references(seed, ties):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, 40), rng.normal(0.7, 1, 25)
    if ties:
        a, b = np.round(a), np.round(b)  # few distinct values: exercises tie handling
    # float64 sums of at most 65 terms: 1e-12 is rounding only
    assert U.auroc(a, b) == pytest.approx(_auroc_pairwise(a, b), abs=1e-12)
    scores = torch.tensor(np.concatenate([a, b]))
    target = torch.tensor([0] * len(a) + [1] * len(b))
    # torchmetrics computes in float32 internally (its thresholds and cumulative sums): 1e-6
    assert U.auroc(a, b) == pytest.approx(binary_auroc(scores, target).item(), abs=1e-6)
    assert U.aupr(a, b, "out") == pytest.approx(binary_average_precision(scores, target).item(), abs=1e-6)
    assert U.aupr(a, b, "in") == pytest.approx(binary_average_precision(-scores, 1 - target).item(), abs=1e-6)


def test_ood_known_values():
    assert U.auroc([0.0, 0.1], [0.5, 0.9, 0.7]) == 1.0
    assert U.auroc([0.5, 0.9], [0.0, 0.1]) == 0.0
    assert U.auroc(np.zeros(3), np.zeros(5)) == 0.5  # a constant score cannot separate anything
    assert U.aupr(np.zeros(3), np.zeros(5), "out") == pytest.approx(5 / 8, abs=1e-15)  # the positive rate
    assert U.aupr([0.0, 0.1], [0.5, 0.9, 0.7], "out") == 1.0
    # one in-distribution example ranked above both OOD examples: precision 1/2 at the first, 2/3 at the second
    assert U.aupr([0.95, 0.1], [0.5, 0.9], "out") == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-15)


# --- report --------------------------------------------------------------------------------------------------


def test_report_for_a_point_estimate_and_a_sampling_method():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    one = _samples(s=1, n=60, c=2, seed=1)
    human = _samples(s=1, n=60, c=2, seed=2)[0]
    ood = _samples(s=5, n=30, c=2, seed=3, concentration=5.0)  # near-uniform: high entropy
    point = U.uncertainty_report(np.repeat(one, 3, 0), labels, ood_probs=np.repeat(ood[:1], 3, 0), human_probs=human)
    # S identical samples: no epistemic signal, so MI and variance rank nothing
    assert point["scores"]["mutual_information"]["auroc"] == 0.5
    assert point["scores"]["mutual_information"]["spearman_human_disagreement"] is None
    assert point["scores"]["entropy"]["auroc"] > 0.7  # near-uniform OOD rows are far more entropic (measured 0.9)
    sampled = U.uncertainty_report(_samples(s=5, n=60, c=2, seed=5), labels, ood_probs=ood, human_probs=human)
    assert set(sampled["scores"]) == set(U.SCORES)
    assert set(sampled["decomposition"]) == {"in", "out"}
    d = sampled["decomposition"]["in"]
    assert d["total_entropy"] == pytest.approx(d["expected_entropy"] + d["mutual_information"], abs=1e-12)
    assert len(sampled["curves"]["entropy"]) == len(U.COVERAGE_GRID)
    assert sampled["curves"]["entropy"][-1] == pytest.approx(sampled["accuracy"], abs=1e-12)  # full coverage
    table = U.format_uncertainty_table({"MAP": point, "sampled": sampled})
    assert table.count("\n") == 1 + 2 * len(U.SCORES)
    assert "| MAP | mutual_information | " in table and " - |" in table  # NaN Spearman shown as "-"
