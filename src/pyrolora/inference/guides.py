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
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroModule, PyroParam
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.laplace import Laplace
from pyrolora.inference.mcmc import NUTS
from pyrolora.inference.swag import SWAG
from pyrolora.models import BayesianLoraModel

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
    """``AutoDelta`` with the full guide contract: every quantile of a point mass is the point itself.

    The point of site ``name`` lives at ``guide.points.<name>`` (constrained by the site's support). Pyro's
    ``AutoDelta`` would set it on the guide itself by the dotted site name, and a site path that starts with
    ``model.`` (Llama and most decoder models) then resolves through the guide's ``model`` property into the
    model: the parameters land outside ``guide.parameters()`` and are never trained. Hence the container.
    """

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        autoguide.AutoGuide._setup_prototype(self, *args, **kwargs)  # the trace only; the points are made here
        self.points = PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            value = site["value"].detach()  # the data plate is entered after the adapter sites: no repeat needed
            deep_setattr(self.points, name, PyroParam(value, site["fn"].support, site["fn"].event_dim))

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Sample every latent site as a Delta at its point; returns ``{site: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with contextlib.ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                point = operator.attrgetter(name)(self.points)
                result[name] = pyro.sample(name, dist.Delta(point, event_dim=site["fn"].event_dim))
        return result

    def set_latents(self, values: dict[str, torch.Tensor]) -> None:
        """Move the point of every site in ``values`` (each of the site's shape, e.g. (r, r)) there."""
        if self.prototype_trace is None:
            raise ConfigError("the delta guide has no points yet; call it once (e.g. guides.setup) first.")
        sites = dict(self.prototype_trace.iter_stochastic_nodes())
        with torch.no_grad():
            for name, value in values.items():
                if name not in sites:
                    raise ConfigError(f"no latent site named {name!r}; the sites are {sorted(sites)}.")
                owner_path, _, leaf = name.rpartition(".")
                owner = operator.attrgetter(owner_path)(self.points) if owner_path else self.points
                raw = owner._parameters[f"{leaf}_unconstrained"]  # PyroParam keeps the unconstrained tensor here
                raw.copy_(biject_to(sites[name]["fn"].support).inv(value.to(raw)).reshape(raw.shape))

    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        qs = torch.as_tensor(quantiles)
        return {name: value.expand(len(qs), *value.shape) for name, value in self.median(*args, **kwargs).items()}


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
    return autoguide.AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=_positive(init_scale, "init_scale"))


class Blockwise(autoguide.AutoGuideList):
    """One low-rank-plus-diagonal Gaussian per adapted module, independent across modules.

    ``q(θ) = Π_l N(μ_l, L_l L_lᵀ + diag(d_l))`` with ``L_l`` of shape (r², K): the block-diagonal alternative to
    one joint ``lowrank`` Gaussian, which cannot represent correlations between modules but costs nothing to
    shard. Latent sites that are not adapter cores (hyperparameters of a hierarchical prior) get a mean-field
    normal. Part ``i`` of the list is the guide of ``model.site_names[i]`` and has its own ``get_posterior()``;
    :meth:`get_posterior` joins them exactly. Stores D·(K + 2) numbers (K capped at r² per block).
    """

    def __init__(self, model: BayesianLoraModel, rank: int = 2, init_scale: float = DEFAULT_INIT_SCALE) -> None:
        super().__init__(model)
        for name, shape in model.adapters.shapes.items():
            size = 1
            for n in shape:
                size *= n
            block = poutine.block(model, expose=[name])
            self.append(
                autoguide.AutoLowRankMultivariateNormal(
                    block, rank=min(rank, size), init_scale=init_scale, init_loc_fn=init_to_feasible
                )
            )
        with torch.random.fork_rng():
            names = [n for n, s in poutine.trace(model).get_trace(None).iter_stochastic_nodes()]
        others = [n for n in names if n not in model.adapters]
        if others:
            rest = poutine.block(model, expose=others)
            self.append(autoguide.AutoNormal(rest, init_loc_fn=init_to_feasible, init_scale=init_scale))

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.LowRankMultivariateNormal:
        """The exact joint posterior over all latents, unconstrained, in the model's trace order (the order of
        every ``AutoContinuous`` guide, e.g. ``lowrank``).

        Independent blocks ``N(μ_l, F_l F_lᵀ + diag(d_l))`` join into one low-rank-plus-diagonal Gaussian::

            μ = concat_l μ_l   (D,)        d = concat_l d_l   (D,)
            F = blockdiag(F_1, ..., F_L)   (D, Σ_l K_l)

        since ``F Fᵀ`` is then block-diagonal with blocks ``F_l F_lᵀ``; a mean-field site (a hyperparameter,
        unconstrained) contributes its loc, its variance to d and a zero-width block to F.
        """
        if self.prototype_trace is None:
            raise ConfigError("the blockwise guide has no parameters yet; fit it or call guides.setup(guide, model).")
        blocks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for part in self:
            if isinstance(part, autoguide.AutoLowRankMultivariateNormal):
                (name,) = [n for n, _ in part.prototype_trace.iter_stochastic_nodes()]
                block = part.get_posterior()
                blocks[name] = (block.loc, block.cov_factor, block.cov_diag)  # (n,), (n, K), (n,)
            else:
                for name, _ in part.prototype_trace.iter_stochastic_nodes():
                    loc, scale = part._get_loc_and_scale(name)
                    loc, scale = loc.reshape(-1), scale.reshape(-1)
                    blocks[name] = (loc, loc.new_zeros(loc.numel(), 0), scale.square())
        order = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        locs, factors, diags = zip(*(blocks[name] for name in order), strict=True)
        factor = torch.block_diag(*factors)  # (D, Σ K_l)
        return dist.LowRankMultivariateNormal(torch.cat(locs), factor, torch.cat(diags))


@register("blockwise")
def blockwise(model: BayesianLoraModel, rank: int = 2, init_scale: float = DEFAULT_INIT_SCALE) -> Blockwise:
    """An independent rank-``rank`` low-rank Gaussian per adapted module (see :class:`Blockwise`)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"blockwise guide rank K must be a positive integer, got {rank!r}.")
    return Blockwise(model, rank=rank, init_scale=_positive(init_scale, "init_scale"))


class Flow(autoguide.AutoIAFNormal):
    """A normalizing flow: ``z = f_T ∘ ... ∘ f_1(ε)``, ``ε ~ N(0, I)``, each ``f_t`` an inverse autoregressive
    affine transform (Kingma et al., 2016) made by a MADE network, then each site mapped to its support.

    Can represent skewed and correlated non-Gaussian posteriors. ``median`` and ``quantiles`` have no closed
    form: they are Monte Carlo estimates from ``num_mc`` draws at a fixed seed (their error is about
    ``sd / sqrt(num_mc)`` for the median). Stores about ``T·(2·D·H + H²)`` numbers for hidden width H.
    """

    def __init__(self, model: BayesianLoraModel, hidden_dim: int | None, num_transforms: int, num_mc: int) -> None:
        super().__init__(model, hidden_dim=None if hidden_dim is None else [hidden_dim], num_transforms=num_transforms)
        self.num_mc = num_mc

    @torch.no_grad()
    def _mc_draws(self) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            raise ConfigError("the flow guide has no parameters yet; fit it or call guides.setup(guide, model).")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            z = self.get_posterior().sample((self.num_mc,))  # (M, D)
        from torch.distributions import biject_to

        return {site["name"]: biject_to(site["fn"].support)(u) for site, u in self._unpack_latent(z)}

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {k: v.median(0).values for k, v in self._mc_draws().items()}

    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in self._mc_draws().items():
            out[name] = torch.quantile(value, torch.as_tensor(quantiles, dtype=value.dtype), dim=0)
        return out


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
