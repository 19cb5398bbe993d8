"""One runner for every method on every task: same splits, same loaders, same metrics, same timers.

:func:`run_method` trains the method of ``config.method`` on the task's ``train`` split and evaluates it on
``test`` (the task's dev file) and any extra evaluation split (CoLA's in-domain and out-of-domain dev),
reporting accuracy, ECE, NLL, Brier, MCC, trainable and stored parameters, and train and predict seconds.

Parameter counts include the task head. *Trainable*: what the optimizer updates (guide parameters and head;
LoRA matrices and head). *Stored*: what must be saved to reproduce predictions on top of the frozen backbone
(the guide's state, e.g. μ, L and d for ``lowrank``; D numbers for ``delta``; the LoRA matrices), times the
number of members for an ensemble.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrolora.evaluation import metrics
from pyrolora.runs.build import load_task
from pyrolora.runs.config import RunConfig
from pyrolora.runs.device import resolve_device
from pyrolora.runs.folder import RESULT_FILE, write_json
from pyrolora.runs.methods import Fitted, get
from pyrolora.runs.methods.base import split_metrics

__all__ = ["classification_metrics", "fit_and_predict", "run_method", "split_metrics", "train_method"]


def classification_metrics(probs: torch.Tensor | np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier and MCC of averaged probabilities (N, C) against labels (N,)."""
    return metrics.summary(probs, labels, n_bins=n_bins)


def _eval_names(splits: dict[str, Any]) -> list[str]:
    return [n for n in splits if n not in ("train", "validation")]


def train_method(
    config: RunConfig,
    splits: dict[str, Any],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> Fitted:
    """Train ``config.method`` (looked up in :data:`~pyrolora.runs.methods.METHODS`) on ``splits["train"]``.

    ``device`` overrides ``[train] device``. With ``out``, training may write checkpoints and logs there.
    """
    where = resolve_device(device if device is not None else config.train.device)
    folder = None if out is None else Path(out)
    return get(config.method.name).train(
        config, splits, device=where, progress=progress, out=folder, checkpoint_every=checkpoint_every, resume=resume
    )


def fit_and_predict(
    config: RunConfig,
    splits: dict[str, Any],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    also_mc_dropout: bool = False,
    out: str | Path | None = None,
    autocast: torch.dtype | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one model of ``config`` and predict every evaluation split.

    Returns ``{"probs": {split: (N, C)}, "samples": {split: (S, N, C)}, "train_seconds", "predict_seconds",
    "trainable_params", "stored_params", "device"}`` (``probs`` is the mean of ``samples`` over S; S = 1 for a
    point estimate, M for an ensemble of M members), plus ``"mc_dropout_probs"``, ``"mc_dropout_samples"`` and
    ``"mc_dropout_predict_seconds"`` when ``also_mc_dropout`` and the method can predict with dropout on (the
    same trained model: MC dropout costs no extra training). Every split of ``splits`` except ``train`` and
    ``validation`` is predicted; labels are not needed for that, so unlabelled shifted data
    (:func:`pyrolora.data.texts.unlabelled_split`) can be added as one more split. ``autocast=torch.bfloat16``
    is ``[train] precision = "bf16"``. With ``out``, the run folder is written there, with the metrics of every
    labelled evaluation split.
    """
    if autocast is not None:
        if autocast != torch.bfloat16:
            raise ValueError(f"autocast supports torch.bfloat16 only (precision 'bf16'), got {autocast}.")
        config = config.replace(train={"precision": "bf16"})
    fitted = train_method(
        config, splits, device=device, progress=progress, out=out, checkpoint_every=checkpoint_every, resume=resume
    )
    names = _eval_names(splits)
    samples: dict[str, torch.Tensor] = {}
    result: dict[str, Any] = {"predict_seconds": 0.0, "samples": samples, "train_seconds": fitted.train_seconds}
    for name in names:
        start = time.perf_counter()
        samples[name] = fitted.probs(name)
        result["predict_seconds"] += time.perf_counter() - start
    with_dropout = getattr(fitted, "with_dropout", None)
    if also_mc_dropout and with_dropout is not None and not getattr(fitted, "dropout", False):
        start = time.perf_counter()
        dropout = with_dropout()
        result["mc_dropout_samples"] = {name: dropout.probs(name) for name in names}
        result["mc_dropout_probs"] = {name: s.mean(0) for name, s in result["mc_dropout_samples"].items()}
        result["mc_dropout_predict_seconds"] = time.perf_counter() - start
    result["trainable_params"], result["stored_params"] = fitted.trainable_params, fitted.stored_params
    result["probs"] = {name: s.mean(0) for name, s in samples.items()}
    result["device"] = str(resolve_device(device if device is not None else config.train.device))
    run = getattr(fitted, "run", None)  # a Bayesian run: the posterior temperature chosen on validation (or None)
    result["temperature"] = getattr(getattr(run, "fit_result", None), "temperature", None)
    if out is not None:
        n_bins = config.predict.n_bins
        Path(out).mkdir(parents=True, exist_ok=True)
        fitted.save(Path(out), {n: split_metrics(result["probs"][n], splits[n], n_bins) for n in names})
    return result


def run_method(
    config: RunConfig,
    *,
    splits: dict[str, Any] | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``config.method`` on the task and evaluate it; optionally save into the run folder ``out``.

    Returns:
        ``{"method", "guide", "task", "seed", "metrics": {split: {...}}, "train_seconds", "predict_seconds",
        "trainable_params", "stored_params", "device"}``, also written to ``out/result.json``.
    """
    splits = splits if splits is not None else load_task(config.task)
    names = _eval_names(splits)
    n_bins = config.predict.n_bins
    done = fit_and_predict(
        config, splits, device=device, progress=progress, out=out, checkpoint_every=checkpoint_every, resume=resume
    )
    result = {
        "method": config.method.name,
        "guide": config.guide.name,
        "task": config.task.name,
        "seed": config.train.seed,
        "metrics": {n: classification_metrics(done["probs"][n], splits[n].labels, n_bins) for n in names},
        **{k: done[k] for k in ("train_seconds", "predict_seconds", "trainable_params", "stored_params", "device")},
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / RESULT_FILE, result)
    return result
