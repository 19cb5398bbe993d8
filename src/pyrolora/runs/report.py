"""Uncertainty evaluation of a run: decomposition, selective prediction, OOD detection, agreement with raters.

Composes a trained run (:mod:`pyrolora.runs.build`) with the Pyro-free metrics of
:mod:`pyrolora.evaluation.uncertainty`. The only method-specific piece is a *probability function*: a callable
that maps a :class:`~pyrolora.data.ClassificationSplit` to per-sample probabilities of shape (S, N, C). For a
Bayesian run it draws S posterior samples (:func:`run_probs`); an ensemble stacks its members' softmax outputs,
MC dropout its S stochastic passes. Everything downstream is the same for all of them.
:func:`pyrolora.runs.trained.load_trained` gives this function (``Trained.probs``) for the run folder of every method.

``pyrolora evaluate RUN_DIR --ood DATA`` writes into the run folder::

    uncertainty.json        the report of :func:`~pyrolora.evaluation.uncertainty.uncertainty_report`, plus
                            which split it was computed on and which shifted data
                            (``ood_source``: a file, another split, or another task)
    accuracy_coverage.png   accuracy-coverage curves of every score
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pyrolora.data import ClassificationSplit
from pyrolora.evaluation.uncertainty import uncertainty_report
from pyrolora.inference import predict
from pyrolora.runs.build import Run
from pyrolora.runs.folder import PLOT_FILE, UNCERTAINTY_FILE, write_json

__all__ = [
    "PLOT_FILE",
    "UNCERTAINTY_FILE",
    "ProbsFn",
    "evaluate_uncertainty",
    "pad_classes",
    "run_probs",
    "save_uncertainty",
]


#: split -> per-sample probabilities (S, N, C).
ProbsFn = Callable[[ClassificationSplit], torch.Tensor]


def run_probs(run: Run, *, num_samples: int | None = None, seed: int = 0, progress: bool = False) -> ProbsFn:
    """The probability function of a Bayesian run: S draws from its guide (the same draws for every split).

    Args:
        run: a trained or loaded run.
        num_samples: S; default the run's ``predict.num_samples``.
        seed: seed of the posterior draws; with the default 0 they are the draws :func:`pyrolora.runs.build.evaluate`
            uses, so the in-distribution and OOD predictions come from the same S models.
        progress: progress bars over batches.
    """
    s = run.config.predict.num_samples if num_samples is None else num_samples

    def probs(split: ClassificationSplit) -> torch.Tensor:
        return predict(run.model, run.guide, run.loader(split), num_samples=s, seed=seed, progress=progress).probs

    return probs


def pad_classes(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Probabilities (..., C) padded with zero columns to (..., num_classes) (options a question lacks).

    Zero-probability classes change no entropy, mutual information or maximum probability.
    """
    return torch.nn.functional.pad(probs, (0, num_classes - probs.shape[-1]))


def evaluate_uncertainty(
    probs_fn: ProbsFn,
    split: ClassificationSplit,
    ood: ClassificationSplit | None = None,
    *,
    probs: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The uncertainty report of one method on one labelled split, optionally against shifted data.

    Args:
        probs_fn: the method's probability function (see the module docstring).
        split: the in-distribution evaluation split; its ``human_probs``, if any, give rater disagreement.
        ood: shifted data (labels unused): unlabelled texts (see :mod:`pyrolora.data.texts`), another split of
            the task, or another task's split (:func:`pyrolora.runs.trained.shifted_data`). Multiple-choice questions
            with a different number of options are compared with the missing options at probability 0.
        probs: already computed per-sample probabilities on ``split``, shape (S, N, C), to skip predicting again.
    """
    in_probs = probs_fn(split) if probs is None else probs
    ood_probs = None if ood is None else probs_fn(ood)
    if ood_probs is not None and ood_probs.shape[-1] != in_probs.shape[-1]:
        # multiple choice with more options on one side: the other side's missing options have probability 0
        classes = max(ood_probs.shape[-1], in_probs.shape[-1])
        in_probs, ood_probs = pad_classes(in_probs, classes), pad_classes(ood_probs, classes)
    return uncertainty_report(in_probs, split.labels, ood_probs=ood_probs, human_probs=split.human_probs)


def save_uncertainty(
    report: Mapping[str, Any], directory: str | Path, *, title: str = "", info: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write the report (JSON, atomically, ``info`` merged in) and its accuracy-coverage plot into ``directory``."""
    from pyrolora.evaluation.plots import accuracy_coverage_plot

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / UNCERTAINTY_FILE
    write_json(json_path, {**(info or {}), **report})
    plot_path = accuracy_coverage_plot({title or directory.name: report}, directory / PLOT_FILE)
    return json_path, plot_path
