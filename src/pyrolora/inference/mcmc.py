"""Hamiltonian Monte Carlo (NUTS) over the adapter latents: ground truth where it is affordable.

NUTS samples the unconstrained latent vector z (D numbers: every adapter core, plus hyperparameters of a
hierarchical prior) from ``p(z | data) ∝ exp(-U(z))`` with the full-data potential of
:func:`pyrolora.inference.latent.full_data_loss`; every gradient is a full pass over the training data, so this
family is for small models or for adapters on the last layers only. The task head stays at its current value
(train it first, e.g. with the MAP stage of :meth:`NUTS.fit_posterior`).

Chains run one after another in this process (Pyro's multi-process chains do not mix with transformers
models), each from the MAP point plus Gaussian jitter, with step size and a diagonal mass matrix adapted
during warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.mcmc import MCMC
from pyro.infer.mcmc import NUTS as _NUTSKernel
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.families import setup
from pyrolora.inference.latent import PointStart, collect_batches, full_data_loss, unpack_draws
from pyrolora.inference.svi import FitResult, fit
from pyrolora.validation import positive_int

__all__ = ["NUTS"]


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    return positive_int(value, f"nuts {what}", minimum)


class NUTS(PointStart):
    """The No-U-Turn sampler as a posterior family with the guide contract.

    Attributes:
        chains: the draws of every chain, unconstrained, shape (C, S, D) (C = ``num_chains``, S =
            ``num_samples``). For adapter cores the unconstrained value is the value itself. Use
            :meth:`chain_samples` for per-site constrained draws with a chain dimension (what ArviZ's R-hat
            needs), and :meth:`sample_latents` for pooled draws (what ``predict`` uses).

    Stores D + C·S·D numbers. Before sampling the guide is the point mass at ``loc`` (trainable by ``fit``).

    Args:
        model: the Bayesian model.
        num_chains: C, independent chains (>= 2 makes R-hat meaningful).
        num_samples: S, draws kept per chain.
        warmup_steps: adaptation steps per chain, discarded.
        target_accept_prob: NUTS's step-size adaptation target.
        max_tree_depth: cap on the trajectory doubling (2^depth leapfrog steps at most).
        init_jitter: standard deviation of the Gaussian jitter added to the MAP point to start each chain.
    """

    chains: torch.Tensor
    sampled: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        num_chains: int = 2,
        num_samples: int = 200,
        warmup_steps: int = 200,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 8,
        init_jitter: float = 0.01,
    ) -> None:
        super().__init__(model)
        self.num_chains = _positive_int(num_chains, "num_chains")
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.warmup_steps = _positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.max_tree_depth = _positive_int(max_tree_depth, "max_tree_depth")
        if not (isinstance(target_accept_prob, float) and 0 < target_accept_prob < 1):
            raise ConfigError(f"nuts target_accept_prob must be in (0, 1), got {target_accept_prob!r}.")
        self.target_accept_prob = target_accept_prob
        if isinstance(init_jitter, bool) or not isinstance(init_jitter, int | float) or init_jitter < 0:
            raise ConfigError(f"nuts init_jitter must be >= 0, got {init_jitter!r}.")
        self.init_jitter = float(init_jitter)
        self.diagnostics: list[dict[str, Any]] = []

    def _setup_state(self) -> None:
        like = self.loc.detach()
        self.register_buffer("chains", like.new_zeros(self.num_chains, self.num_samples, self.latent_dim))
        self.register_buffer("sampled", torch.zeros((), dtype=torch.bool, device=like.device))

    def fitted(self) -> bool:
        return self.prototype_trace is not None and bool(self.sampled)

    def fitted_posterior(self) -> dist.Distribution:
        """A point mass at one uniformly chosen draw (so that calling the guide yields a posterior draw)."""
        pooled = self.chains.reshape(-1, self.latent_dim)
        index = torch.randint(pooled.shape[0], ())
        return dist.Delta(pooled[index]).to_event(1)

    def draw_unconstrained(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws evenly spaced through the pooled chains (deterministic), shape (S, D).

        With more requested than stored, draws repeat.
        """
        self._require_setup()
        if not self.fitted():
            return self.loc.detach().expand(num_samples, -1).clone()
        pooled = self.chains.reshape(-1, self.latent_dim)  # (C·S, D), chain-major
        index = torch.linspace(0, pooled.shape[0] - 1, num_samples, device=pooled.device).round().long()
        return pooled[index].clone()

    def chain_samples(self) -> dict[str, torch.Tensor]:
        """Per-site constrained draws with the chain dimension, ``{site: (C, S, *site_shape)}``, all sites."""
        self._require_setup()
        return unpack_draws(self, self.chains)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fitted():
            return self.loc, torch.full_like(self.loc, 1e-12)
        pooled = self.chains.reshape(-1, self.latent_dim)
        return pooled.mean(0), pooled.std(0).clamp_min(1e-12)

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The per-coordinate sample median (for constrained sites, of the transformed draws)."""
        if not self.fitted():
            return super().median(*args, **kwargs)
        return {k: v.flatten(0, 1).median(0).values for k, v in self.chain_samples().items()}

    @torch.no_grad()
    def quantiles(self, quantiles: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Empirical quantiles of the pooled draws, ``{site: (len(quantiles), *site_shape)}``."""
        if not self.fitted():
            return super().quantiles(quantiles, *args, **kwargs)
        out = {}
        for name, value in self.chain_samples().items():
            pooled = value.flatten(0, 1)
            qs = torch.as_tensor(quantiles, dtype=pooled.dtype, device=pooled.device)
            out[name] = torch.quantile(pooled, qs, dim=0)
        return out

    def sample(self, model: nn.Module, data: Iterable[Any], *, seed: int | None = None, progress: bool = False):
        """Run the chains from ``loc`` on the full data and store them in :attr:`chains`.

        Returns:
            The per-chain diagnostics Pyro reports (divergences, acceptance rate), also kept in
            ``self.diagnostics``.
        """
        self._require_setup()
        batches = collect_batches(data, self.loc.device)
        start = self.loc.detach().clone()
        was_training = model.training
        model.eval()
        self.diagnostics = []
        with torch.random.fork_rng(devices=[start.device] if start.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                for chain in range(self.num_chains):
                    kernel = _NUTSKernel(
                        potential_fn=lambda params: full_data_loss(model, self, params["z"], batches),
                        adapt_step_size=True,
                        adapt_mass_matrix=True,
                        target_accept_prob=self.target_accept_prob,
                        max_tree_depth=self.max_tree_depth,
                    )
                    init = start + self.init_jitter * torch.randn_like(start)
                    mcmc = MCMC(
                        kernel,
                        num_samples=self.num_samples,
                        warmup_steps=self.warmup_steps,
                        initial_params={"z": init},
                        num_chains=1,
                        disable_progbar=not progress,
                    )
                    mcmc.run()
                    draws = mcmc.get_samples()["z"].detach()  # (S, D)
                    self.chains[chain].copy_(draws.to(self.chains.dtype))
                    # Pyro's split R-hat needs at least 4 draws per chain.
                    self.diagnostics.append(mcmc.diagnostics() if self.num_samples >= 4 else {})
            finally:
                model.train(was_training)
        self.sampled.fill_(True)
        return self.diagnostics

    def fit_posterior(
        self, model: nn.Module, data: Iterable[Any], *, sample_data: Iterable[Any] | None = None, **fit_kwargs: Any
    ):
        """MAP training with :func:`pyrolora.fit` (when ``num_epochs`` or ``num_steps`` is given), then NUTS.

        ``sample_data`` (default ``data``) is what the chains' full-data potential iterates over: the same
        training examples, e.g. in larger batches than MAP training uses (every leapfrog step passes over all of
        them, so on a GPU a few large batches are much faster than many small ones; the potential is the same).

        Returns a :class:`~pyrolora.inference.FitResult` whose losses are the MAP stage's and whose
        ``seconds`` include sampling.
        """
        if fit_kwargs.get("num_epochs") is not None or fit_kwargs.get("num_steps") is not None:
            with self.map_stage():
                # the chains sample the untempered posterior: start them at its mode (β = 1 unless asked otherwise)
                fit_kwargs.setdefault("kl_weight", 1.0)
                result = fit(model, self, data, **fit_kwargs)
        else:
            result = FitResult(dataset_size=getattr(model, "dataset_size", 1))
            if self.prototype_trace is None:
                setup(self, model)
        begin = time.perf_counter()
        chain_data = data if sample_data is None else sample_data
        self.sample(model, chain_data, seed=fit_kwargs.get("seed"), progress=fit_kwargs.get("progress", True))
        result.seconds += time.perf_counter() - begin
        return result
