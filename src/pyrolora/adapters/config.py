"""Configuration of LoRA-XS adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pyrolora.errors import ConfigError
from pyrolora.validation import positive, positive_int

__all__ = ["ALL_LINEAR", "SVD_CONVENTION", "LoraXSConfig"]

#: peft's shorthand for "every linear layer except the output head".
ALL_LINEAR = "all-linear"

#: Where the singular values sit. Recorded in saved configs so that a reader knows how A and B were built.
SVD_CONVENTION = "A=diag(s_r)V_r^T,B=U_r"


@dataclass(frozen=True)
class LoraXSConfig:
    """Which layers get a LoRA-XS adapter, and of what rank.

    An adapted layer computes ``y = W0 x + b + (alpha / rank) * B R A x`` with frozen ``A = diag(s_r) V_r^T``
    (rank, in) and ``B = U_r`` (out, rank) from the truncated SVD of the frozen weight ``W0`` (out, in), and a
    latent ``R`` (rank, rank).

    Args:
        rank: the SVD rank r, the size of each latent matrix R (r x r). Each adapted module adds r² latents.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``. The paper uses 16.
        target_modules: which modules to adapt, with peft's semantics: a sequence of names, each matching a
            module whose dotted path equals it or ends with ``"." + name``; a single string, which is a regular
            expression that must match the whole dotted path; or ``"all-linear"``, every linear layer except the
            model's output layer.
        layers_to_transform: optional layer indices; only modules inside those layers are adapted. The layer
            index is the integer that follows the ``layers_pattern`` component of the dotted path.
        layers_pattern: the path component(s) that precede the layer index (peft's ``layers_pattern``). The
            default covers BERT/RoBERTa (``layer``), Llama (``layers``) and GPT-2 (``h``).
        dropout: adapter dropout p in [0, 1): the update branch reads ``dropout(x)``, i.e.
            ``(alpha / rank) * B R A dropout(x)`` (see :class:`~pyrolora.adapters.layer.LoraXSLinear`). Active in
            training and under ``mc_dropout`` (pyrolora.runs.methods.dropout); it gives MC dropout to backbones without
            dropout (Llama). Default 0: no dropout module.

    Raises:
        ConfigError: on a non-positive rank or alpha, an empty target list or an invalid layer index.
    """

    rank: int
    alpha: float = 16.0
    target_modules: str | tuple[str, ...] = ("query", "value")
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = field(default=("layer", "layers", "h", "blocks"))
    dropout: float = 0.0

    def __post_init__(self) -> None:
        positive_int(self.rank, "rank", hint="the paper uses 2 to 25")
        object.__setattr__(self, "alpha", positive(self.alpha, "alpha", hint="the paper uses 16"))
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ConfigError("target_modules is an empty string; give module names or a regex.")
        elif isinstance(targets, Sequence):
            targets = tuple(targets)
            if not targets:
                raise ConfigError("target_modules is empty; name at least one module, e.g. ('query', 'value').")
            bad = [t for t in targets if not isinstance(t, str) or not t]
            if bad:
                raise ConfigError(f"target_modules must hold non-empty strings, got {bad!r}.")
            object.__setattr__(self, "target_modules", targets)
        else:
            raise ConfigError(
                f"target_modules must be a list of names, a regex string or 'all-linear', got {targets!r}."
            )
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = (layers,)
            layers = tuple(layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(
                    f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}."
                )
            object.__setattr__(self, "layers_to_transform", layers)
        pattern = self.layers_pattern
        pattern = (pattern,) if isinstance(pattern, str) else tuple(pattern)
        if not pattern or any(not isinstance(p, str) or not p for p in pattern):
            raise ConfigError(f"layers_pattern must hold non-empty strings, got {self.layers_pattern!r}.")
        object.__setattr__(self, "layers_pattern", pattern)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter dropout must be a number in [0, 1), got {self.dropout!r}; e.g. 0.1.")
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to every update ``B R A x``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary, including the SVD convention used to build the frozen factors."""
        out = asdict(self)
        for key in ("target_modules", "layers_to_transform", "layers_pattern"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        out["svd_convention"] = SVD_CONVENTION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraXSConfig:
        """Inverse of :meth:`to_dict`. Rejects unknown keys and a different SVD convention."""
        data = dict(data)
        convention = data.pop("svd_convention", SVD_CONVENTION)
        if convention != SVD_CONVENTION:
            raise ConfigError(
                f"adapter factors were built with convention {convention!r}; this version uses "
                f"{SVD_CONVENTION!r} and cannot load them."
            )
        known = {"rank", "alpha", "target_modules", "layers_to_transform", "layers_pattern", "dropout"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config keys {unknown}; known keys are {sorted(known)}.")
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)
