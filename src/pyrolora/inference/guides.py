"""Posterior families: a registry of guide factories over one :class:`BayesianLoraModel`.

In code, pass the factory itself (``guides.lowrank``, or any ``callable(model, **options) -> guide``); the
names are there for configs and the command line::

    guide = guides.make("lowrank", model, rank=2)
    guide = guides.make(partial(AutoLowRankMultivariateNormal, rank=5), model)

Every guide honours the contract downstream code relies on: it is callable with the model's arguments, and
offers ``median()`` and ``quantiles(qs)`` over the adapter sites; the Gaussian families also offer
``get_posterior()``. Guides are created lazily: their parameters exist after the first call (``fit`` makes it),
or after :func:`setup`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_feasible
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.models import BayesianLoraModel

__all__ = ["PointMass", "available", "check_local", "delta", "diagonal", "full", "lowrank", "make", "register", "setup"]

GuideFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, GuideFactory] = {}

#: Initial posterior standard deviation of every latent, half the default prior scale. On the VADER demo an
#: initial 0.01 left the fitted scales far below their optimum after 6 epochs (ELBO 0.67 vs 0.48 per example).
DEFAULT_INIT_SCALE = 0.05


def register(name: str) -> Callable[[GuideFactory], GuideFactory]:
    """Register a guide factory under ``name`` for configs and the CLI."""

    def deco(factory: GuideFactory) -> GuideFactory:
        if name in _REGISTRY:
            raise ValueError(f"a guide named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> tuple[str, ...]:
    """Names accepted by :func:`make`, sorted."""
    return tuple(sorted(_REGISTRY))


def make(name: str | GuideFactory, model: BayesianLoraModel, **options: Any) -> nn.Module:
    """Build a guide for ``model`` from a registered name or a factory ``callable(model, **options)``.

    Raises:
        ConfigError: for an unknown name (the message lists the registered ones) or options the factory does
            not accept.
    """
    if isinstance(name, str):
        try:
            factory = _REGISTRY[name]
        except KeyError:
            raise ConfigError(f"unknown guide {name!r}; available guides are {list(available())}.") from None
    elif callable(name):
        factory = name
    else:
        raise ConfigError(f"guide must be a registered name or a factory callable, got {name!r}.")
    try:
        # PyroModules decide at construction whether their parameters are module-local (what fit uses).
        with pyro.settings.context(module_local_params=True):
            return factory(model, **options)
    except TypeError as err:
        raise ConfigError(f"guide {name!r} rejected options {sorted(options)}: {err}") from err


def check_local(guide: nn.Module) -> None:
    """Raise a clear error for a Pyro guide built outside module-local parameter mode.

    Pyro fixes a PyroModule's parameter mode when it is constructed; one built in the default global mode
    cannot be trained by :func:`pyrolora.fit`, which keeps every parameter inside its module.
    """
    context = getattr(guide, "_pyro_context", None)
    if context is not None and not hasattr(context, "param_state"):
        raise ConfigError(
            f"the guide {type(guide).__name__} was constructed in Pyro's global-parameter mode; build it with "
            "pyrolora.guides.make(...), or inside `with pyro.settings.context(module_local_params=True):`."
        )


def setup(guide: nn.Module, model: BayesianLoraModel) -> nn.Module:
    """Create the guide's parameters without data, from a trace of the model's latents alone.

    Autoguides build their parameters on first call; the model called with ``inputs=None`` samples only the
    adapter latents, which is all a guide over those latents needs. Safe to call on a set-up guide.
    """
    check_local(guide)
    with pyro.settings.context(module_local_params=True):
        if getattr(guide, "prototype_trace", True) is None:
            guide(None)
    return guide


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what} must be a positive number, got {value!r}.")
    return float(value)


@register("lowrank")
def lowrank(
    model: BayesianLoraModel, rank: int = 2, init_scale: float = DEFAULT_INIT_SCALE
) -> autoguide.AutoLowRankMultivariateNormal:
    """The paper's family: ``q(θ) = N(μ, L Lᵀ + diag(d))`` with L of shape (D, K), K = ``rank``.

    Stores D·(K + 2) numbers. The paper found K = 2 enough.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lowrank guide rank K must be a positive integer, got {rank!r}; the paper uses 2.")
    if rank > model.num_latents:
        raise ConfigError(f"lowrank guide rank K={rank} exceeds the latent dimension D={model.num_latents}.")
    return autoguide.AutoLowRankMultivariateNormal(
        model, rank=rank, init_scale=_positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


@register("diagonal")
def diagonal(model: BayesianLoraModel, init_scale: float = DEFAULT_INIT_SCALE) -> autoguide.AutoDiagonalNormal:
    """``q(θ) = N(μ, diag(σ²))`` over the stacked latent vector; stores 2·D numbers."""
    return autoguide.AutoDiagonalNormal(
        model, init_scale=_positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


@register("full")
def full(model: BayesianLoraModel, init_scale: float = DEFAULT_INIT_SCALE) -> autoguide.AutoMultivariateNormal:
    """``q(θ) = N(μ, L Lᵀ)`` with a dense Cholesky factor; D·(D + 3)/2 numbers, for a few thousand latents."""
    return autoguide.AutoMultivariateNormal(
        model, init_scale=_positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


class PointMass(autoguide.AutoDelta):
    """``AutoDelta`` with the full guide contract: every quantile of a point mass is the point itself."""

    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        qs = torch.as_tensor(quantiles)
        return {name: value.expand(len(qs), *value.shape) for name, value in self.median(*args, **kwargs).items()}


@register("delta")
def delta(model: BayesianLoraModel) -> PointMass:
    """A point mass at the MAP: plain LoRA-XS trained with the prior as weight decay. Stores D numbers."""
    return PointMass(model, init_loc_fn=init_to_feasible)
