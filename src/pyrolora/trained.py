"""Load the run folder of any method that ``pyrolora train`` writes, as one probability function.

:func:`load_trained` reads the folder's ``config.json``, rebuilds what the method needs and returns a
:class:`Trained`, whose :meth:`~Trained.probs` maps any split of the task (or of another task of the same kind,
see :meth:`~Trained.use_task`) to per-sample probabilities of shape (S, N, C): the
:data:`~pyrolora.uncertainty.ProbsFn` that ``pyrolora evaluate`` and the uncertainty report share.

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

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrolora._integrity import check_frozen_backbone
from pyrolora.baselines import mc_dropout, predict_point
from pyrolora.config import RunConfig
from pyrolora.data import ClassificationSplit
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.evaluation import metrics
from pyrolora.experiment import CONFIG_FILE, STATE_FILE, Run, load_run, load_task
from pyrolora.inference import draws_needed, predict
from pyrolora.inference.state import load_state
from pyrolora.runfolder import MANIFEST_FILE, check_model, verify_files

__all__ = ["METHODS", "Trained", "load_trained", "other_task_splits", "shifted_data", "split_metrics"]

#: The methods whose run folders :func:`load_trained` reads.
METHODS = ("bayesian", "mc_dropout", "ensemble", "peft_lora")


@dataclass
class Trained:
    """A trained method loaded from its run folder: a probability function over the splits of its task.

    Attributes:
        config: the folder's configuration (``method.name`` says which method).
        run: the rebuilt run that lends tokenizer, loaders and splits (for an ensemble, the shared model into
            which each member's posterior is loaded in turn; for peft LoRA, the backbone with peft's layers).
        directory: the run folder.
    """

    config: RunConfig
    run: Run
    directory: Path
    _members: tuple[Path, ...] = ()
    progress: bool = False
    other_task: str | None = None  # set by use_task

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
        detail = "" if self.method == "peft_lora" else f", {self.config.guide.name}"
        return f"{self.directory.name} ({self.method}{detail})"

    def probs(self, split: str | ClassificationSplit) -> torch.Tensor:
        """Per-sample probabilities (S, N, C) of a split of the task (a name or a split object).

        A :data:`~pyrolora.uncertainty.ProbsFn`: pass ``trained.probs`` to
        :func:`~pyrolora.uncertainty.evaluate_uncertainty`.
        """
        data = self.splits[split] if isinstance(split, str) else split
        if self.method == "peft_lora":
            return predict_point(self.run.model.backbone, self.run.loader(data), progress=self.progress)[None]
        if self.method == "ensemble":
            means = []
            for member in self._members:  # one shared model; each member's posterior and head loaded in turn
                load_state(member / STATE_FILE, self.run.model, self.run.guide)
                means.append(self._bma(data).mean(0))  # (N, C): the member's own BMA mean, as the runner's
            return torch.stack(means)  # (M, N, C)
        with mc_dropout(self.run.model.backbone) if self.method == "mc_dropout" else contextlib.nullcontext():
            return self._bma(data)

    def _bma(self, data: Any) -> torch.Tensor:
        dropout = self.method == "mc_dropout"
        s = draws_needed(self.run.guide, self.run.config.predict.num_samples, dropout=dropout)  # (a MAP: one draw)
        loader = self.run.loader(data)
        return predict(self.run.model, self.run.guide, loader, num_samples=s, seed=0, progress=self.progress).probs

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


def split_metrics(probs: torch.Tensor, split: Any, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier, MCC (and Spearman with rater disagreement) of averaged probabilities (N, C).

    The same numbers as :func:`pyrolora.experiment.evaluate` for the same probabilities.
    """
    from pyrolora.runner import classification_metrics

    labels = np.asarray(split.labels)
    result = classification_metrics(probs, labels, n_bins)
    if split.human_probs is not None:
        result["spearman_human_disagreement"] = metrics.rank_correlation(
            metrics.entropy(probs), metrics.entropy(split.human_probs)
        )
    return result


def _read_config(directory: Path) -> RunConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(
            f"{directory} has no {CONFIG_FILE}: it is not a run folder of `pyrolora train` (which writes it when "
            "training starts), or its training stopped before it began. Train it again."
        )
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {path}: {err}") from err
    except ConfigError as err:
        raise RunFolderError(f"{path} is not a valid run configuration: {err}") from err


def _member_folders(directory: Path, config: RunConfig) -> Iterator[Path]:
    size = config.method.ensemble_size
    for i in range(size):
        member = directory / f"member-{i}"
        if not (member / MANIFEST_FILE).is_file():
            raise RunFolderError(
                f"the ensemble in {directory} has {size} members, but {member} is missing or incomplete (no "
                f"{MANIFEST_FILE}); copy the whole run folder, or train the ensemble again."
            )
        yield member


def load_trained(directory: str | Path, *, model_name: str | None = None, progress: bool = False) -> Trained:
    """Load the run folder of any method (see the module docstring) as a :class:`Trained`.

    Args:
        directory: a folder written by ``pyrolora train`` (or :func:`pyrolora.runner.run_method` with ``out``).
        model_name: load the base model from here instead of the name in the run's config (a local copy).
        progress: progress bars over prediction batches.

    Raises:
        RunFolderError: the folder is missing, incomplete or corrupt (the message names the file and the fix).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RunFolderError(f"{directory} is not a folder; give the run folder written by `pyrolora train`.")
    method = _folder_method(directory)
    if method not in ("ensemble", "peft_lora") and (directory / MANIFEST_FILE).is_file():
        run = load_run(directory, model_name=model_name)  # bayesian, mc_dropout: a save_run folder, checked in full
        return Trained(run.config, run, directory, progress=progress)
    config = _read_config(directory)
    if model_name is not None:
        config = config.replace(model={"name": model_name})
    method = config.method.name
    if method == "ensemble":
        members = tuple(_member_folders(directory, config))
        verify_files(directory)  # the ensemble's manifest covers config.json and every member's manifest
        run = load_run(members[0], model_name=model_name)
        for member in members[1:]:  # every member must fit the shared model before anything is predicted
            check_model(verify_files(member), run.model, member)
        return Trained(config, run, directory, members, progress=progress)
    if method == "peft_lora":
        manifest = verify_files(directory)  # every method's folder has a manifest: size and SHA-256 of its files
        return Trained(config, _load_peft_lora(directory, config, manifest), directory, progress=progress)
    raise RunFolderError(
        f"{directory} holds a config.json of method {method!r} but no {MANIFEST_FILE}: the run was not saved "
        "completely (the manifest is written last). "
        + (
            f"Continue it: pyrolora train --config {directory / CONFIG_FILE} --out {directory} --resume."
            if (directory / "checkpoint.safetensors").is_file()
            else "Train it again."
        )
    )


def _folder_method(directory: Path) -> str | None:
    """The method named in a folder's config.json, or None when it cannot be read (load_run then says why)."""
    try:
        return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))["method"]["name"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        return None


def _load_peft_lora(directory: Path, config: RunConfig, manifest: dict[str, Any]) -> Run:
    """Rebuild backbone, peft LoRA and head as the runner trained them, and load the saved tensors into them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pyrolora.runner import PEFT_LORA_FILE, PEFT_LORA_FORMAT, peft_lora_run

    path = directory / PEFT_LORA_FILE
    if not path.is_file():
        raise RunFolderError(
            f"{directory} is a peft LoRA run without {PEFT_LORA_FILE}; training was interrupted before it was "
            "saved. Train it again."
        )
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            fmt = (handle.metadata() or {}).get("format", PEFT_LORA_FORMAT)  # files of older versions had none
    except Exception as err:  # OSError, or safetensors' own error on a corrupt or truncated file
        raise RunFolderError(f"cannot read {path}: {err}; copy the run folder again.") from err
    if fmt != PEFT_LORA_FORMAT:
        raise RunFolderError(f"{path} has format {fmt!r}; this version of pyrolora reads {PEFT_LORA_FORMAT!r}.")
    run, _, _ = peft_lora_run(config, load_task(config.task))
    backbone = run.model.backbone
    check_frozen_backbone(manifest, backbone, directory)
    params = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise RunFolderError(
            f"{path} does not fit the model of its config.json (missing {missing}, unexpected {extra}); the "
            "folder's files come from different runs. Train it again."
        )
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise RunFolderError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model's {tuple(param.shape)}."
                )
            param.copy_(tensors[name])
    backbone.eval()
    return run
