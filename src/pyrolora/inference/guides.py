"""Posterior families: a registry of guide factories over one :class:`BayesianLoraModel`.

In code, pass the factory itself (``guides.lowrank``, or any ``callable(model, **options) -> guide``); the
names are there for configs and the command line::

    guide = guides.make("lowrank", model, rank=2)
    guide = guides.make(partial(AutoLowRankMultivariateNormal, rank=5), model)

Every guide honours the contract downstream code relies on: it is callable with the model's arguments, and
offers ``median()`` and ``quantiles(qs)`` over the adapter sites; the Gaussian families also offer
``get_posterior()``. Families fit by more than SVI (``laplace``, ``swag``, ``nuts``) start as a point mass that
:func:`pyrolora.fit` trains as a MAP; :func:`pyrolora.inference.fit_posterior` runs their whole procedure, and
they draw latents with ``sample_latents(num_samples)``. Guides are created lazily: their parameters exist after
the first call (``fit`` makes it), or after :func:`setup`.

This module is the registry only: the guide classes pyrolora adds and the checks live in
:mod:`pyrolora.inference.families` (re-exported here), the fitting procedures in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_feasible
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.families import Blockwise, Flow, PointMass, check_local, setup
from pyrolora.inference.laplace import Laplace
from pyrolora.inference.mcmc import NUTS
from pyrolora.inference.swag import SWAG
from pyrolora.models import BayesianLoraModel
from pyrolora.validation import positive

__all__ = [
    "NUTS",
    "SWAG",
    "Blockwise",
    "Flow",
    "Laplace",
    "PointMass",
    "available",
    "blockwise",
    "check_local",
    "delta",
    "diagonal",
    "flow",
    "full",
    "laplace",
    "lowrank",
    "make",
    "meanfield",
    "nuts",
    "register",
    "setup",
    "swag",
]

GuideFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, GuideFactory] = {}

#: Initial posterior standard deviation of every latent. Small, so that the early steps fit the mean with little
#: noise: with the default KL weight β = 0.1 the fitted posterior sd on SST-2 was about 0.011 (0.11x the prior's),
#: reached from 0.001 by AdamW, whose steps on the softplus-parameterised scale are multiplicative this far below 1
#: (benchmarks/README.md, "The SVI recipe"). The former default, 0.05, was measured with β = 1.
DEFAULT_INIT_SCALE = 0.001


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
        model, rank=rank, init_scale=positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


@register("diagonal")
def diagonal(model: BayesianLoraModel, init_scale: float = DEFAULT_INIT_SCALE) -> autoguide.AutoDiagonalNormal:
    """``q(θ) = N(μ, diag(σ²))`` over the stacked latent vector; stores 2·D numbers."""
    return autoguide.AutoDiagonalNormal(
        model, init_scale=positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


@register("full")
def full(model: BayesianLoraModel, init_scale: float = DEFAULT_INIT_SCALE) -> autoguide.AutoMultivariateNormal:
    """``q(θ) = N(μ, L Lᵀ)`` with a dense Cholesky factor; D·(D + 3)/2 numbers, for a few thousand latents."""
    return autoguide.AutoMultivariateNormal(
        model, init_scale=positive(init_scale, "init_scale"), init_loc_fn=init_to_feasible
    )


@register("delta")
def delta(model: BayesianLoraModel) -> PointMass:
    """A point mass at the MAP: plain LoRA-XS trained with the prior as weight decay. Stores D numbers."""
    return PointMass(model, init_loc_fn=init_to_feasible)


# ---------------------------------------------------------------------------------------------- the zoo
@register("meanfield")
def meanfield(model: BayesianLoraModel, init_scale: float = DEFAULT_INIT_SCALE) -> autoguide.AutoNormal:
    """``q(θ) = Π_site Π_ij N(μ_ij, σ_ij²)``: independent normals, with one loc and scale tensor per site.

    The same family as ``diagonal`` but parameterised per site (``guide.locs.<site>``, ``guide.scales.<site>``,
    readable by name) rather than over the stacked vector. Stores 2·D numbers. No ``get_posterior``.
    """
    return autoguide.AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=positive(init_scale, "init_scale"))


@register("blockwise")
def blockwise(model: BayesianLoraModel, rank: int = 2, init_scale: float = DEFAULT_INIT_SCALE) -> Blockwise:
    """An independent rank-``rank`` low-rank Gaussian per adapted module (see :class:`Blockwise`)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"blockwise guide rank K must be a positive integer, got {rank!r}.")
    return Blockwise(model, rank=rank, init_scale=positive(init_scale, "init_scale"))


@register("flow")
def flow(model: BayesianLoraModel, hidden_dim: int | None = None, num_transforms: int = 2, num_mc: int = 1000) -> Flow:
    """An inverse-autoregressive-flow guide (see :class:`Flow`); ``hidden_dim`` (>= D) None means Pyro's 3·D + 1."""
    for value, what in ((num_transforms, "num_transforms"), (num_mc, "num_mc")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"flow guide {what} must be a positive integer, got {value!r}.")
    if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1):
        raise ConfigError(f"flow guide hidden_dim must be a positive integer or None, got {hidden_dim!r}.")
    return Flow(model, hidden_dim, num_transforms, num_mc)


@register("laplace")
def laplace(model: BayesianLoraModel, damping: float = 1e-2) -> Laplace:
    """A damped Laplace approximation at the MAP (see :class:`~pyrolora.inference.laplace.Laplace`)."""
    return Laplace(model, damping=damping)


@register("swag")
def swag(
    model: BayesianLoraModel,
    rank: int = 20,
    start: float = 0.5,
    frequency: int | None = None,
    collect_lr: float | None = None,
    scale: float = 0.5,
    collect_optimizer: str | None = None,
    collect_momentum: float = 0.0,
) -> SWAG:
    """SWAG collected from MAP iterates of the same model (see :class:`~pyrolora.inference.swag.SWAG`)."""
    return SWAG(
        model,
        rank=rank,
        start=start,
        frequency=frequency,
        collect_lr=collect_lr,
        scale=scale,
        collect_optimizer=collect_optimizer,  # type: ignore[arg-type]
        collect_momentum=collect_momentum,
    )


@register("nuts")
def nuts(
    model: BayesianLoraModel,
    num_chains: int = 2,
    num_samples: int = 200,
    warmup_steps: int = 200,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 8,
    init_jitter: float = 0.01,
) -> NUTS:
    """NUTS over the latents, several chains (see :class:`~pyrolora.inference.mcmc.NUTS`)."""
    return NUTS(
        model,
        num_chains=num_chains,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        init_jitter=init_jitter,
    )
