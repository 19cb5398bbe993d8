"""A shared base for the posterior families that start from a point estimate: Laplace, SWAG and NUTS.

All three run MAP training first, over one unconstrained latent vector ``z`` of dimension D (every latent site of
the model, adapter cores and hyperparameters alike, flattened in trace order, with constrained sites mapped to
the real line as in Pyro's :class:`~pyro.infer.autoguide.AutoContinuous`). Until their second stage has run
they are a point mass ``q(z) = δ(z - loc)``, which ``fit`` trains like any guide. The second stage (a Hessian, a
collection of iterates, a Markov chain) then replaces the point mass by the family's posterior.

The one piece they share besides that is the full-data negative log joint over ``z``::

    U(z) = -log p(y_{1:N} | θ(z)) - log p(θ(z)) - log |det ∂θ/∂z|

evaluated over a re-iterable of minibatches without the model needing to accept all data at once (see
:func:`full_data_loss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_feasible
from torch import nn
from torch.distributions import biject_to

from pyrolora.errors import ConfigError
from pyrolora.inference.batches import split_batch, to_device

__all__ = ["PointStart", "collect_batches", "full_data_loss", "unpack_draws"]


def unpack_draws(guide: AutoContinuous, z: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Constrained per-site values from unconstrained vectors.

    Args:
        guide: a set-up ``AutoContinuous`` guide (it knows the site order and supports).
        z: unconstrained latent vectors, shape (*batch, D).
        names: sites to return; default all.

    Returns:
        ``{site: value}`` with value shape (*batch, *site_shape).
    """
    wanted = None if names is None else set(names)
    out = {}
    for site, unconstrained in guide._unpack_latent(z):
        if wanted is None or site["name"] in wanted:
            out[site["name"]] = biject_to(site["fn"].support)(unconstrained)
    return out


class PointStart(AutoContinuous):
    """``AutoContinuous`` with a point-mass stage: ``q(z) = δ(z - loc)`` until :meth:`posterior` is available.

    Subclasses implement :meth:`fitted` (whether the second stage has run), :meth:`fitted_posterior` (the
    distribution over z afterwards) and ``fit_posterior`` (the whole procedure). ``loc`` (D,) is a trainable
    parameter created with the guide's other state on first call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, init_loc_fn=init_to_feasible)
        self._point_override: torch.Tensor | None = None
        self._map_stage = False
        adapters = getattr(model, "adapters", None)
        self._adapter_sites = tuple(adapters) if adapters is not None else None

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.loc = nn.Parameter(self._init_loc())  # (D,)
        self._setup_state()

    def _setup_state(self) -> None:
        """Register the family's buffers; their shapes may depend on ``self.latent_dim``."""

    def fitted(self) -> bool:
        raise NotImplementedError

    def fitted_posterior(self) -> dist.Distribution:
        raise NotImplementedError

    @contextlib.contextmanager
    def map_stage(self) -> Iterator[None]:
        """Within the block the guide is the point mass at ``loc`` even when its posterior is fitted."""
        previous, self._map_stage = self._map_stage, True
        try:
            yield
        finally:
            self._map_stage = previous

    @contextlib.contextmanager
    def at_point(self, z: torch.Tensor) -> Iterator[None]:
        """Within the block the guide is the point mass at ``z`` (for potentials and Hessians)."""
        previous, self._point_override = self._point_override, z
        try:
            yield
        finally:
            self._point_override = previous

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        """The fitted posterior over z, or the point mass ``δ(z - loc)`` before (and during) MAP training."""
        if self._point_override is not None:
            return dist.Delta(self._point_override).to_event(1)
        if self._map_stage or not self.fitted():
            return dist.Delta(self.loc).to_event(1)
        return self.fitted_posterior()

    def draw_unconstrained(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of z from the fitted posterior (the point ``loc`` before), shape (S, D)."""
        self._require_setup()
        if not self.fitted():
            return self.loc.detach().expand(num_samples, -1).clone()
        return self.fitted_posterior().sample((num_samples,)).detach()

    @torch.no_grad()
    def sample_latents(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` joint draws of every adapter core, ``{site: (S, r, r)}``, the contract of
        :func:`pyrolora.inference.draw_latents`; hyperparameter sites are left out."""
        return unpack_draws(self, self.draw_unconstrained(num_samples), self._adapter_sites)

    def point(self) -> torch.Tensor:
        """The MAP point ``loc`` (D,), detached."""
        return self.loc.detach()

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise ConfigError(
                f"the {type(self).__name__} guide has no parameters yet; fit it (pyrolora.fit_posterior) or call "
                "pyrolora.guides.setup(guide, model) first."
            )


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ConfigError("cannot tell the batch size of an input mapping without tensors.")


def full_data_loss(
    model: nn.Module, guide: PointStart, z: torch.Tensor, batches: list[tuple[Any, torch.Tensor]]
) -> torch.Tensor:
    """``U(z)``, the full-data negative log joint in unconstrained coordinates (see the module docstring).

    Each batch b of size B_b gives Pyro's point-mass ELBO loss ``L_b(z) = -(N/B_b) log p(y_b|θ) - log p(θ) -
    log|J|``; the weighted sum ``Σ_b (B_b / Σ B) L_b`` counts the prior and Jacobian once and the likelihood
    with weight ``N / Σ B`` (exactly once when the batches cover the N training examples).

    Args:
        model: the Bayesian model.
        guide: the point-start guide (set up).
        z: unconstrained latent vector (D,), may require grad.
        batches: ``(inputs, targets)`` pairs already on the model's device.
    """
    sizes = [_batch_size(inputs) for inputs, _ in batches]
    total = float(sum(sizes))
    loss = z.new_zeros(())
    with guide.at_point(z), pyro.settings.context(module_local_params=True):
        for (inputs, targets), size in zip(batches, sizes, strict=True):
            guide_trace = poutine.trace(guide).get_trace(inputs, targets)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(inputs, targets)
            loss = loss + (size / total) * (guide_trace.log_prob_sum() - model_trace.log_prob_sum())
    return loss


def collect_batches(data: Iterable[Any], device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """Every ``(inputs, targets)`` batch of one pass over ``data``, on ``device``; targets are required."""
    batches = []
    for batch in data:
        inputs, targets = split_batch(to_device(batch, device))
        if targets is None:
            raise ConfigError("the posterior's full-data stage needs (inputs, targets) batches with targets.")
        batches.append((inputs, targets))
    if not batches:
        raise ConfigError("the data yielded no batches; check the dataset and the batch size.")
    return batches
