"""`pyrolora evaluate RUN_DIR --ood DATA` end to end on the real all-MiniLM-L6-v2 at a tiny size, and the
method-agnostic runner with a stand-in ensemble."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.data import ClassificationSplit
from pyrolora.data.texts import unlabelled_split
from pyrolora.evaluation.uncertainty import SCORES, uncertainty_report
from pyrolora.inference import predict
from pyrolora.runs.build import save_run, train
from pyrolora.runs.config import RunConfig
from pyrolora.runs.report import PLOT_FILE, UNCERTAINTY_FILE, evaluate_uncertainty


def _split(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return ClassificationSplit(
        texts=tuple(f"t{i}" for i in range(n)),
        labels=rng.integers(0, 2, n),
        label_names=("neg", "pos"),
        human_probs=rng.dirichlet([1.0, 1.0], n),
    )


def test_any_method_that_returns_sample_probabilities_plugs_in():
    """A stand-in 3-member ensemble: members agree on texts seen in training (t*), disagree on others (o*)."""

    def ensemble(split):
        agree = torch.tensor([t.startswith("t") for t in split.texts])
        members = []
        for m in range(3):
            p = torch.where(agree, torch.tensor(0.8), torch.tensor([0.1, 0.5, 0.9][m]))  # P(pos), (N,)
            members.append(torch.stack([1 - p, p], -1))
        return torch.stack(members)  # (S=3, N, C=2)

    ood = unlabelled_split([f"o{i}" for i in range(20)], ("neg", "pos"))
    report = evaluate_uncertainty(ensemble, _split(), ood)
    # every in-distribution example has MI exactly 0, every OOD one MI > 0: perfect separation by construction
    assert report["scores"]["mutual_information"]["auroc"] == 1.0
    assert report["scores"]["mutual_information"]["aupr_out"] == 1.0
    assert report["decomposition"]["in"]["mutual_information"] == 0.0
    assert report["decomposition"]["out"]["mutual_information"] > 0.1  # MI of (0.1,0.5,0.9) members: 0.18 nats


@pytest.mark.slow
# max_length 12 keeps the run tiny; truncating the long OOD sentences is intended, so its warning is not an error
@pytest.mark.filterwarnings("ignore::pyrolora.errors.TruncationWarning")
def test_cli_evaluate_with_ood_on_a_tiny_real_run(tmp_path, real_model_threads):
    config = RunConfig.from_dict(
        {
            "model": {"max_length": 12},
            "adapters": {"rank": 2, "target_modules": ["query"]},
            "guide": {"name": "diagonal"},
            "train": {"epochs": 0.05, "batch_size": 64},
            "predict": {"num_samples": 3},
        }
    )
    run = train(config, progress=False)
    save_run(run, tmp_path / "run")
    ood_file = tmp_path / "ood.txt"
    ood_texts = [f"this is a rather long sentence number {i} about nothing in particular" for i in range(25)]
    ood_file.write_text("\n".join(ood_texts), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "run"), "--split", "validation", "--ood", str(ood_file)]
    )
    assert result.exit_code == 0, result.output
    assert "| mutual_information |" in result.output and "AUROC" in result.output
    saved = json.loads((tmp_path / "run" / UNCERTAINTY_FILE).read_text())
    assert (tmp_path / "run" / PLOT_FILE).stat().st_size > 10_000  # a real figure, not an empty file
    assert saved["split"] == "validation" and saved["num_ood_examples"] == 25 and saved["num_samples"] == 3
    assert set(saved["scores"]) == set(SCORES)
    # the stored report is exactly what the library computes from the same S = 3 posterior draws (seed 0)
    split = run.splits["validation"]
    probs = predict(run.model, run.guide, run.loader(split), num_samples=3, seed=0).probs
    ood_probs = predict(
        run.model, run.guide, run.loader(unlabelled_split(ood_texts, split.label_names)), num_samples=3, seed=0
    ).probs
    expected = uncertainty_report(probs, split.labels, ood_probs=ood_probs, human_probs=split.human_probs)
    for score in SCORES:
        for key in ("aurc", "auroc", "aupr_out", "spearman_human_disagreement"):
            # float32 forward passes batched identically: the same numbers up to summation order (1e-6)
            assert saved["scores"][score][key] == pytest.approx(expected["scores"][score][key], abs=1e-6)
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--ood", str(tmp_path / "missing.txt")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
