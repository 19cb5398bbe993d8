"""The run machinery (config -> train -> save -> load -> evaluate) with a family that is not plain SVI.

On the real all-MiniLM-L6-v2 and VADER at reduced size: SWAG (MAP, then collection) and NUTS (chains) are
trained through ``experiment.train`` exactly as the CLI does, saved, reloaded and must predict identically. (NUTS
goes through the same ``fit_posterior`` path but each of its gradients is a full pass over the training set, too
slow for CI on a real backbone; its run-machinery contract is covered on the tiny model in
tests/inference/test_zoo.py.)
"""

import pytest

from pyrolora.data import ClassificationSplit
from pyrolora.runs.build import evaluate, load_run, save_run, train
from pyrolora.runs.config import RunConfig

pytestmark = pytest.mark.slow

BASE = {
    "model": {"max_length": 16},
    # One module on the last layer: D = 16 latents.
    "adapters": {"rank": 4, "target_modules": ["layer.5.attention.self.value"]},
    "predict": {"num_samples": 4, "batch_size": 256},
}


def test_swag_trains_saves_and_reloads_through_the_run_machinery(tmp_path, real_model_threads):
    guide = {"name": "swag", "options": {"rank": 5, "start": 0.5, "frequency": 1}}
    epochs = 0.05  # 4 steps of 64: 2 MAP steps, then 2 collected iterates
    config = RunConfig.from_dict({**BASE, "guide": guide, "train": {"epochs": epochs, "batch_size": 64}})
    run = train(config, progress=False)
    assert run.guide.num_collected >= 2
    val = run.splits["validation"]
    subset = ClassificationSplit(texts=val.texts[:256], labels=val.labels[:256], label_names=val.label_names)
    first = evaluate(run, subset).metrics
    save_run(run, tmp_path)
    again = evaluate(load_run(tmp_path), subset).metrics
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == first[key]  # same state, same seed: identical predictions
    assert 0.0 < first["nll"] < 2.0  # finite and not degenerate on 3 classes
