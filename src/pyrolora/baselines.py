"""Baselines that share pyrolora's data pipeline and metrics: MC dropout, standard LoRA through peft, counts.

- :func:`mc_dropout`: a context manager that keeps a module's ``nn.Dropout`` layers sampling while the rest of
  the model is in eval mode. Combined with :func:`pyrolora.predict` on a ``delta`` (MAP) guide, whose S
  "posterior samples" are S copies of the MAP, every sample row gets its own dropout mask, so the S rows are
  S MC-dropout passes and the average is the MC-dropout predictive. ``predict`` itself is unchanged.
- :func:`train_peft_lora` / :func:`predict_point`: LoRA (Hu et al.) injected by peft into the same backbone,
  trained by maximum likelihood (cross-entropy) with the same schedule as :func:`pyrolora.fit`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyrolora.adapters import HEAD_MODULE_NAMES
from pyrolora.errors import ConfigError, DivergenceError
from pyrolora.inference.batches import split_batch, to_device
from pyrolora.inference.svi import make_schedule

__all__ = [
    "count_numel",
    "dropout_layers",
    "head_modules",
    "inject_peft_lora",
    "mc_dropout",
    "predict_point",
    "train_peft_lora",
]


def _sampling_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x, module.p, training=True, inplace=module.inplace)


def dropout_layers(module: nn.Module) -> list[nn.Dropout]:
    """The ``nn.Dropout`` layers with p > 0 inside ``module`` (the backbone's and the adapters' own)."""
    return [m for m in module.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@contextlib.contextmanager
def mc_dropout(module: nn.Module) -> Iterator[int]:
    """Within the block, every ``nn.Dropout`` (p > 0) inside ``module`` samples a mask even in eval mode.

    Only dropout *modules* are switched; attention-probability dropout that transformers applies inside its
    fused attention kernels (``dropout_p=... if self.training``) stays off. LoRA-XS adapter dropout
    (``LoraXSConfig(dropout=p)``, an ``nn.Dropout`` on each adapter's input) counts as a dropout layer, so a
    backbone without dropout of its own (Llama) gets MC dropout through its adapters. Yields the number of
    layers switched.

    Raises:
        ConfigError: when ``module`` has no dropout layer with p > 0 (e.g. Llama without adapter dropout): MC
            dropout would be a deterministic model.
    """
    switched = dropout_layers(module)
    if not switched:
        raise ConfigError(
            f"{type(module).__name__} has no dropout layer with p > 0, so MC dropout would equal the MAP model; "
            "set adapter dropout ([adapters] dropout = 0.1), use a backbone trained with dropout (e.g. BERT/MiniLM), "
            "or choose another method."
        )
    for m in switched:
        m.forward = functools.partial(_sampling_dropout, m)  # an instance attribute shadows Dropout.forward
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.forward


def head_modules(backbone: nn.Module) -> list[str]:
    """Top-level children that form a task head (``classifier``, ``score``, ...; never ``lm_head``)."""
    children = dict(backbone.named_children())
    return [n for n in HEAD_MODULE_NAMES if n in children and n != "lm_head"]


def count_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(t.numel() for t in tensors)


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
) -> tuple[list[float], float]:
    """Maximum-likelihood training of LoRA and head with AdamW, warm-up and decay. Returns (losses, seconds)."""
    num_steps = max(1, math.ceil(num_epochs * len(data)))
    warmup_steps = round(warmup * num_steps) if warmup < 1 else int(warmup)
    groups = [{"params": lora_params, "lr": lr, "weight_decay": 0.0}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_schedule(optimizer, schedule, warmup_steps, num_steps)  # type: ignore[arg-type]
    device = next(p.device for p in lora_params)
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
                loss = F.cross_entropy(_logits(backbone, inputs), targets)
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
def predict_point(backbone: nn.Module, data: Iterable[Any], *, progress: bool = False) -> torch.Tensor:
    """Class probabilities of a point-estimate model in eval mode, shape (N, C), float32 on the CPU."""
    device = next(backbone.parameters()).device
    backbone.eval()
    parts = []
    for batch in tqdm(data, desc="predict", disable=not progress, unit="batch", dynamic_ncols=True):
        inputs, _ = split_batch(to_device(batch, device))
        parts.append(torch.softmax(_logits(backbone, inputs), -1).cpu())
    return torch.cat(parts)
