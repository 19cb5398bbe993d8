"""``bayesian``: the ``[guide]`` fit by its family's procedure (SVI; MAP then Hessian, collection or chains for
laplace, swag and nuts), predicted by Bayesian model averaging over S posterior draws.

``delta`` is LoRA-XS MAP (S = 1: every draw is the same point), ``lowrank`` B-LoRA-XS, any registered guide
works. The run folder is :func:`~pyrolora.runs.build.save_run`'s (config, state, fit record, metrics, manifest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyrolora.errors import RunFolderError
from pyrolora.inference import draws_needed, predict
from pyrolora.runs.build import Run, load_run, save_run, train
from pyrolora.runs.config import RunConfig
from pyrolora.runs.folder import CHECKPOINT_FILE, CONFIG_FILE, MANIFEST_FILE
from pyrolora.runs.methods.base import count_numel, register
from pyrolora.runs.methods.dropout import mc_dropout

__all__ = ["Bayesian", "FittedRun"]


@dataclass
class FittedRun:
    """A trained or loaded Pyro run (model, guide, head) as a :class:`~pyrolora.runs.methods.base.Fitted`.

    ``dropout``: predict with the backbone's dropout layers sampling, one mask per draw (MC dropout).
    """

    config: RunConfig
    run: Run
    dropout: bool = False

    @property
    def train_seconds(self) -> float:
        return self.run.fit_result.seconds if self.run.fit_result is not None else 0.0

    @property
    def trainable_params(self) -> int:
        head = count_numel(self.run.model.head_parameters())
        return count_numel(p for p in self.run.guide.parameters() if p.requires_grad) + head

    @property
    def stored_params(self) -> int:
        guide = count_numel(self.run.guide.state_dict().values())
        return guide + count_numel(self.run.model.head_state().values())

    def probs(self, data: Any, *, progress: bool = False) -> torch.Tensor:
        """Per-sample probabilities (S, N, C): S posterior draws (S = 1 for a point mass), or S dropout masks."""
        run = self.run
        s = draws_needed(run.guide, run.config.predict.num_samples, dropout=self.dropout)  # (a MAP: one draw)
        loader = run.loader(data)
        with mc_dropout(run.model.backbone) if self.dropout else contextlib.nullcontext():
            return predict(
                run.model,
                run.guide,
                loader,
                num_samples=s,
                seed=0,
                progress=progress,
                precision=run.config.train.precision,
            ).probs

    def with_dropout(self) -> FittedRun:
        """The same trained run predicted with MC dropout (no extra training)."""
        return FittedRun(self.config, self.run, dropout=True)

    def save(self, directory: Path, metrics: Mapping[str, Any] | None = None) -> None:
        if metrics is not None:
            self.run.metrics = dict(metrics)
        save_run(self.run, directory)
        (Path(directory) / CHECKPOINT_FILE).unlink(missing_ok=True)  # the folder is complete: no resume needed


class Bayesian:
    """The ``[guide]`` fit to the posterior of the LoRA-XS cores, predicted by model averaging."""

    name = "bayesian"
    uses_guide = True
    dropout = False

    def check(self, run: Run) -> None:
        """Refuse a built run this method cannot train (before training, not after it)."""

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
    ) -> FittedRun:
        """Build, move to ``device`` and fit; with ``out``, checkpoints (and ``[log]`` logs) go there."""
        run = train(
            config,
            progress=progress,
            splits=splits,
            log_dir=out,
            checkpoint_dir=out,
            checkpoint_every=checkpoint_every,
            resume=resume,
            device=str(device),
            check=self.check,
        )
        return FittedRun(config, run, dropout=self.dropout)

    def load(
        self, directory: Path, config: RunConfig, *, model_name: str | None = None, device: torch.device | None = None
    ) -> FittedRun:
        if not (Path(directory) / MANIFEST_FILE).is_file():
            raise RunFolderError(
                f"{directory} holds a config.json of method {config.method.name!r} but no {MANIFEST_FILE}: the run "
                "was not saved completely (the manifest is written last). "
                + (
                    f"Continue it: pyrolora train --config {Path(directory) / CONFIG_FILE} --out {directory} --resume."
                    if (Path(directory) / CHECKPOINT_FILE).is_file()
                    else "Train it again."
                )
            )
        run = load_run(directory, model_name=model_name, device=None if device is None else str(device))
        return FittedRun(run.config, run, dropout=self.dropout)


METHOD = register(Bayesian())
