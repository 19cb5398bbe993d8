"""``peft_lora``: standard LoRA (Hu et al.) injected by peft into the same backbone, trained by maximum likelihood
(cross-entropy) with the same schedule as :func:`pyrolora.fit`, predicted as one point estimate (S = 1).

- :func:`inject_peft_lora`, :func:`train_peft_lora`, :func:`predict_point`: the pieces, usable on any backbone.
- :class:`PeftLora`: the registered method; its run folder holds ``peft_lora.safetensors`` (every trainable
  tensor: LoRA A and B, the task head) and ``config.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyrolora._atomic import atomic_path, write_json
from pyrolora._integrity import check_frozen_backbone, trained_fingerprint
from pyrolora._manifest import MANIFEST_FILE, write_method_manifest
from pyrolora._version import __version__
from pyrolora.adapters import HEAD_MODULE_NAMES
from pyrolora.errors import ConfigError, DivergenceError, RunFolderError
from pyrolora.inference.batches import split_batch, to_device
from pyrolora.inference.precision import Precision, autocast
from pyrolora.inference.svi import make_schedule
from pyrolora.runs.build import Run, build, load_task
from pyrolora.runs.config import RunConfig
from pyrolora.runs.folder import CONFIG_FILE, PEFT_LORA_FILE, PEFT_LORA_FORMAT, verify_files
from pyrolora.runs.methods.base import count_numel, register

__all__ = [
    "FittedPeftLora",
    "PeftLora",
    "head_modules",
    "inject_peft_lora",
    "peft_lora_run",
    "predict_point",
    "train_peft_lora",
]


def head_modules(backbone: nn.Module) -> list[str]:
    """Top-level children that form a task head (``classifier``, ``score``, ...; never ``lm_head``)."""
    children = dict(backbone.named_children())
    return [n for n in HEAD_MODULE_NAMES if n in children and n != "lm_head"]


def inject_peft_lora(
    backbone: nn.Module, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Inject peft LoRA layers in place; freeze everything but LoRA and the head. Returns (lora, head) params."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout)
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:
        raise ConfigError(f"peft could not inject LoRA into {list(targets)}: {err}") from err
    for p in backbone.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in backbone.named_parameters() if "lora_" in n]
    head = [p for name in head_modules(backbone) for p in backbone.get_submodule(name).parameters()]
    for p in (*lora, *head):
        p.requires_grad_(True)
    return lora, head


def _logits(backbone: nn.Module, inputs: Any) -> torch.Tensor:
    out = backbone(**inputs) if isinstance(inputs, dict) else backbone(inputs)
    out = getattr(out, "logits", out)
    return out.float()  # (B, C)


def train_peft_lora(
    backbone: nn.Module,
    lora_params: list[nn.Parameter],
    head_params: list[nn.Parameter],
    data: Any,
    *,
    num_epochs: float,
    lr: float,
    head_lr: float,
    warmup: float = 0.06,
    schedule: str = "cosine",
    clip_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    precision: Precision = "float32",
) -> tuple[list[float], float]:
    """Maximum-likelihood training of LoRA and head with AdamW, warm-up and decay. Returns (losses, seconds).

    ``precision="bf16"`` runs the backbone's forward under bfloat16 autocast (the loss in float32).
    """
    num_steps = max(1, math.ceil(num_epochs * len(data)))
    warmup_steps = round(warmup * num_steps) if warmup < 1 else int(warmup)
    groups = [{"params": lora_params, "lr": lr, "weight_decay": 0.0}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_schedule(optimizer, schedule, warmup_steps, num_steps)  # type: ignore[arg-type]
    device = next(p.device for p in lora_params)
    context = autocast(precision, device)
    losses: list[float] = []
    backbone.train()
    start = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        tqdm(total=num_steps, desc="fit (peft LoRA)", disable=not progress, unit="step", dynamic_ncols=True) as bar,
    ):
        torch.manual_seed(seed)
        step = 0
        while step < num_steps:
            for batch in data:
                inputs, targets = split_batch(to_device(batch, device))
                optimizer.zero_grad(set_to_none=True)
                with context():
                    logits = _logits(backbone, inputs)
                loss = F.cross_entropy(logits, targets)
                if not torch.isfinite(loss):
                    raise DivergenceError(f"peft LoRA loss is {loss.item()} at step {step + 1}; lower method.lora_lr.")
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*lora_params, *head_params], clip_norm or math.inf)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                if step >= num_steps:
                    break
    backbone.eval()
    return losses, time.perf_counter() - start


@torch.no_grad()
def predict_point(
    backbone: nn.Module, data: Iterable[Any], *, progress: bool = False, precision: Precision = "float32"
) -> torch.Tensor:
    """Class probabilities of a point-estimate model in eval mode, shape (N, C), float32 on the CPU."""
    device = next(backbone.parameters()).device
    context = autocast(precision, device)
    backbone.eval()
    parts = []
    for batch in tqdm(data, desc="predict", disable=not progress, unit="batch", dynamic_ncols=True):
        inputs, _ = split_batch(to_device(batch, device))
        with context():
            logits = _logits(backbone, inputs)
        parts.append(torch.softmax(logits, -1).cpu())
    return torch.cat(parts)


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


@dataclass
class FittedPeftLora:
    """A trained or loaded peft LoRA run (a point estimate: S = 1)."""

    config: RunConfig
    run: Run
    train_seconds: float = 0.0
    trainable_params: int = 0

    @property
    def stored_params(self) -> int:
        return self.trainable_params

    def probs(self, data: Any, *, progress: bool = False) -> torch.Tensor:
        """Probabilities (1, N, C) of the point estimate."""
        loader = self.run.loader(data)
        backbone = self.run.model.backbone
        return predict_point(backbone, loader, progress=progress, precision=self.config.train.precision)[None]

    def save(self, directory: Path, metrics: Mapping[str, Any] | None = None) -> None:
        """Write ``peft_lora.safetensors`` (LoRA matrices and head), ``config.json``, then ``manifest.json``.

        Each file atomically; the manifest last (sizes and SHA-256 of both files, and the fingerprint of the
        frozen backbone under the LoRA layers), so a folder with a manifest is complete and loading checks it.
        ``metrics`` are not stored here (the runner's ``result.json`` holds them).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # until the new one is written, the folder reads as unsaved
        backbone = self.run.model.backbone
        state = {n: p.detach().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad}
        with atomic_path(directory / PEFT_LORA_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": PEFT_LORA_FORMAT})
        write_json(directory / CONFIG_FILE, {"pyrolora_version": __version__, **self.config.to_dict()})
        write_method_manifest(  # last: a folder with a manifest is complete
            directory,
            [PEFT_LORA_FILE, CONFIG_FILE],
            method="peft_lora",
            base_model=self.config.model.name,
            backbone_fingerprint=trained_fingerprint(backbone),
        )


class PeftLora:
    """Standard LoRA through peft (rank ``lora_rank`` on ``lora_targets``), maximum likelihood, no prior."""

    name = "peft_lora"
    uses_guide = False

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
    ) -> FittedPeftLora:
        if resume:
            raise ConfigError("peft_lora runs have no checkpoints to resume; train again without --resume.")
        run, lora, head = peft_lora_run(config, splits)
        backbone = run.model.backbone
        backbone.to(device)
        m, t = config.method, config.train
        _, seconds = train_peft_lora(
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
            precision=t.precision,
        )
        return FittedPeftLora(config, run, seconds, count_numel(lora) + count_numel(head))

    def load(
        self, directory: Path, config: RunConfig, *, model_name: str | None = None, device: torch.device | None = None
    ) -> FittedPeftLora:
        """Rebuild backbone, peft LoRA and head as training built them, and load the saved tensors into them."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(directory) / PEFT_LORA_FILE
        # The manifest (sizes, SHA-256, frozen-backbone fingerprint) is checked first. Folders written before
        # peft_lora folders had one hold only the state and config.json (each written atomically, the state
        # first, so complete): they load as before, without those checks.
        manifest = verify_files(directory) if (Path(directory) / MANIFEST_FILE).is_file() else None
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
        run, lora, head = peft_lora_run(config, load_task(config.task))
        backbone = run.model.backbone
        if manifest is not None:
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
        if device is not None:
            backbone.to(device)
        return FittedPeftLora(config, run, 0.0, count_numel(lora) + count_numel(head))


register(PeftLora())
