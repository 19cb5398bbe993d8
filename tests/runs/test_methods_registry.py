"""Every method through ``METHODS[name]`` gives the metrics the code before the registry gave, and the run folders
that code wrote still load to the same predictions (``tests/runs/old_folders``, see ``make_old_folders.py``)."""

import json
from pathlib import Path

import pytest

from pyrolora.runs.config import RunConfig
from pyrolora.runs.methods import METHODS
from pyrolora.runs.runner import run_method, split_metrics
from pyrolora.runs.trained import load_trained
from tests.runs.make_old_folders import HERE, config_dict
from tests.runs.make_old_folders import METHODS as RECORDED_METHODS

ROOT = Path(__file__).parents[2]
RECORDED = json.loads((HERE / "metrics.json").read_text(encoding="utf-8"))
KEYS = ("accuracy", "ece", "nll", "brier", "mcc", "num_examples")


@pytest.fixture
def at_root(monkeypatch):
    """The recorded configs name their task folder relative to the repository root."""
    monkeypatch.chdir(ROOT)


def test_every_method_of_the_configs_is_registered_under_its_name():
    assert set(METHODS) == {"bayesian", "mc_dropout", "ensemble", "peft_lora"}
    assert all(method.name == name for name, method in METHODS.items())


@pytest.mark.parametrize("name", list(RECORDED_METHODS))
def test_old_run_folders_load_to_the_recorded_metrics(name, at_root, tiny_model_dir):
    trained = load_trained(HERE / name, model_name=str(tiny_model_dir))
    got = split_metrics(trained.probs("test").mean(0), trained.splits["test"], trained.config.predict.n_bins)
    for key in KEYS:
        # the same saved weights, draws (seed 0) and batches on the CPU: equal up to float32 summation order
        assert got[key] == pytest.approx(RECORDED[name]["loaded"][key], abs=1e-6), key


@pytest.mark.parametrize("name", list(RECORDED_METHODS))
def test_training_through_the_registry_gives_the_recorded_metrics(name, at_root, tiny_model_dir, tmp_path):
    config = RunConfig.from_dict(config_dict(str(tiny_model_dir), name))
    result = run_method(config, out=tmp_path / name, device="cpu", progress=False)
    assert result["device"] == "cpu"
    for key in KEYS:
        # the same seeds, initialisation and batch order on the CPU; 1e-5 allows float32 summation order only
        assert result["metrics"]["test"][key] == pytest.approx(RECORDED[name]["trained"][key], abs=1e-5), key
    again = load_trained(tmp_path / name)
    got = split_metrics(again.probs("test").mean(0), again.splits["test"], config.predict.n_bins)
    assert got["nll"] == pytest.approx(result["metrics"]["test"]["nll"], abs=1e-6)
