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
from torch import nn

from pyrolora._atomic import atomic_path
from pyrolora._integrity import trained_fingerprint
from pyrolora._manifest import MANIFEST_FILE, write_method_manifest
from pyrolora._version import __version__
from pyrolora.baselines import (
    count_numel,
    dropout_layers,
    inject_peft_lora,
    mc_dropout,
    predict_point,
    train_peft_lora,
)
from pyrolora.config import RunConfig
from pyrolora.errors import ConfigError
from pyrolora.evaluation import metrics
from pyrolora.experiment import CONFIG_FILE, Run, _write_json, build, fit_run, load_task, save_run
from pyrolora.inference import draws_needed, predict

__all__ = [
    "PEFT_LORA_FILE",
    "classification_metrics",
    "fit_and_predict",
    "peft_lora_run",
    "run_method",
    "save_peft_lora",
]

#: The state of a ``peft_lora`` run folder: every trainable tensor (LoRA A and B, the task head) by its name.
PEFT_LORA_FILE = "peft_lora.safetensors"
PEFT_LORA_FORMAT = "pyrolora-peft-lora-1"


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


def autocast_backbone(backbone: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Run the backbone's forward (only it) under ``torch.autocast(dtype)``; guide and ELBO stay in float32."""
    if dtype is not None:
        backbone.forward = torch.autocast(device.type, dtype=dtype)(backbone.forward)


def _fit_bayesian(
    config: RunConfig, splits: dict[str, Any], device: torch.device, progress: bool, autocast: torch.dtype | None = None
) -> Run:
    run = build(config, splits)
    if config.method.name == "mc_dropout" and not dropout_layers(run.model.backbone):
        raise ConfigError(  # before training, not after it: the trained MAP could never be MC-dropout sampled
            f"method mc_dropout needs dropout, but {config.model.name!r} has no dropout layer with p > 0; set "
            "adapter dropout ([adapters] dropout = 0.1) or use a backbone trained with dropout (e.g. MiniLM)."
        )
    run.model.to(device)
    autocast_backbone(run.model.backbone, device, autocast)
    run.fit_result = fit_run(run, progress=progress)  # the guide family's whole procedure (swag, laplace, ...)
    return run


def peft_lora_run(config: RunConfig, splits: dict[str, Any]) -> tuple[Run, list[nn.Parameter], list[nn.Parameter]]:
    """The run of a ``peft_lora`` config: its backbone with peft LoRA (and no LoRA-XS), tokenizer and loaders.

    Returns ``(run, lora_params, head_params)``; ``run.model.backbone`` is the plain backbone with peft's LoRA
    layers, ``run.guide`` an unused ``delta`` guide (the run only lends its loaders and splits).
    """
    run = build(config.replace(guide={"name": "delta"}), splits)  # the backbone, tokenizer and loaders
    backbone = run.model.backbone
    for site, layer in run.model.adapters.items():  # take the LoRA-XS layers out again: plain backbone
        parent, _, child = site.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, layer.base)
    m = config.method
    lora, head = inject_peft_lora(backbone, m.lora_rank, m.lora_alpha, m.lora_targets, m.lora_dropout)
    return run, lora, head


def save_peft_lora(backbone: nn.Module, config: RunConfig, out: str | Path) -> None:
    """Write a peft LoRA run folder: ``peft_lora.safetensors`` (LoRA matrices and head), then ``config.json``.

    Both atomically, the state first: a folder with ``config.json`` holds a complete state.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad}
    with atomic_path(out / PEFT_LORA_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": PEFT_LORA_FORMAT})
    _write_json(out / CONFIG_FILE, {"pyrolora_version": __version__, **config.to_dict()})
    write_method_manifest(  # last: a folder with a manifest is complete
        out,
        [PEFT_LORA_FILE, CONFIG_FILE],
        method="peft_lora",
        base_model=config.model.name,
        backbone_fingerprint=trained_fingerprint(backbone),
    )


def _predict_run(run: Run, split: str, *, dropout: bool = False) -> torch.Tensor:
    """Per-sample probabilities (S, N, C) of ``split``: S posterior draws (S = 1 for a point mass), or S dropout
    masks with ``dropout``."""
    s = draws_needed(run.guide, run.config.predict.num_samples, dropout=dropout)  # (a MAP: one draw)
    with mc_dropout(run.model.backbone) if dropout else contextlib.nullcontext():
        return predict(run.model, run.guide, run.loader(split), num_samples=s, seed=0).probs


def _bayesian_counts(run: Run) -> tuple[int, int]:
    head = count_numel(run.model.head_parameters())
    trainable = count_numel(p for p in run.guide.parameters() if p.requires_grad) + head
    stored = count_numel(run.guide.state_dict().values()) + count_numel(run.model.head_state().values())
    return trainable, stored


def fit_and_predict(
    config: RunConfig,
    splits: dict[str, Any],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    also_mc_dropout: bool = False,
    out: str | Path | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Train one model of ``config`` (a guide by SVI, or peft LoRA) and predict every evaluation split.

    Returns ``{"probs": {split: (N, C)}, "samples": {split: (S, N, C)}, "train_seconds", "predict_seconds",
    "trainable_params", "stored_params"}`` (``probs`` is the mean of ``samples`` over S; S = 1 for peft LoRA),
    plus ``"mc_dropout_probs"``, ``"mc_dropout_samples"`` and ``"mc_dropout_predict_seconds"`` when
    ``also_mc_dropout`` (the same trained model predicted with dropout on: MC dropout costs no extra training).
    Every split of ``splits`` except ``train`` and ``validation`` is predicted; labels are not needed for that,
    so unlabelled shifted data (:func:`pyrolora.data.texts.unlabelled_split`) can be added as one more split.
    ``autocast`` (e.g. ``torch.bfloat16``) runs the backbone's forward in mixed precision.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = _eval_names(splits)
    samples: dict[str, torch.Tensor] = {}
    result: dict[str, Any] = {"predict_seconds": 0.0, "samples": samples}
    if config.method.name == "peft_lora":
        run, lora, head = peft_lora_run(config, splits)
        backbone = run.model.backbone
        m, t = config.method, config.train
        backbone.to(device)
        autocast_backbone(backbone, device, autocast)
        _, result["train_seconds"] = train_peft_lora(
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
            samples[name] = predict_point(backbone, run.loader(name)).unsqueeze(0)  # (1, N, C)
            result["predict_seconds"] += time.perf_counter() - start
        result["trainable_params"] = result["stored_params"] = count_numel(lora) + count_numel(head)
        if out is not None:
            save_peft_lora(backbone, config, out)
        result["probs"] = {name: s.mean(0) for name, s in samples.items()}
        return result
    run = _fit_bayesian(config, splits, device, progress, autocast)
    assert run.fit_result is not None
    result["train_seconds"] = run.fit_result.seconds
    dropout_only = config.method.name == "mc_dropout"
    for name in names:
        start = time.perf_counter()
        samples[name] = _predict_run(run, name, dropout=dropout_only)
        result["predict_seconds"] += time.perf_counter() - start
    if also_mc_dropout and not dropout_only:
        start = time.perf_counter()
        result["mc_dropout_samples"] = {name: _predict_run(run, name, dropout=True) for name in names}
        result["mc_dropout_probs"] = {name: s.mean(0) for name, s in result["mc_dropout_samples"].items()}
        result["mc_dropout_predict_seconds"] = time.perf_counter() - start
    result["trainable_params"], result["stored_params"] = _bayesian_counts(run)
    probs = {name: s.mean(0) for name, s in samples.items()}
    if out is not None:
        n_bins = config.predict.n_bins
        run.metrics = {n: classification_metrics(probs[n], splits[n].labels, n_bins) for n in names}
        save_run(run, out)
    result["probs"] = probs
    return result


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
        ``{"method", "guide", "task", "seed", "metrics": {split: {...}}, "train_seconds", "predict_seconds",
        "trainable_params", "stored_params"}``.
    """
    splits = splits if splits is not None else load_task(config.task)
    names = _eval_names(splits)
    n_bins = config.predict.n_bins
    if config.method.name == "ensemble":
        members = []
        for member in range(config.method.ensemble_size):
            member_config = config.replace(train={"seed": config.train.seed + member}, method={"name": "bayesian"})
            member_out = None if out is None else Path(out) / f"member-{member}"
            members.append(fit_and_predict(member_config, splits, device=device, progress=progress, out=member_out))
        done = {
            "samples": {n: torch.stack([m["probs"][n] for m in members]) for n in names},  # (M, N, C)
            **{k: sum(m[k] for m in members) for k in members[0] if k not in ("probs", "samples")},
        }
        done["probs"] = {n: s.mean(0) for n, s in done["samples"].items()}
        if out is not None:
            _write_json(Path(out) / "config.json", config.to_dict())
            members = [f"member-{i}/{MANIFEST_FILE}" for i in range(config.method.ensemble_size)]
            write_method_manifest(out, ["config.json", *members], method="ensemble", base_model=config.model.name)
    else:
        done = fit_and_predict(config, splits, device=device, progress=progress, out=out)
    result = {
        "method": config.method.name,
        "guide": config.guide.name,
        "task": config.task.name,
        "seed": config.train.seed,
        "metrics": {n: classification_metrics(done["probs"][n], splits[n].labels, n_bins) for n in names},
        **{k: done[k] for k in ("train_seconds", "predict_seconds", "trainable_params", "stored_params")},
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        _write_json(Path(out) / "result.json", result)
    return result
