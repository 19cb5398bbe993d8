"""``ensemble``: ``ensemble_size`` independent ``[guide]`` fits with seeds ``train.seed + i``; each member
predicts its own model average (N, C), and the members are the S = M rows of the per-sample probabilities.

Its run folder holds ``config.json`` and one complete ``bayesian`` run folder per member (``member-0``, ...).
Prediction keeps one model in memory and loads each member's posterior and head into it in turn.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyrolora._atomic import write_json
from pyrolora._manifest import write_method_manifest
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.inference.state import load_state
from pyrolora.runs.build import Run, load_run
from pyrolora.runs.config import RunConfig
from pyrolora.runs.folder import CONFIG_FILE, MANIFEST_FILE, STATE_FILE, check_model, member_folder, verify_files
from pyrolora.runs.methods.base import register, split_metrics
from pyrolora.runs.methods.bayesian import METHOD as BAYESIAN
from pyrolora.runs.methods.bayesian import FittedRun

__all__ = ["Ensemble", "FittedEnsemble"]


@dataclass
class FittedEnsemble:
    """M trained members sharing one model: ``members`` are their run folders."""

    config: RunConfig
    run: Run
    members: tuple[Path, ...]
    train_seconds: float = 0.0
    trainable_params: int = 0
    stored_params: int = 0
    _scratch: Any = field(default=None, repr=False)  # a TemporaryDirectory holding the members of an unsaved run
    #: split name -> (M, N, C), predicted by each member right after its training (no reloading needed)
    _predicted: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def probs(self, data: Any, *, progress: bool = False) -> torch.Tensor:
        """(M, N, C): every member's own model average (its BMA mean over its S draws)."""
        if isinstance(data, str) and data in self._predicted:
            return self._predicted[data]
        means = []
        for member in self.members:
            load_state(member / STATE_FILE, self.run.model, self.run.guide)
            means.append(FittedRun(self.run.config, self.run).probs(data, progress=progress).mean(0))  # (N, C)
        return torch.stack(means)

    def save(self, directory: Path, metrics: Mapping[str, Any] | None = None) -> None:
        """The members were saved as they were trained; this writes the ensemble's ``config.json``, then its
        ``manifest.json`` (last), which covers ``config.json`` and every member's own manifest."""
        directory = Path(directory)
        if self._scratch is not None:
            raise ConfigError("this ensemble was trained without an output folder; train it with out=FOLDER to save.")
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # until the new one is written, the folder reads as unsaved
        write_json(directory / CONFIG_FILE, self.config.to_dict())
        members = [f"{member_folder(directory, i).name}/{MANIFEST_FILE}" for i in range(len(self.members))]
        write_method_manifest(directory, [CONFIG_FILE, *members], method="ensemble", base_model=self.config.model.name)


class Ensemble:
    """Deep ensemble of ``[guide]`` fits."""

    name = "ensemble"
    uses_guide = True

    def member_config(self, config: RunConfig, index: int) -> RunConfig:
        """Member ``index``: a ``bayesian`` run with seed ``train.seed + index``."""
        return config.replace(
            train={"seed": config.train.seed + index},
            method={"name": "bayesian"},
            log={"csv": False, "tensorboard": False},  # no log folder per member
        )

    def train(
        self,
        config: RunConfig,
        splits: dict[str, Any],
        *,
        device: torch.device,
        progress: bool = True,
        out: Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ) -> FittedEnsemble:
        if resume:
            raise ConfigError("ensemble runs are not resumable; train again without --resume.")
        scratch = tempfile.TemporaryDirectory(prefix="pyrolora-ensemble-") if out is None else None
        root = Path(out if out is not None else scratch.name)  # type: ignore[union-attr]
        members, seconds, trainable, stored = [], 0.0, 0, 0
        fitted = None
        names = [n for n in splits if n not in ("train", "validation")]
        predicted: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for index in range(config.method.ensemble_size):
            folder = member_folder(root, index)
            fitted = BAYESIAN.train(self.member_config(config, index), splits, device=device, progress=progress)
            means = {n: fitted.probs(n).mean(0) for n in names}  # (N, C): the member's own model average
            for n in names:
                predicted[n].append(means[n])
            n_bins = config.predict.n_bins
            fitted.save(folder, {n: split_metrics(means[n], splits[n], n_bins) for n in names})  # a whole run folder
            members.append(folder)
            seconds += fitted.train_seconds
            trainable += fitted.trainable_params
            stored += fitted.stored_params
        assert fitted is not None
        stacked = {n: torch.stack(p) for n, p in predicted.items()}  # (M, N, C)
        return FittedEnsemble(config, fitted.run, tuple(members), seconds, trainable, stored, scratch, stacked)

    def load(
        self, directory: Path, config: RunConfig, *, model_name: str | None = None, device: torch.device | None = None
    ) -> FittedEnsemble:
        size = config.method.ensemble_size
        members = []
        for index in range(size):
            member = member_folder(directory, index)
            if not (member / MANIFEST_FILE).is_file():
                raise RunFolderError(
                    f"the ensemble in {directory} has {size} members, but {member} is missing or incomplete (no "
                    f"{MANIFEST_FILE}); copy the whole run folder, or train the ensemble again."
                )
            members.append(member)
        if (Path(directory) / MANIFEST_FILE).is_file():  # folders of versions before the ensemble's manifest lack it
            verify_files(directory)  # it covers config.json and every member's manifest
        run = load_run(members[0], model_name=model_name, device=None if device is None else str(device))
        for member in members[1:]:  # every member must fit the shared model before anything is predicted
            check_model(verify_files(member), run.model, member)
        fitted = FittedRun(run.config, run)
        trainable, stored = fitted.trainable_params * size, fitted.stored_params * size
        return FittedEnsemble(config, run, tuple(members), 0.0, trainable, stored)


register(Ensemble())
