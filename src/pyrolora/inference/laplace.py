"""The Laplace approximation at the MAP, with damping so that it survives non-convex problems.

At the MAP ``ẑ`` of the unconstrained latent vector, the posterior is approximated by ``N(ẑ, P⁻¹)`` where the
precision ``P`` is the Hessian of the full-data negative log joint ``U(z)`` (see
:func:`pyrolora.inference.latent.full_data_loss`), made positive definite::

    H = ∇² U(ẑ)            (D, D), symmetrised
    H = V diag(λ) Vᵀ       eigendecomposition
    P = V diag(max(λ, 0) + δ) Vᵀ

with damping ``δ > 0``. Negative curvature (a saddle or an unconverged MAP, common in non-convex networks)
is clipped to zero before damping, so ``P ⪰ δ I`` always; plain ``AutoLaplaceApproximation`` fails there
with a Cholesky error. The Hessian costs D backward passes over the data and D² numbers: use this family for
a few thousand latents at most.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from pyrolora.errors import ConfigError, DivergenceError
from pyrolora.inference.latent import PointStart, collect_batches, full_data_loss
from pyrolora.inference.svi import fit

__all__ = ["Laplace"]


class Laplace(PointStart):
    """A damped Laplace approximation ``q(z) = N(ẑ, P⁻¹)``, ``P = psd(∇²U(ẑ)) + δ I``.

    Before :meth:`compute` has run the guide is the point mass at ``loc`` (MAP training with :func:`~pyrolora.fit`);
    :meth:`fit_posterior` runs both stages. Stores D (loc) + D² (Cholesky factor of the covariance) numbers.

    Args:
        model: the Bayesian model.
        damping: δ, added to the clipped Hessian eigenvalues; a prior-like floor on the precision.
    """

    scale_tril: torch.Tensor
    computed: torch.Tensor

    def __init__(self, model: nn.Module, damping: float = 1e-2) -> None:
        if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping > 0:
            raise ConfigError(f"laplace damping must be a positive number, got {damping!r}.")
        super().__init__(model)
        self.damping = float(damping)

    def _setup_state(self) -> None:
        d = self.latent_dim
        self.register_buffer("scale_tril", torch.eye(d, dtype=self.loc.dtype, device=self.loc.device))  # (D, D)
        self.register_buffer("computed", torch.zeros((), dtype=torch.bool, device=self.loc.device))

    def fitted(self) -> bool:
        return bool(self.computed)

    def fitted_posterior(self) -> dist.Distribution:
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fitted():
            return self.loc, torch.full_like(self.loc, 1e-12)
        return self.loc, self.scale_tril.pow(2).sum(-1).sqrt()

    @torch.no_grad()
    def compute(self, model: nn.Module, data: Iterable[Any], *, progress: bool = False) -> torch.Tensor:
        """Compute the damped Hessian at ``loc`` over one pass of ``data`` and switch to the Gaussian.

        Returns:
            The eigenvalues λ of the raw symmetrised Hessian (D,), ascending, for inspection (negative ones were
            clipped).

        Raises:
            DivergenceError: when the Hessian is not finite.
        """
        self._require_setup()
        batches = collect_batches(data, self.loc.device)
        z0 = self.loc.detach().clone()
        d = z0.numel()
        # Double backward through scaled-dot-product attention exists only in its math kernel on the CPU.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            z = z0.clone().requires_grad_(True)
            loss = full_data_loss(model, self, z, batches)
            (grad,) = torch.autograd.grad(loss, z, create_graph=True)
            rows = []
            for i in tqdm(range(d), desc="laplace hessian", disable=not progress, unit="row", dynamic_ncols=True):
                (row,) = torch.autograd.grad(grad[i], z, retain_graph=i < d - 1)
                rows.append(row)
        hessian = torch.stack(rows)  # (D, D)
        hessian = 0.5 * (hessian + hessian.T)
        if not torch.isfinite(hessian).all():
            raise DivergenceError("the Hessian at the MAP is not finite; train the MAP longer or lower lr.")
        eigvals, eigvecs = torch.linalg.eigh(hessian)  # (D,), (D, D)
        precision_eig = eigvals.clamp_min(0.0) + self.damping
        covariance = (eigvecs / precision_eig) @ eigvecs.T  # V diag(1/λ') Vᵀ
        covariance = 0.5 * (covariance + covariance.T)
        self.scale_tril.copy_(torch.linalg.cholesky(covariance))
        self.computed.fill_(True)
        return eigvals

    def fit_posterior(self, model: nn.Module, data: Iterable[Any], **fit_kwargs: Any):
        """MAP training with :func:`pyrolora.fit` (``fit_kwargs`` as there), then :meth:`compute` on ``data``."""
        # The Hessian is that of the untempered negative log joint, so the MAP must be its mode: β = 1 unless the
        # caller asks for another (fit's default β = 0.1 is the variational recipe's, not Laplace's).
        fit_kwargs.setdefault("kl_weight", 1.0)
        with self.map_stage():
            result = fit(model, self, data, **fit_kwargs)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            self.compute(model, data, progress=fit_kwargs.get("progress", True))
        finally:
            model.train(was_training)
        result.seconds += time.perf_counter() - start
        return result
