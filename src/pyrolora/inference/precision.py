"""Numerical precision and compilation of the backbone's forward pass, shared by ``fit`` and ``predict``.

Only the backbone runs in reduced precision: the guide, the prior and the likelihood (log-probabilities,
softmax) stay in float32, so the latents, their gradients and the ELBO keep full precision.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from pyrolora.errors import ConfigError
from pyrolora.models import BayesianLoraModel

__all__ = ["Precision", "autocast", "compiled_outputs"]

#: ``"float32"``: the backbone runs in its own dtype. ``"bf16"``: ``torch.autocast`` to bfloat16 (matrix
#: products in bf16 on the GPU's tensor cores, or on the CPU), LoRA-XS factors cast once and cached.
Precision = Literal["float32", "bf16"]


def autocast(precision: Precision, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context that the backbone's forward pass runs in.

    Raises:
        ConfigError: for a precision other than ``"float32"`` and ``"bf16"``.
    """
    if precision == "float32":
        return contextlib.nullcontext
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"precision must be 'float32' or 'bf16', got {precision!r}.")


def compiled_outputs(
    model: BayesianLoraModel, compile: bool | Mapping[str, Any]
) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor] | None:
    """``model.outputs`` with the backbone run through ``torch.compile``, or ``None`` when ``compile`` is false.

    The backbone module itself is not replaced (its state dict and the model are unchanged); the compiled
    wrapper shares its parameters. The adapter cores are module attributes that change every step: dynamo
    treats them as inputs, so after the first steps there is no recompilation.

    Args:
        model: the Bayesian model.
        compile: ``True`` for ``torch.compile``'s defaults, or a mapping of its keyword arguments (e.g.
            ``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``).
    """
    if compile is False or compile is None:
        return None
    options = {} if compile is True else dict(compile)
    try:
        compiled = torch.compile(model.backbone, **options)
    except TypeError as err:
        raise ConfigError(f"compile options {sorted(options)} were rejected by torch.compile: {err}") from err

    def outputs(inputs: Any, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with model.adapters.use(values), warnings.catch_warnings():
            # dynamo reads ``.grad`` of every tensor it wraps, which warns for the cores (views of θ, not leaves)
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            raw = compiled(**inputs) if isinstance(inputs, Mapping) else compiled(inputs)
        return model.output_fn(raw)

    return outputs
