"""Building blocks of the posterior families: the guide classes pyrolora adds to Pyro's autoguides, and the
checks every guide passes through before it is fit or used.

- :class:`PointMass`: ``AutoDelta`` with the full guide contract (the MAP).
- :class:`Blockwise`: one low-rank-plus-diagonal Gaussian per adapted module.
- :class:`Flow`: an inverse autoregressive flow with Monte Carlo ``median`` / ``quantiles``.
- :func:`setup` (create a guide's parameters without data) and :func:`check_local` (Pyro's module-local
  parameter mode, the one :func:`pyrolora.fit` uses).

This module imports nothing else of :mod:`pyrolora.inference`: the registry (:mod:`~pyrolora.inference.guides`),
the fitting procedures (``svi``, ``lean``, ``swag``, ``laplace``, ``mcmc``) and prediction import it, never the
other way round.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
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
from pyrolora.models import BayesianLoraModel

__all__ = ["Blockwise", "Flow", "PointMass", "check_local", "setup"]


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


class Blockwise(autoguide.AutoGuideList):
    """One low-rank-plus-diagonal Gaussian per adapted module, independent across modules.

    ``q(θ) = Π_l N(μ_l, L_l L_lᵀ + diag(d_l))`` with ``L_l`` of shape (r², K): the block-diagonal alternative to
    one joint ``lowrank`` Gaussian, which cannot represent correlations between modules but costs nothing to
    shard. Latent sites that are not adapter cores (hyperparameters of a hierarchical prior) get a mean-field
    normal. Part ``i`` of the list is the guide of ``model.site_names[i]`` and has its own ``get_posterior()``;
    :meth:`get_posterior` joins them exactly. Stores D·(K + 2) numbers (K capped at r² per block).
    """

    def __init__(self, model: BayesianLoraModel, rank: int, init_scale: float) -> None:
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
