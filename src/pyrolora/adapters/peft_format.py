"""LoRA-XS to and from standard peft LoRA adapters, and merged copies of the backbone.

A LoRA-XS update is exactly a LoRA update. With frozen ``A`` (r, in), ``B`` (out, r) and a core ``R`` (r, r)::

    ΔW = (alpha / r) · B R A = lora_B @ lora_A    with   lora_A = A,   lora_B = (alpha / r) · B R

so a value of every R (a posterior mean, median or draw) leaves pyrolora as an ordinary peft ``LoraConfig``
adapter of rank r with ``lora_alpha = r`` (peft's scaling ``lora_alpha / r`` is then 1 and the whole factor
``alpha / r`` sits inside ``lora_B``). transformers' ``Conv1D`` layers (GPT-2) store their weight as (in, out);
peft handles them with ``fan_in_fan_out=True`` but keeps ``lora_A`` (r, in) and ``lora_B`` (out, r) in the same
layout as for ``nn.Linear``, so the factors above need no transpose.

The way back projects any adapter's dense update onto the LoRA-XS subspace (see :func:`project_update`).
This module knows nothing of guides or runs: it maps values of R to files and back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pyrolora._atomic import umask_mode
from pyrolora.adapters.injection import AdapterSet
from pyrolora.adapters.layer import LoraXSLinear, is_supported_layer
from pyrolora.errors import ConfigError, RunFolderError

__all__ = [
    "PEFT_PREFIX",
    "adapter_deltas",
    "merged_copy",
    "peft_lora_config",
    "peft_lora_tensors",
    "project_update",
    "save_peft_adapter",
    "unwrapped_copy",
]

#: peft stores every key relative to ``PeftModel.base_model.model``, i.e. the wrapped transformers model.
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _is_conv1d(layer: LoraXSLinear) -> bool:
    return not isinstance(layer.base, nn.Linear)


def peft_lora_tensors(adapters: AdapterSet, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft state dict of a LoRA adapter equal to LoRA-XS at ``values``.

    For every site ``l``: ``lora_A = A_l`` (r, in) and ``lora_B = (alpha / r) · B_l R_l`` (out, r), computed in
    float32 or wider and stored in the dtype of the layer's frozen factors.

    Args:
        adapters: the injected LoRA-XS layers.
        values: one R (r, r) per site.

    Returns:
        ``{"base_model.model.<site>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}``, CPU, contiguous.
    """
    adapters._check(values)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapters.items():
        value = values[name]
        if value.shape != layer.shape:
            raise ConfigError(f"R of site {name!r} must have shape {layer.shape}, got {tuple(value.shape)}.")
        dtype = torch.promote_types(layer.A.dtype, torch.float32)
        lora_b = layer.scaling * (layer.B.to(dtype) @ value.to(device=layer.B.device, dtype=dtype))  # (out, r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.A.detach().cpu().contiguous().clone()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.to(layer.A.dtype).detach().cpu().contiguous()
    return tensors


def peft_lora_config(
    adapters: AdapterSet,
    *,
    modules_to_save: Sequence[str] = (),
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
):
    """The ``peft.LoraConfig`` under which :func:`peft_lora_tensors` reproduces LoRA-XS.

    Rank ``r`` and ``lora_alpha = r`` (scaling 1), no dropout, no bias; ``target_modules`` lists the exact dotted
    path of every site (peft matches a path equal to a listed name), so the adapter touches exactly the
    modules pyrolora adapted. ``fan_in_fan_out`` is set when the sites are transformers ``Conv1D`` layers.

    Raises:
        ConfigError: when the sites mix ``nn.Linear`` and ``Conv1D`` (one peft config holds one
            ``fan_in_fan_out``; peft would rewrite it with a warning for each layer of the other kind).
    """
    from peft import LoraConfig

    kinds = {_is_conv1d(layer) for layer in adapters.values()}
    if len(kinds) > 1:
        raise ConfigError(
            "the adapted modules mix nn.Linear and Conv1D layers; a peft LoRA config has one fan_in_fan_out. "
            "Export needs target_modules of one kind."
        )
    rank = adapters.config.rank
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # peft's scaling lora_alpha / r = 1; alpha / r of LoRA-XS is inside lora_B
        lora_dropout=adapters.config.dropout,  # the same x -> dropout(x) before A as LoRA-XS adapter dropout
        bias="none",
        target_modules=list(adapters),
        fan_in_fan_out=kinds == {True},
        modules_to_save=list(modules_to_save) or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        init_lora_weights=True,
        inference_mode=True,
    )


def save_peft_adapter(
    directory: str | Path,
    adapters: AdapterSet,
    values: Mapping[str, torch.Tensor],
    *,
    head_state: Mapping[str, torch.Tensor] | None = None,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a standard peft LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(base, directory)`` then computes what pyrolora computes with every R set to
    ``values[site]``. The files are written into a temporary folder beside ``directory`` and moved into place,
    so a reader never sees half an adapter.

    Args:
        directory: the adapter folder to create (its parent is created too); existing files are replaced.
        adapters: the injected LoRA-XS layers.
        values: one R (r, r) per site.
        head_state: the point-estimate task head, keyed by its path in the backbone (e.g.
            ``classifier.weight``).
        modules_to_save: the head's module names for peft; default: the first path component of every
            ``head_state`` key (``classifier`` for ``classifier.dense.weight``).
        base_model_name_or_path: recorded in the config (the hub id or folder of the base model).
        task_type: peft task type, e.g. ``"SEQ_CLS"``; ``None`` loads as a plain ``PeftModel``.

    Returns:
        The adapter folder.
    """
    directory = Path(directory)
    head_state = dict(head_state or {})
    heads = list(modules_to_save) if modules_to_save is not None else sorted({k.split(".")[0] for k in head_state})
    config = peft_lora_config(
        adapters, modules_to_save=heads, base_model_name_or_path=base_model_name_or_path, task_type=task_type
    )
    tensors = peft_lora_tensors(adapters, values)
    for key, value in head_state.items():
        tensors[PEFT_PREFIX + key] = value.detach().cpu().contiguous().clone()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = umask_mode(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "source": "pyrolora LoRA-XS"})
        umask_mode(staging / WEIGHTS_NAME)  # safetensors creates its files 0600 whatever the umask
        if directory.is_dir():
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(staging / name, directory / name)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def unwrapped_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy of ``backbone`` in which every LoRA-XS layer is replaced by (a copy of) its base layer.

    The copy is the plain pretrained model (plus the current head): what a peft adapter is loaded onto.
    """
    clone = copy.deepcopy(backbone)
    wrapped = [(name, m) for name, m in clone.named_modules() if isinstance(m, LoraXSLinear)]
    for name, layer in wrapped:
        if layer.merged:
            raise ConfigError(f"site {name!r} is merged; unmerge the adapters before copying the backbone.")
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, layer.base)
    return clone


@torch.no_grad()
def merged_copy(backbone: nn.Module, adapters: AdapterSet, values: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``backbone`` with ``(alpha / r) · B R A`` folded into every adapted weight.

    The update is computed in float32 or wider (:meth:`LoraXSLinear.delta_weight`) and added in the weight's
    dtype; ``Conv1D`` weights receive its transpose. The result has no LoRA-XS layers and no link to
    ``backbone``: for a transformers model, ``save_pretrained`` of it is an ordinary fine-tuned checkpoint.
    """
    adapters._check(values)
    clone = unwrapped_copy(backbone)
    for name, layer in adapters.items():
        target = clone.get_submodule(name)
        delta = layer.delta_weight(values[name].to(layer.A.device))  # (out, in)
        weight = target.weight
        weight.add_((delta if isinstance(target, nn.Linear) else delta.t()).to(weight.dtype))
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def project_update(layer: LoraXSLinear, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The R whose LoRA-XS update is closest to a dense update ``delta`` (out, in), and the relative residual.

    Solves ``min_R ||(alpha / r) · B R A - ΔW||_F``. With ``B = U_r`` (orthonormal columns) and
    ``A = diag(s_r) V_rᵀ`` (full row rank), the minimiser is ``R* = (r / alpha) · Bᵀ ΔW A⁺`` with
    ``A⁺ = V_r diag(1 / s_r)``, and ``(alpha / r) · B R* A = P_U ΔW P_V`` with the orthogonal projections
    ``P_U = U_r U_rᵀ`` and ``P_V = V_r V_rᵀ``. The projection is exact (residual 0 up to rounding) if and only
    if the column space of ΔW lies in span(U_r) and its row space in span(V_r), i.e. the update lives in the
    top-r singular subspaces of this layer's frozen weight.

    Returns:
        ``(R*, residual)``: R* (r, r) in the dtype of the layer's factors, and
        ``||ΔW - (alpha / r) B R* A||_F / ||ΔW||_F`` (0 for ΔW = 0).
    """
    if delta.shape != (layer.out_features, layer.in_features):
        raise ConfigError(
            f"an update of site {layer.site_name!r} must have shape (out={layer.out_features}, "
            f"in={layer.in_features}), got {tuple(delta.shape)}."
        )
    b = layer.B.to(torch.float64)  # (out, r)
    a = layer.A.to(torch.float64)  # (r, in)
    d = delta.to(device=b.device, dtype=torch.float64)  # (out, in)
    core = b.T @ d @ torch.linalg.pinv(a) / layer.scaling  # (r, r)
    rest = d - layer.scaling * (b @ core @ a)  # (out, in)
    norm = torch.linalg.matrix_norm(d).item()
    residual = torch.linalg.matrix_norm(rest).item() / norm if norm > 0 else 0.0
    return core.to(layer.A.dtype), residual


def adapter_deltas(backbone: nn.Module, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Load any peft adapter folder onto a plain copy of ``backbone``; return its dense updates and saved head.

    Works for every peft method whose layers implement ``get_delta_weight`` (LoRA, TinyLoRA, VeRA, ...): the
    adapter is loaded with ``PeftModel.from_pretrained``, so peft itself decodes its format.

    Returns:
        ``(deltas, head)``: ``deltas[module_path]`` is the update of that module in torch's (out, in) layout
        (``Conv1D`` updates transposed back); ``head`` holds the adapter's ``modules_to_save`` tensors keyed
        by their path in the backbone (``classifier.weight``, ...).

    Raises:
        RunFolderError: when the folder is not a peft adapter or does not fit the backbone.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise RunFolderError(f"{path} is not a peft adapter folder: {CONFIG_NAME} is missing.")
    try:
        peft_config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        plain = unwrapped_copy(backbone)
        with warnings.catch_warnings():
            # peft 0.21 asks transformers 5 for a deprecated attribute; harmless, and not the user's doing.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
            wrapped = PeftModel.from_pretrained(plain, str(path), adapter_name="imported", is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot load the peft adapter {path} onto this backbone: {err}") from err
    root = wrapped.base_model.model
    deltas: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in root.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and "imported" in module.modules_to_save:
                for key, value in module.modules_to_save["imported"].state_dict().items():
                    head[f"{name}.{key}"] = value.detach().clone()
            elif isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
                delta = module.get_delta_weight("imported")
                base = module.get_base_layer()
                if delta.shape != base.weight.shape:
                    raise RunFolderError(
                        f"the {peft_config.get('peft_type')} update of {name!r} has shape {tuple(delta.shape)}, "
                        f"not that of the weight {tuple(base.weight.shape)}; it cannot be projected."
                    )
                conv1d = is_supported_layer(base) and not isinstance(base, nn.Linear)
                deltas[name] = delta.t() if conv1d else delta  # (out, in)
    return deltas, head
