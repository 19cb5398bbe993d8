"""A lean negative ELBO for the common case, equal to Pyro's ``Trace_ELBO`` without its per-site tracing.

``Trace_ELBO`` records the guide and replays the model through Pyro's effect handlers: every adapter site costs
a few sample statements, a ``Delta`` site, a prior object and a ``log_prob`` per step, so the overhead of a step
grows with the number of adapted modules (on a 96-site model on CPU it was more than the backbone's forward and
backward pass). For a :class:`~pyrolora.models.BayesianLoraModel` used as it is and a guide that draws every
latent jointly (Pyro's ``AutoContinuous`` family: ``lowrank``, ``diagonal``, ``full``) or is a point mass
(``delta``), the estimate can be written directly::

    θ ~ q                      one draw of the stacked vector (D,), split into the (r, r) cores by views
    loss = -( (N/B) Σ_b log p(y_b | x_b, θ) + log p(θ) - log q(θ) )

with the same random numbers Pyro would draw, so the value and its gradients equal ``Trace_ELBO``'s. When
every site has the same :class:`~pyrolora.models.priors.IsotropicNormal` prior, ``log p(θ)`` is one vectorised
call. Anything else (a subclassed model, a custom ELBO, constrained latents, another guide) takes Pyro's path.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import autoguide
from torch import nn
from torch.distributions import biject_to

from pyrolora.errors import ConfigError
from pyrolora.inference.families import PointMass
from pyrolora.models import BayesianLoraModel
from pyrolora.models.likelihoods import check_targets
from pyrolora.models.priors import IsotropicNormal

__all__ = ["LeanELBO", "supports"]


def _is_unconstrained(support: Any) -> bool:
    transform = biject_to(support)
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


def supports(model: nn.Module, guide: nn.Module) -> bool:
    """Whether :class:`LeanELBO` computes exactly what ``Trace_ELBO`` would for this model and guide.

    Needs a plain :class:`BayesianLoraModel` (its ``forward`` and ``sample_latents`` not overridden), a set-up
    ``AutoContinuous`` or ``AutoDelta`` guide (not a subclass that changes how it samples), and latents with
    unconstrained support (every built-in prior).
    """
    if not isinstance(model, BayesianLoraModel):
        return False
    cls = type(model)
    if cls.forward is not BayesianLoraModel.forward or cls.sample_latents is not BayesianLoraModel.sample_latents:
        return False
    trace = getattr(guide, "prototype_trace", None)
    if trace is None:
        return False
    if isinstance(guide, autoguide.AutoContinuous):
        if type(guide).forward is not autoguide.AutoContinuous.forward:
            return False
        if type(guide).sample_latent is not autoguide.AutoContinuous.sample_latent:
            return False
    elif isinstance(guide, autoguide.AutoDelta):
        if type(guide).forward not in (autoguide.AutoDelta.forward, PointMass.forward):
            return False
    else:
        return False
    names = [name for name, _ in trace.iter_stochastic_nodes()]
    if names != list(model.site_names):
        return False
    return all(_is_unconstrained(site["fn"].support) for _, site in trace.iter_stochastic_nodes())


class LeanELBO:
    """The negative ELBO of one minibatch for a supported model and guide (see :func:`supports`).

    Args:
        model: the Bayesian model.
        guide: a set-up ``AutoContinuous`` or ``AutoDelta`` guide of ``model``.
        num_particles: draws of θ averaged per step, as in ``Trace_ELBO(num_particles=...)``.
        autocast: a context factory wrapped around the backbone's forward pass only (e.g. bf16 autocast); the
            guide, the prior and the log-likelihood stay in float32.
        outputs: replaces ``model.outputs`` (e.g. a compiled version), called as ``outputs(inputs, values)``.

    Raises:
        ConfigError: if :func:`supports` is false for the pair.
    """

    def __init__(
        self,
        model: BayesianLoraModel,
        guide: nn.Module,
        *,
        num_particles: int = 1,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        outputs: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if not supports(model, guide):
            raise ConfigError(
                f"the lean ELBO needs a plain BayesianLoraModel and a set-up AutoContinuous or AutoDelta guide over "
                f"unconstrained latents; got {type(model).__name__} and {type(guide).__name__}. Use Trace_ELBO."
            )
        self.model = model
        self.guide = guide
        self.num_particles = num_particles
        self.autocast = autocast
        self.outputs = outputs if outputs is not None else model.outputs
        self.shapes = model.adapters.shapes  # site -> (r, r), in the guide's packing order
        self.sizes = [r * c for r, c in self.shapes.values()]
        self._joint = isinstance(guide, autoguide.AutoContinuous)
        self._getters = [] if self._joint else [self._point_getter(name) for name in self.shapes]
        #: θ = the posterior mean instead of a draw, and no log q term: the MAP objective for the guide's mean
        #: (``fit``'s warm start). Only for joint Gaussian guides.
        self.mean_only = False
        #: the two terms of the last estimate, detached: ``(E[log p(y | θ)], E[log q(θ) - log p(θ)])``, the
        #: expected log-likelihood of the whole dataset (minibatch scaled by N / B) and the KL estimate.
        self.last_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def _point_getter(self, name: str) -> Callable[[nn.Module], torch.Tensor]:
        """Reads a point mass's value. With unconstrained support the value is the stored parameter itself:
        read it directly instead of through ``PyroModule.__getattr__`` (its constraint machinery costs ~10x)."""
        parent_name, _, leaf = name.rpartition(".")
        root = getattr(self.guide, "points", self.guide)  # PointMass keeps its points in a container
        parent = operator.attrgetter(parent_name)(root) if parent_name else root
        param = getattr(parent, "_parameters", {}).get(leaf + "_unconstrained")
        if isinstance(param, nn.Parameter):
            return lambda guide: param
        return lambda guide: operator.attrgetter(name)(getattr(guide, "points", guide))

    def _draw(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | float, torch.Tensor | None]:
        """θ ~ q split into the cores, log q(θ) (0 for a point mass), and θ (D,) itself for a joint draw."""
        if self._joint:
            posterior = self.guide.get_posterior()
            if self.mean_only:  # the warm start's point: μ, with no entropy term
                theta = posterior.mean  # (D,)
                pieces = torch.split(theta, self.sizes)
                return {n: p.view(s) for (n, s), p in zip(self.shapes.items(), pieces, strict=True)}, 0.0, theta
            theta = posterior.rsample()  # (D,)
            log_q = posterior.log_prob(theta)
            pieces = torch.split(theta, self.sizes)
            values = {name: p.view(shape) for (name, shape), p in zip(self.shapes.items(), pieces, strict=True)}
            return values, log_q, theta
        # a view, not the nn.Parameter itself: assigning a Parameter to a module attribute would register it
        values = {n: get(self.guide).view(s) for (n, s), get in zip(self.shapes.items(), self._getters, strict=True)}
        return values, 0.0, None

    def _log_prior(self, values: dict[str, torch.Tensor], theta: torch.Tensor | None = None) -> torch.Tensor:
        prior = self.model.prior
        if isinstance(prior, IsotropicNormal):
            if theta is None:
                theta = torch.cat([v.reshape(-1) for v in values.values()])  # (D,)
            return torch.distributions.Normal(prior.loc, prior.scale, validate_args=False).log_prob(theta).sum()
        return sum(prior(name, shape).log_prob(values[name]) for name, shape in self.shapes.items())

    def _particle(self, inputs: Any, targets: torch.Tensor, kl_weight: float) -> torch.Tensor:
        model = self.model
        values, log_q, theta = self._draw()
        with self.autocast():
            out = self.outputs(inputs, model.adapters.compute_values(values, theta))  # all cores cast at once
        batch = out.shape[0]
        if batch > model.dataset_size:
            raise ConfigError(
                f"a batch of {batch} examples is larger than dataset_size={model.dataset_size}; "
                "set dataset_size to the number of training examples."
            )
        if targets.shape[0] != batch:
            raise ValueError(f"{targets.shape[0]} targets for a batch of {batch} inputs")
        # Check the targets against the likelihood's support whatever the global validation flags say (Pyro's
        # path does it through its validation): a label outside the classes must fail, not index garbage.
        check_targets(model.likelihood.distribution(out), targets)  # shape, e.g. (B, 1) labels where (B,) is due
        model.likelihood.distribution(out)._validate_sample(targets)
        log_lik = (model.likelihood.log_prob(out, targets) * (model.dataset_size / batch)).sum()  # as the plate
        # β: -E[log p(y|θ)] + β (log q(θ) - log p(θ)), as fit's scaled Pyro sites
        kl = log_q - self._log_prior(values, theta)
        self._terms.append((log_lik.detach(), kl.detach() if isinstance(kl, torch.Tensor) else torch.tensor(kl)))
        return -(log_lik - kl_weight * kl)

    def differentiable_loss(self, inputs: Any, targets: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """The negative ELBO estimate, averaged over ``num_particles`` draws, as a differentiable scalar.

        ``kl_weight`` is β of ``-E_q[log p(y|θ)] + β E_q[log q(θ) - log p(θ)]`` (1: the ELBO).
        """
        if targets is None:
            raise ConfigError("fit needs targets: every training batch must be an (inputs, targets) pair.")
        self._terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.mean_only and not self._joint:
            raise ConfigError("mean_only applies to joint Gaussian guides (lowrank, diagonal, full), not a point mass.")
        with pyro.settings.context(module_local_params=True):
            total = self._particle(inputs, targets, kl_weight)
            for _ in range(self.num_particles - 1):
                total = total + self._particle(inputs, targets, kl_weight)
        n = len(self._terms)
        self.last_terms = (sum(t[0] for t in self._terms) / n, sum(t[1] for t in self._terms) / n)
        return total / self.num_particles
