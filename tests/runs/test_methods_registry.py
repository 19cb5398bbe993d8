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


class _Uniform:
    """A toy method: predicts 1/C for every class (S = 1). Used to show that a new method needs nothing else."""

    name = "uniform"
    uses_guide = False

    def train(self, config, splits, *, device, progress=True, out=None, checkpoint_every=None, resume=False):
        from pyrolora.runs.build import build

        return _UniformFitted(config, build(config, splits))

    def load(self, directory, config, *, model_name=None, device=None):
        from pyrolora.runs.build import build

        return _UniformFitted(config, build(config))


class _UniformFitted:
    train_seconds = 0.0
    trainable_params = stored_params = 0

    def __init__(self, config, run):
        self.config, self.run = config, run

    def probs(self, data, *, progress=False):
        import torch

        split = self.run.splits[data] if isinstance(data, str) else data
        return torch.full((1, len(split), split.num_classes), 1.0 / split.num_classes)

    def save(self, directory, metrics=None):
        from pyrolora.runs.folder import CONFIG_FILE, write_json

        write_json(directory / CONFIG_FILE, self.config.to_dict())


def test_a_new_method_is_one_class_and_one_registration(at_root, tiny_model_dir, tmp_path, monkeypatch):
    import math

    from pyrolora.errors import ConfigError
    from pyrolora.runs.methods import Fitted, get

    config = RunConfig.from_dict({**config_dict(str(tiny_model_dir), "bayesian-delta"), "method": {"name": "uniform"}})
    with pytest.raises(ConfigError, match="unknown method 'uniform'; the registered methods are"):
        get("uniform")
    monkeypatch.setitem(METHODS, "uniform", _Uniform())
    result = run_method(config, out=tmp_path / "u", device="cpu", progress=False)
    # 1/2 for each of 2 classes: NLL log 2, Brier 2 · (1/2)² = 0.5, whatever the labels
    assert result["metrics"]["test"]["nll"] == pytest.approx(math.log(2), abs=1e-12)
    assert result["metrics"]["test"]["brier"] == pytest.approx(0.5, abs=1e-12)
    trained = load_trained(tmp_path / "u")
    assert isinstance(trained.fitted, Fitted) and trained.description == "u (uniform)"
    assert trained.probs("test").shape == (1, 12, 2)
