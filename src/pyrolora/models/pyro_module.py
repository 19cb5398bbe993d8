"""The Pyro-module form of the Bayesian LoRA-XS model: every adapter core is ``adapter.R = PyroSample(prior)``.

:class:`~pyrolora.models.BayesianLoraModel` samples each core by hand (``pyro.sample(site, prior(site, shape))``)
and hands it to its layer. :class:`PyroLoraModel` is the same model written the way Pyro's tutorials write
Bayesian layers: ``model.adapters`` is a :class:`~pyro.nn.PyroModule` whose entries carry a ``PyroSample``
attribute ``R`` of event shape (r, r), so a prior is set or replaced in plain Pyro::

    model = PyroLoraModel(backbone, adapters, dataset_size=n)
    model.adapters["bert.encoder.layer.0.attention.self.query"].R = PyroSample(
        dist.Laplace(0.0, 0.05).expand([r, r]).to_event(2)
    )
    model.adapters.tau = PyroSample(dist.HalfNormal(0.1))        # a shared hyperparameter, site "tau"
    for adapter in model.adapters.values():                       # R_l | tau ~ N(0, tau²), every module l
        adapter.R = PyroSample(lambda a: dist.Normal(0.0, model.adapters.tau).expand(a.shape).to_event(2))
    model.set_prior(priors.IsotropicNormal(0.1))                  # or every site at once, pyrolora's way

Both forms are the same probabilistic program (tested: the same sites, log joint, guides and predictions);
this one pays Pyro's per-site tracing on every step, the other has a lean step (``inference/lean.py``). The
backbone stays a plain ``nn.Module``: only the adapter cores (and hyperparameters a user adds to
``model.adapters``) are Pyro sites, and the frozen weights never meet Pyro's parameter store (DESIGN.md, traps 1
and 2).

Site names: a core's site is its module's dotted path in the backbone, exactly as in ``BayesianLoraModel``; any
other ``PyroSample``/``PyroParam`` attribute ``x`` set on an adapter is the site ``"<path>.x"``, and one set on
the container is the site ``"x"``.
"""

from __future__ import annotations

import collections.abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyrolora.adapters import AdapterSet, LoraXSConfig, LoraXSLinear
from pyrolora.errors import ConfigError
from pyrolora.models import likelihoods as lik
from pyrolora.models import priors as pri
from pyrolora.models.bayesian import BayesianLoraModel, default_output_fn

__all__ = ["PyroAdapters", "PyroLoraModel", "PyroLoraXS", "SitePrior"]


class SitePrior:
    """A pyrolora prior (``prior(site_name, shape) -> Distribution``) as a ``PyroSample`` prior of one site.

    ``PyroSample`` calls a non-distribution prior with the module that owns the attribute; this one ignores it
    and returns ``prior(site_name, shape)``. :class:`PyroAdapters` recognises it to sample the hyperparameters
    of a prior that has them (:class:`~pyrolora.models.priors.Hierarchical`) before the cores.
    """

    def __init__(self, prior: nn.Module, site_name: str, shape: tuple[int, int]) -> None:
        self.prior = prior
        self.site_name = site_name
        self.shape = shape

    def __call__(self, module: nn.Module | None) -> dist.Distribution:
        return self.prior(self.site_name, self.shape)

    def __repr__(self) -> str:
        return f"SitePrior({self.prior!r}, site={self.site_name!r})"


class PyroLoraXS(PyroModule):
    """The Pyro face of one injected :class:`~pyrolora.adapters.LoraXSLinear`: its core ``R`` is a Pyro site.

    Reading ``adapter.R`` inside a Pyro context (a call of the owning :class:`PyroAdapters`) is
    ``pyro.sample(site_name, prior)``, cached for the rest of the call; ``adapter.R = PyroSample(...)`` replaces
    the prior. The layer itself is held by reference, not as a submodule: its frozen base weights stay out of
    every Pyro parameter statement, in the global parameter mode too. The layer is not changed: the model
    hands the sampled value to it through :meth:`AdapterSet.use <pyrolora.adapters.AdapterSet.use>`.

    Args:
        layer: the injected layer.
        prior: the initial prior of R: a distribution of event shape (r, r), or a callable of this module
            returning one, as ``PyroSample`` takes.
    """

    def __init__(self, layer: LoraXSLinear, prior: dist.Distribution | Callable[..., dist.Distribution]) -> None:
        super().__init__()
        if not isinstance(layer, LoraXSLinear):
            raise ConfigError(f"PyroLoraXS wraps a LoraXSLinear (from inject_adapters), got {type(layer).__name__}.")
        object.__setattr__(self, "layer", layer)  # a reference, not a submodule (see the class docstring)
        self.R = PyroSample(prior)

    layer: LoraXSLinear

    # The attributes of the layer that code over an AdapterSet reads, so this mapping can stand in for one.
    @property
    def site_name(self) -> str:
        """The site of R: the module's dotted path in the backbone."""
        return self.layer.site_name

    @property
    def shape(self) -> tuple[int, int]:
        """The event shape (r, r) of R."""
        return self.layer.shape

    @property
    def rank(self) -> int:
        return self.layer.rank

    @property
    def A(self) -> torch.Tensor:
        return self.layer.A

    @property
    def B(self) -> torch.Tensor:
        return self.layer.B

    @property
    def base(self) -> nn.Module:
        return self.layer.base

    @property
    def prior(self) -> dist.Distribution | Callable[..., dist.Distribution]:
        """The current prior of R as ``PyroSample`` holds it (a distribution or a callable of this module)."""
        return self._pyro_samples["R"]

    def _pyro_get_fullname(self, name: str) -> str:
        # R is the site named by the module path (as in BayesianLoraModel); other attributes are "<path>.<name>".
        # Pyro's own rule would prefix the container's name and this module's attribute name instead.
        return self.layer.site_name if name == "R" else f"{self.layer.site_name}.{name}"

    def forward(self) -> torch.Tensor:
        """One draw of R (a sample statement when called inside a model)."""
        return self.R

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, shape={self.shape}, R={self.prior!r}"


class PyroAdapters(PyroModule):
    """The adapters of one backbone as a ``PyroModule`` and a read-only mapping site name -> :class:`PyroLoraXS`.

    Calling it samples every latent site once, hyperparameters first, and returns ``{site: R}`` (each (r, r)):
    all sites are drawn before any data plate is entered (DESIGN.md, trap 3), and every read of the same
    attribute within the call returns the same draw (Pyro's module cache). It also offers the
    :class:`~pyrolora.adapters.AdapterSet` interface (``shapes``, ``use``, ``zeros``, ...) by delegation, so
    inference code written against ``model.adapters`` works unchanged.

    Construct it (or :class:`PyroLoraModel`) outside or inside ``pyro.settings.context(module_local_params=True)``:
    it always sets itself up for the module-local mode that :func:`pyrolora.fit` uses (a ``PyroModule`` fixes its
    parameter mode when built), and it works in Pyro's global mode too.

    Args:
        adapters: the :class:`~pyrolora.adapters.AdapterSet` of injected layers.
        prior: any prior :func:`~pyrolora.models.priors.resolve` accepts, set on every site.
    """

    def __init__(self, adapters: AdapterSet, prior: Any = None) -> None:
        if not isinstance(adapters, AdapterSet) or not len(adapters):
            raise ConfigError("adapters must be the non-empty AdapterSet returned by inject_adapters(backbone, ...).")
        with pyro.settings.context(module_local_params=True):
            super().__init__()
            object.__setattr__(self, "layers", adapters)
            object.__setattr__(self, "_index", {name: str(i) for i, name in enumerate(adapters)})
            resolved = pri.resolve(prior)
            for name, layer in adapters.items():
                # children are named by position: nn.Module names cannot hold the dots of a module path
                setattr(self, self._index[name], PyroLoraXS(layer, SitePrior(resolved, name, layer.shape)))

    layers: AdapterSet
    _index: dict[str, str]

    # ------------------------------------------------------------------ the mapping
    def __getitem__(self, name: str) -> PyroLoraXS:
        try:
            return self._modules[self._index[name]]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(f"no adapter site {name!r}; the sites are {list(self._index)[:6]}...") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def keys(self) -> collections.abc.KeysView[str]:
        return self._index.keys()

    def values(self) -> Iterator[PyroLoraXS]:  # type: ignore[override]
        return (self[name] for name in self._index)

    def items(self) -> Iterator[tuple[str, PyroLoraXS]]:
        return ((name, self[name]) for name in self._index)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._index else default

    # ------------------------------------------------------------------ the AdapterSet interface
    @property
    def config(self) -> LoraXSConfig:
        return self.layers.config

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Event shape (r, r) of every core, in backbone order."""
        return self.layers.shapes

    @property
    def num_latents(self) -> int:
        """D = Σ_l r² (the cores only; hyperparameters added by a user are not counted)."""
        return self.layers.num_latents

    def use(self, values: Mapping[str, torch.Tensor] | None) -> contextlib.AbstractContextManager[None]:
        """See :meth:`AdapterSet.use <pyrolora.adapters.AdapterSet.use>`."""
        return self.layers.use(values)

    def set_values(self, values: Mapping[str, torch.Tensor] | None) -> None:
        self.layers.set_values(values)

    def zeros(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return self.layers.zeros(dtype)

    def merge(self, values: Mapping[str, torch.Tensor]) -> None:
        self.layers.merge(values)

    def unmerge(self) -> None:
        self.layers.unmerge()

    # ------------------------------------------------------------------ priors and sampling
    def set_prior(self, prior: Any) -> nn.Module:
        """Set the prior of every core at once, from anything :func:`~pyrolora.models.priors.resolve` accepts
        (a pyrolora prior, a mapping site-or-suffix -> prior, a scalar or (r, r) distribution, a callable
        ``(site_name, shape) -> Distribution``). Returns the resolved prior module.

        The prior module is not registered here (keep it where its parameters are trained and moved:
        :meth:`PyroLoraModel.set_prior` does that).
        """
        resolved = pri.resolve(prior)
        for name, adapter in self.items():
            adapter.R = PyroSample(SitePrior(resolved, name, adapter.shape))
        return resolved

    def _sample_hyperparameters(self) -> None:
        """Let each pyrolora prior with hyperparameters sample them for the sites it still governs."""
        groups: dict[int, tuple[Any, list[str]]] = {}
        for name, adapter in self.items():
            site_prior = adapter.prior
            if isinstance(site_prior, SitePrior) and hasattr(site_prior.prior, "sample_hyperparameters"):
                groups.setdefault(id(site_prior.prior), (site_prior.prior, []))[1].append(name)
        for prior, names in groups.values():
            prior.sample_hyperparameters(tuple(names))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every latent site; returns ``{site: R}`` with each R of shape (r, r)."""
        self._sample_hyperparameters()
        return {name: adapter.R for name, adapter in self.items()}

    def extra_repr(self) -> str:
        return f"{len(self)} sites, rank={self.config.rank}, latents={self.num_latents}"


collections.abc.Mapping.register(PyroAdapters)  # a Mapping in behaviour; PyroModule's metaclass forbids the base


class _SitePriors(nn.Module):
    """``model.prior`` of :class:`PyroLoraModel`: ``prior(site, shape)`` is the site's current prior of R.

    Diagnostics that need a core's prior density on its own (Pareto-k, the export's support check) call it.
    A pyrolora prior or a fixed distribution answers; a plain-Pyro prior that is a function of other latent
    sites (a hyperprior written with ``PyroSample(lambda module: ...)``) has no density on its own, and
    asking for it raises :class:`~pyrolora.errors.ConfigError` instead of returning a wrong one.
    """

    def __init__(self, default: nn.Module, adapters: PyroAdapters) -> None:
        super().__init__()
        self.default = default  # the prior given to the model or to set_prior: its buffers and parameters
        object.__setattr__(self, "_adapters", adapters)

    def forward(self, site_name: str, shape: tuple[int, ...]) -> dist.Distribution:
        prior = self._adapters[site_name].prior
        if isinstance(prior, SitePrior):
            return prior(None)
        if isinstance(prior, torch.distributions.Distribution):
            if tuple(prior.event_shape) != tuple(shape):
                raise ConfigError(
                    f"the prior of {site_name!r} has event shape {tuple(prior.event_shape)}, the site needs "
                    f"{tuple(shape)}; use .expand({list(shape)}).to_event({len(shape)})."
                )
            return prior
        raise ConfigError(
            f"the prior of {site_name!r} is a function of the model ({prior!r}), e.g. of other latent sites: it "
            "has no density on its own outside a trace. Use poutine.trace(model) for the joint density."
        )


class PyroLoraModel(BayesianLoraModel):
    """:class:`~pyrolora.models.BayesianLoraModel` with its cores as ``PyroSample`` sites of ``model.adapters``.

    The generative story, the arguments and every method are those of ``BayesianLoraModel``; only the way the
    cores are sampled differs::

        values = model.adapters()     # pyro.sample(site_l, prior_l) for every adapted module l, hyperparameters
                                      # first, outside the data plate
        then the backbone, the data plate and the likelihood as in BayesianLoraModel.forward

    ``prior`` (default ``IsotropicNormal(0.1)``) sets every site's ``PyroSample``; afterwards any site may be
    replaced in plain Pyro (``model.adapters[site].R = PyroSample(...)``), hyperparameters added as
    ``PyroSample`` attributes of ``model.adapters`` or of one adapter, and every site replaced at once by
    :meth:`set_prior`. Trainable ``PyroParam`` attributes of the adapters are trained by :func:`pyrolora.fit`
    with the guide (as an empirical-Bayes prior's parameters are).

    It fits with every guide and :func:`pyrolora.fit` (through Pyro's ``Trace_ELBO``: the lean step of
    ``inference/lean.py`` is for ``BayesianLoraModel``, whose prior it reads directly), predicts with
    :func:`pyrolora.predict` through the same batched-sample forward, and runs in plain Pyro (``SVI``,
    ``Predictive``) under ``pyro.settings.context(module_local_params=True)``. The backbone is never a
    ``PyroModule``.
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
        super().__init__(
            backbone,
            adapters,
            prior=prior,
            likelihood=likelihood,
            dataset_size=dataset_size,
            head=head,
            output_fn=output_fn,
        )
        default = self.prior  # resolved by BayesianLoraModel
        pyro_adapters = PyroAdapters(adapters, default)
        self.adapters = pyro_adapters  # a submodule now, in place of the AdapterSet attribute
        self.prior = _SitePriors(default, pyro_adapters)

    adapters: PyroAdapters  # type: ignore[assignment]

    @classmethod
    def from_model(cls, model: BayesianLoraModel) -> PyroLoraModel:
        """The Pyro-module form of ``model``: same backbone (shared, not copied), adapters, prior, likelihood,
        dataset size, head and output function."""
        if isinstance(model, PyroLoraModel):
            raise ConfigError("the model is already a PyroLoraModel.")
        return cls(
            model.backbone,
            model.adapters,
            prior=model.prior,
            likelihood=model.likelihood,
            dataset_size=model.dataset_size,
            head=model.head_names,
            output_fn=model.output_fn,
        )

    @property
    def default_prior(self) -> nn.Module:
        """The prior given to the constructor or to :meth:`set_prior` (sites replaced by hand since differ)."""
        return self.prior.default

    def set_prior(self, prior: Any) -> None:
        """Replace the prior of every core (anything :func:`~pyrolora.models.priors.resolve` accepts)."""
        self.prior.default = self.adapters.set_prior(prior)

    def sample_latents(self) -> dict[str, torch.Tensor]:
        """Sample every latent site of ``model.adapters`` (hyperparameters, then one (r, r) core per module)."""
        return self.adapters()  # β of the KL term is applied by pyrolora.fit to every latent site, as for the base

    def _prior_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.prior.default.named_parameters()
        for name, param in self.adapters.named_parameters():
            yield f"adapters.{name}", param

    def prior_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the default prior and ``PyroParam`` attributes of the adapters."""
        return [p for _, p in self._prior_named_parameters() if p.requires_grad]

    def prior_state(self) -> dict[str, torch.Tensor]:
        """The trainable prior parameters, keyed as in ``BayesianLoraModel`` (adapter ones under ``adapters.``)."""
        return {n: p.detach() for n, p in self._prior_named_parameters() if p.requires_grad}

    def load_prior_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`prior_state` returned."""
        own = dict(self._prior_named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
