"""Metrics against plain NumPy references on random inputs."""

import numpy as np
import pytest
import torch

from pyrolora import metrics


def _random(n=500, c=4, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.7), size=n)
    labels = rng.integers(0, c, size=n)
    return probs, labels


def _ece_reference(probs, labels, n_bins):
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def _mcc_reference(pred, labels, c):
    cm = np.zeros((c, c))
    for t, p in zip(labels, pred, strict=True):
        cm[t, p] += 1
    t_k, p_k, correct, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    return (correct * s - t_k @ p_k) / np.sqrt((s**2 - p_k @ p_k) * (s**2 - t_k @ t_k))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [2, 5])
def test_against_numpy_reference(seed, c):
    probs, labels = _random(c=c, seed=seed)
    onehot = np.eye(c)[labels]
    # float64 throughout: agreement to 1e-12 is rounding only
    assert metrics.accuracy(probs, labels) == pytest.approx((probs.argmax(1) == labels).mean(), abs=1e-12)
    assert metrics.nll(probs, labels) == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(), abs=1e-12)
    assert metrics.brier(probs, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-12)
    for bins in (1, 10, 15):
        assert metrics.ece(probs, labels, n_bins=bins) == pytest.approx(_ece_reference(probs, labels, bins), abs=1e-12)
    assert metrics.mcc(probs, labels) == pytest.approx(_mcc_reference(probs.argmax(1), labels, c), abs=1e-12)
    entropy = -(probs * np.log(probs)).sum(1)
    np.testing.assert_allclose(metrics.entropy(probs).numpy(), entropy, atol=1e-12)


def test_torch_and_numpy_inputs_agree():
    probs, labels = _random()
    assert metrics.ece(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)) == pytest.approx(
        metrics.ece(probs, labels),
        abs=1e-6,  # float32 input rounding
    )


def test_known_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    assert metrics.accuracy(probs, labels) == 0.75  # the tie [0.5, 0.5] goes to class 0
    # bins of width 0.5: (0, .5] holds the tie (conf .5, correct); (.5, 1] holds .9, .6, .8 with 2 of 3 right
    expected = 0.25 * abs(1 - 0.5) + 0.75 * abs(2 / 3 - (0.9 + 0.6 + 0.8) / 3)
    assert metrics.ece(probs, labels, n_bins=2) == pytest.approx(expected)
    perfect = np.eye(3)
    assert metrics.ece(perfect, np.arange(3)) == 0.0 and metrics.brier(perfect, np.arange(3)) == 0.0
    assert metrics.mcc(perfect, np.arange(3)) == pytest.approx(1.0)
    assert metrics.mcc(np.tile([[1.0, 0.0]], (4, 1)), np.array([0, 1, 0, 1])) == 0.0  # constant prediction


def test_rank_correlation():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.rank_correlation(a, a**3) == pytest.approx(1.0)
    assert metrics.rank_correlation(a, -a) == pytest.approx(-1.0)


def test_reliability_counts_every_example_once():
    probs, labels = _random(n=321)
    _, _, count = metrics.reliability(probs, labels, n_bins=7)
    assert count.sum().item() == 321


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.ones((3,)), np.zeros(3), "shape"),
        (np.ones((3, 2)) / 2, np.zeros(4), "labels must have shape"),
        (np.ones((3, 2)) / 2, np.array([0, 1, 2]), "labels must lie"),
        (np.ones((0, 2)), np.zeros(0), "at least one"),
    ],
)
def test_bad_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.accuracy(probs, labels)


def test_summary_is_the_individual_metrics_and_adds_rater_agreement_only_when_given():
    from pyrolora.evaluation import metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, size=40)
    got = metrics.summary(probs, labels, n_bins=5)
    assert got == {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=5),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "mcc": metrics.mcc(probs, labels),
        "num_examples": 40,
    }
    human = rng.dirichlet(np.ones(3), size=40)
    with_raters = metrics.summary(probs, labels, human_probs=human, keys=("nll",))
    assert set(with_raters) == {"nll", "num_examples", "spearman_human_disagreement"}
    expected = metrics.rank_correlation(metrics.entropy(probs), metrics.entropy(human))
    assert with_raters["spearman_human_disagreement"] == expected
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.summary(probs, labels, keys=("auc",))
