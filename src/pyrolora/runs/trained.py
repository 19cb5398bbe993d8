"""Load the run folder of any method that ``pyrolora train`` writes, as one probability function.

:func:`load_trained` reads the folder's ``config.json``, rebuilds what the method needs and returns a
:class:`Trained`, whose :meth:`~Trained.probs` maps any split of the task (or of another task of the same kind,
see :meth:`~Trained.use_task`) to per-sample probabilities of shape (S, N, C): the
:data:`~pyrolora.runs.report.ProbsFn` that ``pyrolora evaluate`` and the uncertainty report share.

- ``bayesian``: a ``save_run`` folder (manifest, state); S = ``predict.num_samples`` posterior draws (seed 0), or
  1 for a point mass (``delta``: S draws would be S copies).
- ``mc_dropout``: the ``save_run`` folder of the MAP (``delta``); S dropout masks (backbone and adapter dropout).
- ``ensemble``: ``config.json`` and ``member-0`` .. ``member-<M-1>`` (each a ``save_run`` folder); the M rows are
  the members, each its own BMA mean over S draws.
- ``peft_lora``: ``config.json`` and ``peft_lora.safetensors`` (LoRA matrices and head); S = 1, the point estimate.

Every row comes from the same computation the runner used when it trained the method (same seeds, same S), so
``pyrolora evaluate`` reproduces the metrics of ``pyrolora train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrolora.data import ClassificationSplit
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.runs.build import Run, load_task
from pyrolora.runs.config import RunConfig
from pyrolora.runs.device import resolve_device
from pyrolora.runs.folder import MANIFEST_FILE, read_config, verify_files
from pyrolora.runs.methods import METHODS, Fitted, get
from pyrolora.runs.runner import split_metrics

__all__ = ["METHODS", "Trained", "load_trained", "other_task_splits", "shifted_data", "split_metrics"]


@dataclass
class Trained:
    """A trained method loaded from its run folder: a probability function over the splits of its task.

    Attributes:
        fitted: the method's trained model (:class:`~pyrolora.runs.methods.Fitted`).
        directory: the run folder.
    """

    fitted: Fitted
    directory: Path
    progress: bool = False
    other_task: str | None = None  # set by use_task

    @property
    def config(self) -> RunConfig:
        """The folder's configuration (``method.name`` says which method)."""
        return self.fitted.config

    @property
    def run(self) -> Run:
        """The rebuilt run that lends tokenizer, loaders and splits (for an ensemble, the shared model into which
        each member's posterior is loaded in turn; for peft LoRA, the backbone with peft's layers)."""
        return self.fitted.run

    @property
    def task(self) -> str:
        """The name of the task whose splits are in use."""
        return self.other_task or self.config.task.name

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def splits(self) -> dict[str, Any]:
        """The splits of the task in use (the run's own, or another's after :meth:`use_task`)."""
        return self.run.splits

    @property
    def description(self) -> str:
        """``"<folder> (<method>[, <guide>])"``, for tables and reports."""
        detail = f", {self.config.guide.name}" if get(self.method).uses_guide else ""
        return f"{self.directory.name} ({self.method}{detail})"

    def probs(self, split: str | ClassificationSplit) -> torch.Tensor:
        """Per-sample probabilities (S, N, C) of a split of the task (a name or a split object).

        A :data:`~pyrolora.runs.report.ProbsFn`: pass ``trained.probs`` to
        :func:`~pyrolora.runs.report.evaluate_uncertainty`.
        """
        data = self.splits[split] if isinstance(split, str) else split
        return self.fitted.probs(data, progress=self.progress)

    def use_task(self, task: str) -> None:
        """Swap the splits for those of another task of the same kind (distribution shift).

        Raises:
            ConfigError: the task is of another kind (classification versus multiple choice), has another number
                of classes, or (``letters`` scoring) more options than the run has letters for.
        """
        self.run.splits = other_task_splits(self.config, self.run.splits["train"], task)
        self.other_task = task


def other_task_splits(config: RunConfig, train: Any, task: str) -> dict[str, Any]:
    """The splits of ``task``, loaded with the run's task settings, checked against the run's ``train`` split."""
    spec = config.replace(task={"name": task, "path": None, "hub_config": None}).task
    if spec.multiple_choice != config.task.multiple_choice:
        raise ConfigError(f"the run was trained on {config.task.name!r}; {task!r} is a different kind of task.")
    splits = load_task(spec)
    if spec.multiple_choice:
        return {name: match_options(split, train.num_classes, config) for name, split in splits.items()}
    if splits["test"].num_classes != train.num_classes:
        raise ConfigError(f"{task!r} has {splits['test'].num_classes} classes, the run's head has a different number.")
    return splits


def match_options(split: Any, num_options: int, config: RunConfig) -> Any:
    """A multiple-choice split padded to at least the run's C options (missing options are masked).

    With ``loglik`` scoring any number of options can be scored, so a split with more options than the run's
    C keeps them; ``letters`` scoring has a letter for each of the run's C options only.
    """
    if split.num_options > num_options and config.task.scoring == "letters":
        raise ConfigError(
            f"the run scores {num_options} option letters, but these questions have up to {split.num_options} "
            "options; evaluate a run trained with scoring = 'loglik', or a task with as many options."
        )
    return split.with_num_options(max(split.num_options, num_options))


def shifted_data(
    trained: Trained,
    split: str,
    *,
    ood_split: str | None = None,
    ood_task: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Shifted (out-of-distribution) data from another split of the task in use, or from another task's test split.

    Args:
        trained: the loaded method; its splits are those of the task being evaluated.
        split: the in-distribution split (``ood_split`` must differ from it).
        ood_split: a split of the same task, e.g. CoLA's ``out_of_domain`` against ``in_domain``.
        ood_task: another task whose ``test`` split is the shifted data (loaded with the run's task settings,
            e.g. ``max_eval``), e.g. ``openbookqa`` for an ARC-Easy run. Its labels are never used: a
            classification task lends only its texts (any number of classes); a multiple-choice task its
            questions and options, padded to the run's C options as everywhere (masked options have
            probability 0).
        limit: keep a seeded random subset of at most this many examples.
        seed: seed of that subset.

    Returns:
        ``(data, source)``: the split to predict, and a JSON-ready record of where it came from
        (``{"kind": "split" | "task", "task", "split", "num_examples", "limit"}``).

    Raises:
        ConfigError: neither or both of ``ood_split`` and ``ood_task``, an unknown split, or a task of another
            kind.
    """
    if (ood_split is None) == (ood_task is None):
        raise ConfigError("give exactly one source of shifted data: ood_split (same task) or ood_task (another).")
    config, splits = trained.config, trained.splits
    if ood_split is not None:
        if ood_split not in splits or ood_split == split:
            raise ConfigError(
                f"ood_split {ood_split!r} must be another split of the task than {split!r}; the task has "
                f"{sorted(splits)}."
            )
        data = splits[ood_split]
        source = {"kind": "split", "task": trained.task, "split": ood_split}
    else:
        assert ood_task is not None
        spec = config.replace(task={"name": ood_task, "path": None, "hub_config": None}).task
        if spec.multiple_choice != config.task.multiple_choice:
            raise ConfigError(
                f"the run was trained on {config.task.name!r}; {ood_task!r} is a different kind of task, so the "
                "model cannot read its inputs."
            )
        test = load_task(spec)["test"]
        if spec.multiple_choice:
            data = match_options(test, splits[split].num_classes, config)
        else:
            from pyrolora.data.texts import unlabelled_split

            data = unlabelled_split(test.texts, splits[split].label_names, test.text_pairs)
        source = {"kind": "task", "task": ood_task, "split": "test"}
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"the OOD limit must be positive, got {limit}.")
        if limit < len(data):
            data = data.subset(np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False)))
    return data, {**source, "num_examples": len(data), "limit": limit}


def load_trained(
    directory: str | Path, *, model_name: str | None = None, progress: bool = False, device: str | None = None
) -> Trained:
    """Load the run folder of any method (see the module docstring) as a :class:`Trained`.

    Args:
        directory: a folder written by ``pyrolora train`` (or :func:`pyrolora.runs.runner.run_method` with ``out``).
        model_name: load the base model from here instead of the name in the run's config (a local copy).
        progress: progress bars over prediction batches.
        device: where to predict (``"auto"``: CUDA when present); default the CPU.

    Raises:
        RunFolderError: the folder is missing, incomplete or corrupt (the message names the file and the fix).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RunFolderError(f"{directory} is not a folder; give the run folder written by `pyrolora train`.")
    try:
        config = read_config(directory)
    except RunFolderError:
        if (directory / MANIFEST_FILE).is_file():
            verify_files(directory)  # a config.json damaged after saving: name it as corrupt, with the fix
        raise
    if model_name is not None:
        config = config.replace(model={"name": model_name})
    where = None if device is None else resolve_device(device)
    fitted = get(config.method.name).load(directory, config, model_name=model_name, device=where)
    return Trained(fitted, directory, progress=progress)
