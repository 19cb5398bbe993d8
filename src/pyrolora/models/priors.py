"""Priors over the adapter latents.

A prior is anything callable as ``prior(site_name, shape) -> Distribution`` whose event shape is ``shape``
(``(r, r)`` for a LoRA-XS core). The built-in priors are ``nn.Module`` objects so that their parameters move
with the model between devices; a plain function works as well (it then places its tensors itself).

Swapping a prior is one argument::

    BayesianLoraModel(backbone, adapters, prior=priors.IsotropicNormal(0.05), dataset_size=n)
    BayesianLoraModel(backbone, adapters, prior={"query": priors.IsotropicNormal(0.2)}, dataset_size=n)
    BayesianLoraModel(backbone, adapters, prior=lambda name, shape: dist.Laplace(...), dataset_size=n)
    BayesianLoraModel(backbone, adapters, prior=priors.Hierarchical(per_module=True), dataset_size=n)

A prior may also own latent hyperparameters: if it has a method ``sample_hyperparameters(site_names)``, the model
calls it once per trace, before any adapter site, and the prior samples its hyperparameter sites there (see
:class:`Hierarchical`). Every guide then infers them jointly with the adapter cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import pyro.distributions as dist
import torch
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.validation import positive

__all__ = [
    "DEFAULT_SCALE",
    "EmpiricalBayes",
    "Fixed",
    "Hierarchical",
    "IsotropicNormal",
    "Laplace",
    "PerSite",
    "Prior",
    "StudentT",
    "resolve",
]

#: Default prior standard deviation of every entry of R. A throwaway prototype on SST-2 with MiniLM found
#: σ = 0.1 well calibrated and σ = 1 so wide that accuracy fell five points (see DESIGN.md).
DEFAULT_SCALE = 0.1


@runtime_checkable
class Prior(Protocol):
    """The prior contract: a distribution with event shape ``shape`` for the site ``site_name``."""

    def __call__(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution: ...


_positive = positive  # the checks of every number a user passes in: pyrolora.validation


class IsotropicNormal(nn.Module):
    """``R_ij ~ N(loc, scale²)`` independently at every site; ``scale`` is a standard deviation.

    Args:
        scale: prior standard deviation σ of each entry of R. Default 0.1.
        loc: prior mean of each entry (0 keeps the base model as the prior mode).
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, scale: float = DEFAULT_SCALE, loc: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(_positive(scale, "prior scale")))
        self.register_buffer("loc", torch.tensor(float(loc)))

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).expand(torch.Size(shape)).to_event(len(shape))

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():g}, loc={self.loc.item():g}"


class EmpiricalBayes(IsotropicNormal):
    """``R_ij ~ N(loc, σ²)`` with σ fitted by maximising the ELBO (type-II maximum likelihood, "empirical Bayes").

    ``log σ`` is an ``nn.Parameter``: :func:`pyrolora.fit` trains it with the guide's learning rate, so the
    objective is ``max_{q, σ} E_q[log p(y | θ)] - KL(q(θ) || N(loc, σ² I))``. For a Gaussian q with mean μ and
    covariance Σ over D latents the optimal σ² for fixed q is ``(||μ - loc||² + tr Σ) / D``. The fitted σ is saved
    with the run. Unlike :class:`Hierarchical` it is a point estimate, so it adds no latent site.

    Args:
        scale: the initial σ. Default 0.1.
        loc: prior mean of each entry (fixed).
    """

    def __init__(self, scale: float = DEFAULT_SCALE, loc: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.log_scale = nn.Parameter(torch.tensor(math.log(_positive(scale, "prior scale"))))
        self.register_buffer("loc", torch.tensor(float(loc)))

    @property  # type: ignore[override]
    def scale(self) -> torch.Tensor:
        """σ = exp(log σ), differentiable."""
        return self.log_scale.exp()


class Fixed(nn.Module):
    """The same distribution at every site, expanded to the site's shape when its event shape is ``()``."""

    def __init__(self, distribution: dist.Distribution) -> None:
        super().__init__()
        self.distribution = distribution

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        d = self.distribution
        if tuple(d.event_shape) == tuple(shape):
            return d
        if d.event_shape == () and d.batch_shape == ():
            return d.expand(torch.Size(shape)).to_event(len(shape))
        raise ConfigError(
            f"prior distribution {d} has event shape {tuple(d.event_shape)} but site {site_name!r} needs "
            f"{tuple(shape)}; give a scalar distribution or one of event shape {tuple(shape)}."
        )


class PerSite(nn.Module):
    """A different prior per site.

    Keys are site names (dotted module paths) or name suffixes (``"query"`` matches every site whose path ends
    with ``".query"``); an exact name wins over a suffix. Values are priors or distributions. Sites that match
    no key use ``default``.

    Raises:
        ConfigError: when a site matches two suffix keys, or matches none and there is no default.
    """

    def __init__(self, mapping: Mapping[str, Prior | dist.Distribution], default: Prior | None = None) -> None:
        super().__init__()
        if not mapping:
            raise ConfigError("a per-site prior needs at least one entry.")
        self.keys = tuple(mapping)
        self.entries = nn.ModuleList([resolve(v) for v in mapping.values()])
        self.default = resolve(default) if default is not None else IsotropicNormal()

    def prior_for(self, site_name: str) -> Prior:
        """The prior that applies to ``site_name``."""
        if site_name in self.keys:
            return self.entries[self.keys.index(site_name)]
        hits = [i for i, k in enumerate(self.keys) if site_name.endswith("." + k)]
        if len(hits) > 1:
            raise ConfigError(
                f"site {site_name!r} matches several prior keys {[self.keys[i] for i in hits]}; "
                "use the full site name to choose one."
            )
        return self.entries[hits[0]] if hits else self.default

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        return self.prior_for(site_name)(site_name, shape)

    def check_sites(self, site_names: tuple[str, ...]) -> None:
        """Refuse a key that matches no site (a misspelt name would silently leave its sites on the default).

        Raises:
            ConfigError: naming the key and some of the site names.
        """
        for key in self.keys:
            if not any(name == key or name.endswith("." + key) for name in site_names):
                suffixes = sorted({name.rsplit(".", 1)[-1] for name in site_names})
                raise ConfigError(
                    f"the prior key {key!r} matches no adapter site; give a site name (e.g. {site_names[0]!r}) or "
                    f"a suffix of one ({suffixes})."
                )

    def sample_hyperparameters(self, site_names: tuple[str, ...]) -> None:
        """Let every hierarchical entry sample its hyperparameters for the sites it covers."""
        groups: dict[int, list[str]] = {}
        for name in site_names:
            groups.setdefault(id(self.prior_for(name)), []).append(name)
        for entry in (*self.entries, self.default):
            hook = getattr(entry, "sample_hyperparameters", None)
            if hook is not None and id(entry) in groups:
                hook(tuple(groups[id(entry)]))


class StudentT(nn.Module):
    """A heavy-tailed prior: ``R_ij ~ StudentT(df, 0, scale)`` independently at every site.

    Most entries are shrunk to zero as with a Normal of the same scale, but a few may grow large at little
    cost: the prior of sparse, localised adaptations.

    Args:
        df: degrees of freedom ν (1 is Cauchy; large ν approaches the Normal).
        scale: scale of each entry (not its standard deviation, which is ``scale·sqrt(ν/(ν-2))`` for ν > 2).
    """

    df: torch.Tensor
    scale: torch.Tensor

    def __init__(self, df: float = 3.0, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.register_buffer("df", torch.tensor(_positive(df, "Student-t prior df")))
        self.register_buffer("scale", torch.tensor(_positive(scale, "prior scale")))

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        return (
            dist.StudentT(self.df, torch.zeros_like(self.scale), self.scale)
            .expand(torch.Size(shape))
            .to_event(len(shape))
        )

    def extra_repr(self) -> str:
        return f"df={self.df.item():g}, scale={self.scale.item():g}"


class Laplace(nn.Module):
    """A heavy-tailed, sparsity-inducing prior: ``R_ij ~ Laplace(0, scale)``, density ∝ exp(-|R_ij| / scale).

    Its MAP is L1-regularised LoRA-XS. The standard deviation of each entry is ``scale·sqrt(2)``.
    """

    scale: torch.Tensor

    def __init__(self, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(_positive(scale, "prior scale")))

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        return dist.Laplace(torch.zeros_like(self.scale), self.scale).expand(torch.Size(shape)).to_event(len(shape))

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():g}"


class Hierarchical(nn.Module):
    """A scale inferred jointly with the cores: ``σ ~ LogNormal(log m, s²)``, ``R_ij | σ ~ N(0, σ²)``.

    With ``per_module=False`` one global σ is shared by every site (latent site ``"<name>"``); with
    ``per_module=True`` each adapted module l has its own ``σ_l`` (site ``"<name>/<module path>"``), so the data
    decide how far each module may move from the pretrained weights. The hyperprior's median is ``median``
    and ``log_scale`` is the standard deviation of log σ.

    The model calls :meth:`sample_hyperparameters` before the adapter sites; calling the prior outside a
    model trace is an error.

    Args:
        median: m, the hyperprior's median of σ (default 0.1, the default fixed scale).
        log_scale: s, the spread of log σ (1.0 lets σ range over about a factor e² within ±2s).
        per_module: one σ per adapted module instead of one global σ.
        name: the hyperparameter site name (prefix with ``per_module``).
    """

    median: torch.Tensor
    log_scale: torch.Tensor

    def __init__(
        self,
        median: float = DEFAULT_SCALE,
        log_scale: float = 1.0,
        *,
        per_module: bool = False,
        name: str = "prior_scale",
    ) -> None:
        super().__init__()
        self.register_buffer("median", torch.tensor(_positive(median, "hierarchical prior median")))
        self.register_buffer("log_scale", torch.tensor(_positive(log_scale, "hierarchical prior log_scale")))
        self.per_module = bool(per_module)
        if not name:
            raise ConfigError("the hierarchical prior needs a non-empty hyperparameter site name.")
        self.name = name
        self._scales: dict[str, torch.Tensor] = {}

    def hyperprior(self) -> dist.Distribution:
        """The distribution of σ."""
        return dist.LogNormal(self.median.log(), self.log_scale)

    def sample_hyperparameters(self, site_names: tuple[str, ...]) -> None:
        """Sample σ (or every σ_l) as Pyro sites and remember them for the following adapter sites."""
        import pyro

        if self.per_module:
            self._scales = {n: pyro.sample(f"{self.name}/{n}", self.hyperprior()) for n in site_names}
        else:
            scale = pyro.sample(self.name, self.hyperprior())
            self._scales = dict.fromkeys(site_names, scale)

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        try:
            scale = self._scales[site_name]
        except KeyError:
            raise ConfigError(
                f"the hierarchical prior has no scale for site {site_name!r}: it is sampled by the model "
                "(BayesianLoraModel.sample_latents); call the model, not the prior alone."
            ) from None
        batch = scale.shape  # () for one draw; (S, 1) inside a vectorised particle plate
        scale = scale.reshape(batch + (1,) * len(shape))  # (*batch, 1, 1) against the (r, r) event
        return dist.Normal(torch.zeros_like(scale), scale).expand(batch + torch.Size(shape)).to_event(len(shape))

    def extra_repr(self) -> str:
        return f"median={self.median.item():g}, log_scale={self.log_scale.item():g}, per_module={self.per_module}"


class _Callable(nn.Module):
    """Wraps a plain callable so that every prior can live inside the model's module tree."""

    def __init__(self, fn: Callable[[str, tuple[int, ...]], dist.Distribution]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        d = self.fn(site_name, shape)
        if not isinstance(d, torch.distributions.Distribution):
            raise ConfigError(f"the prior for site {site_name!r} returned {type(d).__name__}, not a distribution.")
        if tuple(d.batch_shape) != () or tuple(d.event_shape) != tuple(shape):
            raise ConfigError(
                f"the prior for site {site_name!r} returned batch shape {tuple(d.batch_shape)} and event shape "
                f"{tuple(d.event_shape)}; a site needs batch shape () and event shape {tuple(shape)}: call "
                f".to_event({len(d.batch_shape)}) on it (e.g. dist.Normal(torch.zeros(shape), 1.0).to_event(2))."
            )
        return d


def resolve(prior: Prior | Mapping | dist.Distribution | None) -> nn.Module:
    """Turn any accepted prior specification into a prior module.

    ``None`` gives :class:`IsotropicNormal` with the default scale; a mapping gives :class:`PerSite`; a
    distribution gives :class:`Fixed`; a callable is used as it is.
    """
    if prior is None:
        return IsotropicNormal()
    if isinstance(prior, nn.Module):
        return prior
    if isinstance(prior, dist.Distribution | torch.distributions.Distribution):
        return Fixed(prior)
    if isinstance(prior, Mapping):
        return PerSite(prior)
    if callable(prior):
        return _Callable(prior)
    raise ConfigError(
        f"prior must be a callable (site_name, shape) -> Distribution, a mapping from site names to priors, "
        f"or a distribution; got {type(prior).__name__}."
    )
