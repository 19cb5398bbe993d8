"""Injection of LoRA-XS layers into a backbone by target module names (peft semantics)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from pyrolora.adapters.config import ALL_LINEAR, LoraXSConfig
from pyrolora.adapters.layer import LoraXSLinear, is_supported_layer
from pyrolora.errors import TargetError

__all__ = ["HEAD_MODULE_NAMES", "AdapterSet", "inject_adapters"]

#: Top-level module names that hold a task head in transformers models. ``"all-linear"`` never adapts them:
#: the head is a point estimate trained alongside the adapters.
HEAD_MODULE_NAMES = ("classifier", "score", "qa_outputs", "lm_head", "pre_classifier")


class AdapterSet(Mapping[str, LoraXSLinear]):
    """The LoRA-XS layers injected into one backbone, keyed by site name (the module's dotted path).

    Iteration order is the backbone's module order, which fixes the order of sites in traces, guides and
    saved files. The set's only state is the current value of each layer's R, which :meth:`use` scopes.
    """

    def __init__(self, layers: Mapping[str, LoraXSLinear], config: LoraXSConfig) -> None:
        self._layers = dict(layers)
        self.config = config

    def __getitem__(self, name: str) -> LoraXSLinear:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"AdapterSet({len(self)} sites, rank={self.config.rank}, latents={self.num_latents})"

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Event shape (r, r) of every site."""
        return {name: layer.shape for name, layer in self._layers.items()}

    @property
    def num_latents(self) -> int:
        """D = Σ_l r², the dimension of the stacked latent vector θ."""
        return sum(r * c for r, c in self.shapes.values())

    def _check(self, values: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self._layers if n not in values]
        unknown = [n for n in values if n not in self._layers]
        if missing or unknown:
            raise KeyError(f"values must name exactly the adapter sites; missing {missing}, unknown {unknown}")

    def set_values(self, values: Mapping[str, torch.Tensor] | None) -> None:
        """Set (or with ``None`` clear) the value of R in every layer. Prefer the scoped :meth:`use`."""
        if values is None:
            for layer in self._layers.values():
                layer.value = None
            return
        self._check(values)
        for name, layer in self._layers.items():
            layer.value = values[name]

    @contextlib.contextmanager
    def use(self, values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
        """Within the block, every layer applies ``values[site]`` (shape (r, r), or (S, r, r) for S samples).

        The previous values are restored on exit, also when the block raises.
        """
        previous = {name: layer.value for name, layer in self._layers.items()}
        self.set_values(values)
        try:
            yield
        finally:
            for name, layer in self._layers.items():
                layer.value = previous[name]

    def compute_values(
        self, values: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``values`` in the dtype the layers compute in now: the autocast dtype while autocast is on, else as given.

        Casts every core in one pass (one concatenation and one cast of the stacked (D,) or (S, D) vector, then
        views) instead of one small cast per layer in the forward pass and one more per layer in the backward
        pass; a layer's own ``value.to(dtype)`` is then a no-op. The values, and their gradients, are the same
        as those of the per-layer casts. Call it inside the autocast context, on values of shape (r, r) or
        (S, r, r) per site.

        Args:
            values: ``{site: R}`` for every site.
            flat: optionally the stacked vector θ, shape (D,) or (S, D), whose split in site order gives ``values``
                (a joint draw); it is then cast and split directly, without concatenating the cores again.
        """
        first = next(iter(self._layers.values()))
        device_type = first.A.device.type
        if not torch.is_autocast_enabled(device_type):
            return dict(values)
        dtype = torch.get_autocast_dtype(device_type)
        self._check(values)
        if all(v.dtype == dtype for v in values.values()):
            return dict(values)
        lead = next(iter(values.values())).shape[:-2]  # () or (S,)
        if flat is None:
            flat = torch.cat([values[n].reshape(*lead, -1) for n in self._layers], dim=-1)  # (..., D)
        elif flat.shape != (*lead, self.num_latents):
            raise ValueError(f"flat must have shape {(*lead, self.num_latents)}, got {tuple(flat.shape)}")
        flat = flat.to(dtype)
        pieces = torch.split(flat, [r * c for r, c in self.shapes.values()], dim=-1)
        return {n: p.view(*lead, *s) for (n, s), p in zip(self.shapes.items(), pieces, strict=True)}

    def zeros(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """R = 0 at every site (the base model)."""
        return {n: torch.zeros(s, dtype=dtype, device=self._layers[n].A.device) for n, s in self.shapes.items()}

    def merge(self, values: Mapping[str, torch.Tensor]) -> None:
        """Fold one value of every R into the base weights (see :meth:`LoraXSLinear.merge`)."""
        self._check(values)
        for name, layer in self._layers.items():
            layer.merge(values[name])

    def unmerge(self) -> None:
        """Undo :meth:`merge` on every layer that is merged."""
        for layer in self._layers.values():
            if layer.merged:
                layer.unmerge()


def _layer_index(name: str, patterns: tuple[str, ...]) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in patterns and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _output_layer_names(backbone: nn.Module) -> set[str]:
    names = set()
    get_output = getattr(backbone, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in backbone.named_modules():
        if output is not None and module is output:
            names.add(name)
        if name.split(".")[0] in HEAD_MODULE_NAMES:
            names.add(name)
    return names


def _matches(name: str, module: nn.Module, config: LoraXSConfig, excluded: set[str]) -> bool:
    targets = config.target_modules
    if targets == ALL_LINEAR:
        hit = is_supported_layer(module) and name not in excluded
    elif isinstance(targets, str):
        hit = re.fullmatch(targets, name) is not None
    else:
        hit = any(name == t or name.endswith("." + t) for t in targets)
    if hit and config.layers_to_transform is not None:
        hit = _layer_index(name, config.layers_pattern) in config.layers_to_transform
    return hit


def inject_adapters(backbone: nn.Module, config: LoraXSConfig) -> AdapterSet:
    """Replace every target layer of ``backbone`` in place by a :class:`LoraXSLinear`.

    Matching follows peft: a list of names matches a module whose dotted path equals a name or ends with
    ``"." + name``; a string is a regular expression matched against the whole path; ``"all-linear"`` takes
    every ``nn.Linear`` / ``Conv1D`` except the output layer and the task head (see ``HEAD_MODULE_NAMES``).
    ``layers_to_transform`` keeps only matches inside those layer indices.

    All matches are validated (type, rank) before the first layer is replaced, so a failure leaves the
    backbone untouched. Parameters of the wrapped layers stop requiring gradients; nothing else is changed.

    Args:
        backbone: any ``nn.Module`` (a transformers model or a plain network).
        config: which modules to adapt and with what rank and alpha.

    Returns:
        The :class:`AdapterSet` of injected layers, keyed by dotted module path.

    Raises:
        TargetError: if nothing matches (the message lists the linear layers there are), a match is not a
            linear layer, a rank exceeds ``min(in, out)`` of a match, or the backbone already has adapters.
    """
    if not isinstance(backbone, nn.Module):
        raise TargetError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}.")
    excluded = _output_layer_names(backbone) if config.target_modules == ALL_LINEAR else set()
    matches: list[tuple[str, nn.Module]] = []
    for name, module in backbone.named_modules():
        if not name:
            continue
        if isinstance(module, LoraXSLinear):
            raise TargetError(f"module {name!r} already carries a LoRA-XS adapter; inject into a fresh backbone.")
        if _matches(name, module, config, excluded):
            matches.append((name, module))
    # A module nested inside a matched module (e.g. ``a.query.inner``) would be replaced twice; keep outermost.
    matched_names = [n for n, _ in matches]
    matches = [(n, m) for n, m in matches if not any(n.startswith(o + ".") for o in matched_names if o != n)]
    if not matches:
        linear = [n for n, m in backbone.named_modules() if is_supported_layer(m)]
        suffixes = sorted({n.split(".")[-1] for n in linear})
        layer_note = (
            f" inside layers {list(config.layers_to_transform)}" if config.layers_to_transform is not None else ""
        )
        raise TargetError(
            f"no module matches target_modules={config.target_modules!r}{layer_note}. The backbone's linear "
            f"layers end with {suffixes[:30]}; name some of them, give a regex, or use 'all-linear'."
        )
    layers: dict[str, LoraXSLinear] = {}
    for name, module in matches:  # validate everything first
        layers[name] = LoraXSLinear(module, config.rank, config.alpha, site_name=name, dropout=config.dropout)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        layer.to(device=layer.base.weight.device)
        setattr(parent, child, layer)
    return AdapterSet(layers, config)
