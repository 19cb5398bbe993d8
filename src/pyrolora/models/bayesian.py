"""The Bayesian LoRA-XS model: backbone, adapters, prior and likelihood composed into one Pyro model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pyro
import torch
from torch import nn

from pyrolora.adapters import HEAD_MODULE_NAMES, AdapterSet
from pyrolora.errors import ConfigError
from pyrolora.models import likelihoods as lik
from pyrolora.models import priors as pri
from pyrolora.models.likelihoods import check_targets

__all__ = ["BayesianLoraModel", "Inputs", "default_output_fn"]

#: What the backbone accepts: a dict of keyword arguments (tokenizer output) or one tensor.
Inputs = Mapping[str, torch.Tensor] | torch.Tensor


def default_output_fn(output: Any) -> torch.Tensor:
    """The tensor the likelihood sees: the backbone's output itself, or its ``logits`` field."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find a tensor in the backbone's output of type {type(output).__name__}; "
        "pass output_fn=... to BayesianLoraModel to say which tensor the likelihood should use."
    )


def _repeat_samples(inputs: Inputs, samples: int) -> Inputs:
    """Tile every input tensor ``samples`` times along dim 0, sample-major: row s·B + b is row b."""

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(samples, *([1] * (t.dim() - 1)))

    if isinstance(inputs, torch.Tensor):
        return tile(inputs)
    return {k: tile(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}


class BayesianLoraModel(nn.Module):
    """A Pyro model over the LoRA-XS latents of one backbone.

    Generative story, for a minibatch of B examples out of N::

        R_l ~ prior(site_l, (r, r))                 for every adapted module l (outside the data plate)
        f(x) = backbone(x) with W_l -> W_l + (alpha / r) B_l R_l A_l
        y_i ~ likelihood(f(x_i))                    in pyro.plate("data", N, subsample of size B)

    The plate scales the minibatch log-likelihood by N / B, so the ELBO is an unbiased estimate of the
    full-data ELBO. The task head (parameters of ``head`` modules) is a point estimate: its parameters keep
    ``requires_grad=True`` and are trained by :func:`pyrolora.fit` alongside the guide. Every other backbone
    parameter is frozen. The backbone is never turned into a Pyro module: only the adapter latents and the
    observation site appear in traces.

    Args:
        backbone: any ``nn.Module`` with adapters already injected (see :func:`pyrolora.inject_adapters`).
        adapters: the :class:`~pyrolora.adapters.AdapterSet` returned by injection.
        prior: a prior (callable ``(site_name, shape) -> Distribution``), a mapping site-name-or-suffix ->
            prior, or a distribution. Default: ``IsotropicNormal(0.1)``.
        likelihood: default :class:`~pyrolora.models.likelihoods.Categorical`.
        dataset_size: N, the number of training examples, for minibatch scaling.
        head: names of backbone submodules that form the trainable task head. ``"auto"`` takes the top-level
            children called ``classifier``, ``score``, ``qa_outputs`` or ``pre_classifier``; ``()`` means none.
        output_fn: maps the backbone's output to the likelihood's input. Default: the output itself, or its
            ``logits`` field.
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapters: AdapterSet,
        *,
        prior: Any = None,
        likelihood: lik.Likelihood | None = None,
        dataset_size: int,
        head: Sequence[str] | Literal["auto"] = "auto",
        output_fn: Callable[[Any], torch.Tensor] = default_output_fn,
    ) -> None:
        super().__init__()
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ConfigError(f"dataset_size must be a positive integer (N training examples), got {dataset_size!r}.")
        if not isinstance(adapters, AdapterSet) or not len(adapters):
            raise ConfigError("adapters must be the non-empty AdapterSet returned by inject_adapters(backbone, ...).")
        foreign = [n for n, layer in adapters.items() if backbone.get_submodule(n) is not layer]
        if foreign:
            raise ConfigError(f"adapter sites {foreign[:3]} are not part of this backbone; inject into it first.")
        self.backbone = backbone
        self.adapters = adapters
        self.prior = pri.resolve(prior)
        if callable(getattr(self.prior, "check_sites", None)):  # a per-site mapping: every key must name a site
            self.prior.check_sites(tuple(adapters.shapes))
        self.likelihood = likelihood if likelihood is not None else lik.Categorical()
        if not isinstance(self.likelihood, lik.Likelihood):
            raise ConfigError(f"likelihood must be a pyrolora Likelihood, got {type(self.likelihood).__name__}.")
        self.dataset_size = dataset_size
        self.output_fn = output_fn
        self.head_names = self._resolve_head(head)
        for p in backbone.parameters():
            p.requires_grad_(False)
        for name in self.head_names:
            for p in backbone.get_submodule(name).parameters():
                p.requires_grad_(True)

    def _resolve_head(self, head: Sequence[str] | str) -> tuple[str, ...]:
        children = dict(self.backbone.named_children())
        if head == "auto":
            return tuple(n for n in HEAD_MODULE_NAMES if n in children and n != "lm_head")
        if isinstance(head, str):
            head = (head,)
        names = tuple(head)
        for name in names:
            try:
                module = self.backbone.get_submodule(name)
            except AttributeError as err:
                raise ConfigError(
                    f"head module {name!r} is not in the backbone; its children are {sorted(children)}."
                ) from err
            if any(name == s or name.startswith(s + ".") or s.startswith(name + ".") for s in self.adapters):
                raise ConfigError(f"head module {name!r} overlaps adapter sites; a module is either head or adapted.")
            del module
        return names

    # ------------------------------------------------------------------ introspection
    @property
    def site_names(self) -> tuple[str, ...]:
        """The latent sites, in backbone order."""
        return tuple(self.adapters)

    @property
    def num_latents(self) -> int:
        """D = Σ_l r²."""
        return self.adapters.num_latents

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the point-estimate task head (trained by ``fit`` with its own learning rate)."""
        return [p for n in self.head_names for p in self.backbone.get_submodule(n).parameters()]

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's parameters and buffers keyed by their path in the backbone."""
        state: dict[str, torch.Tensor] = {}
        for name in self.head_names:
            for key, value in self.backbone.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value
        return state

    @property
    def device(self) -> torch.device:
        layer = next(iter(self.adapters.values()))
        return layer.A.device

    # ------------------------------------------------------------------ the model
    def sample_latents(self) -> dict[str, torch.Tensor]:
        """Sample every adapter core ``R`` from the prior, one site per adapted module (shape (r, r)).

        A prior with latent hyperparameters (a ``sample_hyperparameters(site_names)`` method) samples them first.
        """
        hyper = getattr(self.prior, "sample_hyperparameters", None)
        if hyper is not None:
            hyper(tuple(self.adapters.shapes))
        return {name: pyro.sample(name, self.prior(name, shape)) for name, shape in self.adapters.shapes.items()}

    def prior_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the prior (e.g. :class:`~pyrolora.models.priors.EmpiricalBayes`'s log σ)."""
        return [p for p in self.prior.parameters() if p.requires_grad]

    def prior_state(self) -> dict[str, torch.Tensor]:
        """The prior's trainable parameters keyed by their name in the prior module (saved with a run)."""
        return {n: p.detach() for n, p in self.prior.named_parameters() if p.requires_grad}

    def load_prior_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`prior_state` returned."""
        own = dict(self.prior.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    def outputs(self, inputs: Inputs, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's output tensor (e.g. logits (B, C)) with every R set to ``values[site]``."""
        with self.adapters.use(values):
            raw = self.backbone(**inputs) if isinstance(inputs, Mapping) else self.backbone(inputs)
        return self.output_fn(raw)

    def sample_outputs(
        self,
        inputs: Inputs,
        values: Mapping[str, torch.Tensor],
        outputs: Callable[[Inputs, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Outputs for S posterior samples in one forward pass.

        ``values[site]`` has shape (S, r, r); the inputs are tiled S times along the batch dimension
        (sample-major) and each adapter applies its own sample to its slice. Returns shape (S, B, ...).
        Equal to stacking :meth:`outputs` over the samples, up to floating-point reassociation. ``outputs``
        replaces :meth:`outputs` for the pass (e.g. a compiled version with the same signature).
        """
        samples = {v.shape[0] for v in values.values()}
        if len(samples) != 1:
            raise ValueError(f"every site needs the same number of samples, got {sorted(samples)}")
        (num,) = samples
        out = (outputs or self.outputs)(_repeat_samples(inputs, num), values)  # (S·B, ...)
        return out.reshape(num, out.shape[0] // num, *out.shape[1:])

    def forward(self, inputs: Inputs | None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """The Pyro model. ``targets=None`` samples predictions; ``inputs=None`` samples only the latents.

        Args:
            inputs: keyword arguments for the backbone (a tokenizer's output) or one input tensor, batch B.
            targets: observed targets, shape (B,) for classification (class indices) or (B,)/(B, d) for
                regression.

        Returns:
            The backbone's output tensor for the batch (``None`` when ``inputs`` is ``None``).
        """
        values = self.sample_latents()  # before the data plate: one R per module, not one per example
        if inputs is None:
            return None
        out = self.outputs(inputs, values)
        batch = out.shape[0]
        if batch > self.dataset_size:
            raise ConfigError(
                f"a batch of {batch} examples is larger than dataset_size={self.dataset_size}; "
                "set dataset_size to the number of training examples."
            )
        if targets is not None and targets.shape[0] != batch:
            raise ValueError(f"{targets.shape[0]} targets for a batch of {batch} inputs")
        subsample = torch.arange(batch, device=out.device)
        with pyro.plate("data", self.dataset_size, subsample=subsample):
            likelihood = self.likelihood.distribution(out)
            if targets is not None:
                check_targets(likelihood, targets)
            pyro.sample("obs", likelihood, obs=targets)
        return out
