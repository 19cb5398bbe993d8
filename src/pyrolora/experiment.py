"""Runs: build a backbone, adapters, model and guide from a :class:`RunConfig`; train, evaluate, save, load.

This is the one place where every room of the package is composed. A run folder holds::

    config.json          the RunConfig, the package version
    state.safetensors    guide parameters and the task head (no pickle)
    fit.json             loss history and timing
    metrics.json         evaluation results (after evaluate)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pyrolora._version import __version__
from pyrolora.adapters import inject_adapters
from pyrolora.backbones import load_sequence_classifier, load_tokenizer
from pyrolora.config import RunConfig, TaskSpec
from pyrolora.data import ClassificationSplit, TokenizedLoader, vader_splits
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.evaluation import metrics
from pyrolora.inference import FitResult, Prediction, distributed, fit, guides, predict
from pyrolora.inference.state import load_state, save_state
from pyrolora.models import BayesianLoraModel, priors

__all__ = ["Evaluation", "Run", "build", "evaluate", "load_run", "load_task", "save_run", "train"]

CONFIG_FILE = "config.json"
STATE_FILE = "state.safetensors"
FIT_FILE = "fit.json"
METRICS_FILE = "metrics.json"


def load_task(spec: TaskSpec) -> dict[str, ClassificationSplit]:
    """The splits (``train``, ``validation``, ``test``) of the configured task."""
    if spec.name == "vader":
        return vader_splits(neutral_margin=spec.neutral_margin)
    raise ConfigError(f"unknown task {spec.name!r}.")


@dataclass
class Run:
    """A built (and possibly trained) run: everything needed to predict and to save."""

    config: RunConfig
    model: BayesianLoraModel
    guide: nn.Module
    tokenizer: Any
    splits: dict[str, ClassificationSplit]
    fit_result: FitResult | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def loader(self, split: str | ClassificationSplit, *, shuffle: bool = False) -> TokenizedLoader:
        """Batches of a named split (or of any split of the same task) for training or prediction."""
        data = self.splits[split] if isinstance(split, str) else split
        batch = self.config.train.batch_size if shuffle else self.config.predict.batch_size
        return TokenizedLoader(
            data,
            self.tokenizer,
            batch_size=batch,
            max_length=self.config.model.max_length,
            shuffle=shuffle,
            seed=self.config.train.seed,
        )


def build(config: RunConfig, splits: dict[str, ClassificationSplit] | None = None) -> Run:
    """Load the backbone and tokenizer, inject adapters, and compose model and (unfitted) guide."""
    splits = splits if splits is not None else load_task(config.task)
    train_split = splits["train"]
    backbone = load_sequence_classifier(config.model.name, train_split.num_classes, seed=config.train.seed)
    tokenizer = load_tokenizer(config.model.name)
    adapters = inject_adapters(backbone, config.adapters)
    model = BayesianLoraModel(
        backbone,
        adapters,
        prior=priors.IsotropicNormal(config.prior.scale),
        dataset_size=len(train_split),
    )
    guide = guides.make(config.guide.name, model, **config.guide.options)
    return Run(config=config, model=model, guide=guide, tokenizer=tokenizer, splits=splits)


def train(config: RunConfig, *, progress: bool = True, splits: dict[str, ClassificationSplit] | None = None) -> Run:
    """Build a run and fit its guide and head on the ``train`` split."""
    run = build(config, splits)
    if distributed.is_distributed():  # under torchrun: one device per process (cuda:LOCAL_RANK on a GPU machine)
        run.model.to(distributed.device())
    t = config.train
    run.fit_result = fit(
        run.model,
        run.guide,
        run.loader("train", shuffle=True),
        num_epochs=t.epochs,
        lr=t.lr,
        head_lr=t.head_lr,
        warmup=t.warmup,
        schedule=t.schedule,
        clip_norm=t.clip_norm,
        num_particles=t.num_particles,
        seed=t.seed,
        progress=progress,
    )
    return run


@dataclass
class Evaluation:
    """Metrics of one run on one split, and the predictions behind them."""

    metrics: dict[str, float]
    prediction: Prediction
    labels: np.ndarray
    human_probs: np.ndarray | None


def evaluate(
    run: Run, split: str | ClassificationSplit = "test", *, seed: int = 0, progress: bool = False
) -> Evaluation:
    """Predict with S posterior samples and compute accuracy, ECE, NLL, Brier (and MCC).

    When the split carries human label distributions, also the Spearman rank correlation between the
    model's predictive entropy and the entropy of the human label distribution (rater disagreement).
    """
    data = run.splits[split] if isinstance(split, str) else split
    p = run.config.predict
    prediction = predict(
        run.model, run.guide, run.loader(data), num_samples=p.num_samples, seed=seed, progress=progress
    )
    probs, labels = prediction.mean, data.labels
    result = {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=p.n_bins),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "mcc": metrics.mcc(probs, labels),
        "num_examples": len(data),
    }
    if data.human_probs is not None:
        result["spearman_human_disagreement"] = metrics.rank_correlation(
            metrics.entropy(probs), metrics.entropy(data.human_probs)
        )
    return Evaluation(result, prediction, np.asarray(labels), data.human_probs)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run(run: Run, directory: str | Path) -> Path:
    """Save configuration (JSON), posterior and head (safetensors), fit history and metrics into ``directory``.

    In a distributed job only the main process writes (every process holds the same run).
    """
    directory = Path(directory)
    if not distributed.is_main_process():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / CONFIG_FILE, {"pyrolora_version": __version__, **run.config.to_dict()})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{STATE_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_state(tmp, run.model, run.guide)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if run.fit_result is not None:
        r = run.fit_result
        _write_json(
            directory / FIT_FILE,
            {
                "num_steps": r.num_steps,
                "seconds": r.seconds,
                "dataset_size": r.dataset_size,
                "losses": r.losses,
            },
        )
    if run.metrics:
        _write_json(directory / METRICS_FILE, run.metrics)
    return directory


def load_run(directory: str | Path) -> Run:
    """Rebuild a saved run: same backbone, adapters, model and guide, with the saved posterior and head."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise RunFolderError(f"{directory} is not a pyrolora run folder: {CONFIG_FILE} is missing.")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {config_path}: {err}") from err
    config = RunConfig.from_dict(data)
    run = build(config)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise RunFolderError(f"{directory} has no {STATE_FILE}; the run was not saved completely.")
    load_state(state_path, run.model, run.guide)
    fit_path = directory / FIT_FILE
    if fit_path.is_file():
        fit_data = json.loads(fit_path.read_text(encoding="utf-8"))
        run.fit_result = FitResult(
            losses=fit_data["losses"],
            num_steps=fit_data["num_steps"],
            seconds=fit_data["seconds"],
            dataset_size=fit_data["dataset_size"],
        )
    metrics_path = directory / METRICS_FILE
    if metrics_path.is_file():
        run.metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return run
