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

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrolora.baselines import count_numel, inject_peft_lora, mc_dropout, predict_point, train_peft_lora
from pyrolora.config import RunConfig
from pyrolora.evaluation import metrics
from pyrolora.experiment import Run, _write_json, build, load_task, save_run
from pyrolora.inference import fit, predict

__all__ = ["classification_metrics", "run_method"]


def classification_metrics(probs: torch.Tensor | np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier and MCC of averaged probabilities (N, C) against labels (N,)."""
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=n_bins),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "mcc": metrics.mcc(probs, labels),
        "num_examples": len(labels),
    }


def _eval_names(splits: dict[str, Any]) -> list[str]:
    return [n for n in splits if n not in ("train", "validation")]


def _fit_bayesian(config: RunConfig, splits: dict[str, Any], device: torch.device, progress: bool) -> Run:
    run = build(config, splits)
    run.model.to(device)
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


def _predict_run(run: Run, split: str, *, dropout: bool = False) -> torch.Tensor:
    p = run.config.predict
    with mc_dropout(run.model.backbone) if dropout else contextlib.nullcontext():
        return predict(run.model, run.guide, run.loader(split), num_samples=p.num_samples, seed=0).mean


def _bayesian_counts(run: Run) -> tuple[int, int]:
    head = count_numel(run.model.head_parameters())
    trainable = count_numel(p for p in run.guide.parameters() if p.requires_grad) + head
    stored = count_numel(run.guide.state_dict().values()) + count_numel(run.model.head_state().values())
    return trainable, stored


def run_method(
    config: RunConfig,
    *,
    splits: dict[str, Any] | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config.method`` on the task and evaluate it; optionally save into the run folder ``out``.

    Returns:
        ``{"method", "task", "seed", "metrics": {split: {...}}, "train_seconds", "predict_seconds",
        "trainable_params", "stored_params"}``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = splits if splits is not None else load_task(config.task)
    names = _eval_names(splits)
    method = config.method.name
    n_bins = config.predict.n_bins
    probs: dict[str, torch.Tensor] = {}
    predict_seconds = 0.0
    if method in ("bayesian", "mc_dropout"):
        run = _fit_bayesian(config, splits, device, progress)
        assert run.fit_result is not None
        train_seconds = run.fit_result.seconds
        for name in names:
            start = time.perf_counter()
            probs[name] = _predict_run(run, name, dropout=method == "mc_dropout")
            predict_seconds += time.perf_counter() - start
        trainable, stored = _bayesian_counts(run)
        if out is not None:
            run.metrics = {n: classification_metrics(probs[n], splits[n].labels, n_bins) for n in names}
            save_run(run, out)
    elif method == "ensemble":
        train_seconds, trainable, stored = 0.0, 0, 0
        sums = {n: torch.zeros(len(splits[n]), splits[n].num_classes) for n in names}
        for member in range(config.method.ensemble_size):
            member_config = config.replace(train={"seed": config.train.seed + member}, method={"name": "bayesian"})
            run = _fit_bayesian(member_config, splits, device, progress)
            assert run.fit_result is not None
            train_seconds += run.fit_result.seconds
            for name in names:
                start = time.perf_counter()
                sums[name] += _predict_run(run, name)
                predict_seconds += time.perf_counter() - start
            t, s = _bayesian_counts(run)
            trainable, stored = trainable + t, stored + s
            if out is not None:
                save_run(run, Path(out) / f"member-{member}")
            del run
        probs = {n: v / config.method.ensemble_size for n, v in sums.items()}
    elif method == "peft_lora":
        run = build(config.replace(guide={"name": "delta"}), splits)  # the backbone, tokenizer and loaders
        backbone = run.model.backbone
        for site, layer in run.model.adapters.items():  # take the LoRA-XS layers out again: plain backbone
            parent, _, child = site.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, layer.base)
        m = config.method
        lora, head = inject_peft_lora(backbone, m.lora_rank, m.lora_alpha, m.lora_targets, m.lora_dropout)
        backbone.to(device)
        t = config.train
        _, train_seconds = train_peft_lora(
            backbone,
            lora,
            head,
            run.loader("train", shuffle=True),
            num_epochs=t.epochs,
            lr=m.lora_lr,
            head_lr=t.head_lr,
            warmup=t.warmup,
            schedule=t.schedule,
            clip_norm=t.clip_norm,
            seed=t.seed,
            progress=progress,
        )
        for name in names:
            start = time.perf_counter()
            probs[name] = predict_point(backbone, run.loader(name))
            predict_seconds += time.perf_counter() - start
        trainable = stored = count_numel(lora) + count_numel(head)
        if out is not None:
            from safetensors.torch import save_file

            Path(out).mkdir(parents=True, exist_ok=True)
            state = {n: p.detach().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad}
            save_file(state, str(Path(out) / "peft_lora.safetensors"))
    else:  # MethodSpec validates the name; this is a bug guard
        raise AssertionError(f"unhandled method {method!r}")
    result = {
        "method": method,
        "guide": config.guide.name,
        "task": config.task.name,
        "seed": config.train.seed,
        "metrics": {n: classification_metrics(probs[n], splits[n].labels, n_bins) for n in names},
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "trainable_params": trainable,
        "stored_params": stored,
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        if method in ("ensemble", "peft_lora"):  # save_run wrote it for the others
            _write_json(Path(out) / "config.json", config.to_dict())
        _write_json(Path(out) / "result.json", result)
    return result
