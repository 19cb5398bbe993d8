"""ArviZ conversion: posterior draws of the adapter cores, pointwise log-likelihoods and predictions.

``az.from_pyro`` accepts only Pyro's ``MCMC``; this module builds the :class:`arviz.InferenceData` for any
posterior from its draws, so SVI guides, SWAG, Laplace and MCMC chains all reach ArviZ through one path.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pyrolora._atomic import umask_mode
from pyrolora.errors import ConfigError, DataError, RunFolderError
from pyrolora.inference.batches import split_batch, to_device
from pyrolora.inference.predict import draw_latents
from pyrolora.models import BayesianLoraModel

if TYPE_CHECKING:
    import arviz

__all__ = ["chain_draws", "load_inference_data", "pointwise", "save_inference_data", "to_inference_data"]

#: Name of the observed site in the model, and of its variable in every data group.
OBS = "obs"


def _as_chains(name: str, value: Any, shape: tuple[int, int]) -> torch.Tensor:
    value = torch.as_tensor(value).detach().cpu()
    if value.dim() == 3:
        value = value.unsqueeze(0)  # one chain
    if value.dim() != 4 or tuple(value.shape[-2:]) != shape:
        raise ConfigError(
            f"draws of site {name!r} must have shape (chains, draws, {shape[0]}, {shape[1]}) or (draws, "
            f"{shape[0]}, {shape[1]}), got {tuple(value.shape)}."
        )
    return value


def _pyro_divergences(diagnostics: Any, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``diverging`` (chains, draws) from Pyro's ``MCMC.diagnostics()["divergences"]`` (indices per chain)."""
    found = diagnostics.get("divergences") if isinstance(diagnostics, Mapping) else None
    if not isinstance(found, Mapping) or not samples:
        return {}
    num_chains, num_draws = torch.as_tensor(next(iter(samples.values()))).shape[:2]
    diverging = torch.zeros(num_chains, num_draws, dtype=torch.bool)
    for chain, indices in enumerate(found.values()):
        for index in indices:
            if 0 <= int(index) < num_draws and chain < num_chains:  # negative indices fell in the warm-up
                diverging[chain, int(index)] = True
    return {"diverging": diverging}


def chain_draws(
    model: BayesianLoraModel,
    guide: nn.Module | None = None,
    draws: Any = None,
    *,
    num_samples: int = 100,
    num_chains: int = 1,
    seed: int | None = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Posterior draws of every adapter core with a chain dimension, and any MCMC sample statistics.

    Args:
        model: the model; its adapter sites name and shape the draws.
        guide: a fitted guide, sampled through :func:`pyrolora.inference.draw_latents` (which uses
            ``guide.sample_latents`` when the guide has it). Its ``num_chains · num_samples`` independent draws
            are split into ``num_chains`` chains.
        draws: explicit draws instead of a guide: a dict site -> tensor (chains, draws, r, r) or (draws, r, r),
            or an object with ``get_samples(group_by_chain=True)`` (Pyro's ``MCMC``, or a guide that keeps its
            chains); ``get_extra_fields(group_by_chain=True)``, when present, becomes the sample statistics.
        num_samples: draws per chain when sampling the guide.
        num_chains: chains when sampling the guide.
        seed: seed for sampling the guide (global RNG restored); ``None`` uses the current RNG.

    Returns:
        ``(draws, sample_stats)``: site -> float tensor (chains, draws, r, r) on the CPU, and name -> tensor
        (chains, draws) (empty unless the draws came from an object with extra fields).
    """
    shapes = model.adapters.shapes
    stats: dict[str, torch.Tensor] = {}
    if draws is None and guide is not None and hasattr(guide, "get_samples"):
        try:  # a guide that keeps its own chains (MCMC-style); otherwise it is sampled like any guide
            guide.get_samples(group_by_chain=True)
            draws = guide
        except TypeError:
            draws = None
    if draws is not None:
        if hasattr(draws, "get_samples") and not isinstance(draws, Mapping):
            source = draws
            draws = source.get_samples(group_by_chain=True)
            if hasattr(source, "get_extra_fields"):  # NumPyro-style
                extra = source.get_extra_fields(group_by_chain=True)
                stats = {k: torch.as_tensor(v).detach().cpu() for k, v in extra.items()}
            elif callable(getattr(source, "diagnostics", None)):  # Pyro's MCMC: divergent draws by index
                stats = _pyro_divergences(source.diagnostics(), draws)
        if not isinstance(draws, Mapping):
            raise ConfigError(f"draws must be a dict site -> tensor or have get_samples(), got {type(draws).__name__}.")
        missing = sorted(set(shapes) - set(draws))
        if missing:
            raise ConfigError(f"draws lack adapter sites {missing[:3]}; give one entry per site in model.site_names.")
        out = {name: _as_chains(name, draws[name], shape) for name, shape in shapes.items()}
        if len({tuple(v.shape[:2]) for v in out.values()}) != 1:
            raise ConfigError("every site needs the same number of chains and draws.")
        return out, stats
    if guide is None:
        raise ConfigError("pass a fitted guide or explicit draws to convert a posterior.")
    for value, what in ((num_samples, "num_samples"), (num_chains, "num_chains")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}.")
    with contextlib.ExitStack() as scope:
        if seed is not None:
            scope.enter_context(torch.random.fork_rng())
            torch.manual_seed(seed)
        flat = draw_latents(guide, model, num_chains * num_samples)
    out = {
        name: flat[name].detach().cpu().reshape(num_chains, num_samples, *shape)  # (C, S, r, r)
        for name, shape in shapes.items()
    }
    return out, stats


def pointwise(
    model: BayesianLoraModel,
    draws: Mapping[str, torch.Tensor],
    data: Iterable[Any],
    *,
    samples_per_pass: int | None = 8,
    predictive_draws: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pointwise log-likelihoods ``log p(y_i | θ_s)`` and posterior-predictive draws ``ỹ_i ~ p(y | x_i, θ_s)``.

    Args:
        model: the model (its head as trained); evaluated in eval mode (no dropout).
        draws: site -> (S, r, r); S draws evaluated.
        data: batches ``(inputs, targets)``; every batch needs targets.
        samples_per_pass: draws folded into one forward pass (memory ~ samples_per_pass x batch examples).
        predictive_draws: also sample ``ỹ`` (one per draw and example).
        progress: a progress bar over batches.

    Returns:
        ``(log_lik (S, N), y_rep (S, N, ...) or None, y (N, ...))``, float64 / target dtype, on the CPU.
    """
    sizes = {v.shape[0] for v in draws.values()}
    if len(sizes) != 1:
        raise ConfigError(f"every site needs the same number of draws, got {sorted(sizes)}.")
    (num,) = sizes
    chunk = num if samples_per_pass is None else max(1, min(samples_per_pass, num))
    device = model.device
    was_training = model.training
    model.eval()
    logs, reps, ys = [], [], []
    try:
        with torch.no_grad():
            for batch in tqdm(data, desc="log-likelihood", disable=not progress, unit="batch", dynamic_ncols=True):
                inputs, targets = split_batch(to_device(batch, device))
                if targets is None:
                    raise DataError("pointwise log-likelihoods need targets; give batches (inputs, targets).")
                log_parts, rep_parts = [], []
                for start in range(0, num, chunk):
                    values = {k: v[start : start + chunk].to(device) for k, v in draws.items()}
                    out = model.sample_outputs(inputs, values)  # (s, B, ...)
                    s, b = out.shape[:2]
                    flat_out = out.reshape(s * b, *out.shape[2:])
                    tiled = targets.repeat(s, *([1] * (targets.dim() - 1)))  # sample-major, like the inputs
                    dist = model.likelihood.distribution(flat_out)
                    log_parts.append(dist.log_prob(tiled).reshape(s, b).double().cpu())  # (s, B)
                    if predictive_draws:
                        rep = dist.sample()
                        rep_parts.append(rep.reshape(s, b, *rep.shape[1:]).cpu())  # (s, B, ...)
                logs.append(torch.cat(log_parts))
                if predictive_draws:
                    reps.append(torch.cat(rep_parts))
                ys.append(targets.cpu())
    finally:
        model.train(was_training)
    if not logs:
        raise DataError("the data is empty; no log-likelihood to compute.")
    return torch.cat(logs, dim=1), torch.cat(reps, dim=1) if predictive_draws else None, torch.cat(ys)


def _matrix_dims(shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[str, str]]:
    """Named matrix axes: ``row``/``col`` when every core has the same shape, else ``row_r``/``col_r``."""
    if len(set(shapes.values())) == 1:
        return {name: ("row", "col") for name in shapes}
    return {name: (f"row_{shape[0]}", f"col_{shape[1]}") for name, shape in shapes.items()}


def to_inference_data(
    model: BayesianLoraModel,
    guide: nn.Module | None = None,
    data: Iterable[Any] | None = None,
    *,
    draws: Any = None,
    num_samples: int = 100,
    num_chains: int = 1,
    sample_stats: Mapping[str, Any] | None = None,
    samples_per_pass: int | None = 8,
    seed: int | None = 0,
    progress: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> arviz.InferenceData:
    """An ArviZ ``InferenceData`` of the posterior over the adapter cores, for any guide or MCMC draws.

    Groups:

    - ``posterior``: one variable per adapter site, named by its module path (e.g.
      ``bert.encoder.layer.0.attention.self.query``), dims ``(chain, draw, row, col)`` for the r x r core R;
    - ``log_likelihood`` (with ``data``): ``obs`` of dims ``(chain, draw, example)``, the pointwise
      ``log p(y_i | θ_s)`` that ``az.loo`` and ``az.waic`` need;
    - ``posterior_predictive`` (with ``data``): ``obs``, one replicated target per draw and example;
    - ``observed_data`` (with ``data``): ``obs``, the targets, dims ``(example,)``;
    - ``sample_stats``: MCMC statistics (e.g. ``diverging``), from ``sample_stats`` or from the draws object.

    Costs one forward pass per draw over ``data`` (``chains · draws · N`` example evaluations).

    Args:
        model: the model whose adapter sites are converted.
        guide: a fitted guide, sampled ``num_chains · num_samples`` times (see :func:`chain_draws`).
        data: batches ``(inputs, targets)`` for the data groups; ``None`` gives the posterior alone.
        draws: explicit draws with a chain dimension (dict site -> (chains, draws, r, r), or an object with
            ``get_samples(group_by_chain=True)`` such as Pyro's ``MCMC``), instead of a guide.
        num_samples: draws per chain from the guide.
        num_chains: chains from the guide (independent draws, so R-hat near 1 is expected).
        sample_stats: name -> array (chains, draws), merged over the statistics found on ``draws``.
        samples_per_pass: draws per forward pass when evaluating the likelihood.
        seed: seed for the guide's draws and the predictive draws; ``None`` uses the current RNG.
        progress: a progress bar over batches.
        attrs: extra attributes stored on every group.
    """
    import arviz as az

    chains, stats = chain_draws(model, guide, draws, num_samples=num_samples, num_chains=num_chains, seed=seed)
    num_c, num_d = next(iter(chains.values())).shape[:2]
    stats = {**stats, **{k: torch.as_tensor(np.asarray(v)) for k, v in (sample_stats or {}).items()}}
    for key, value in stats.items():
        if tuple(value.shape[:2]) != (num_c, num_d):
            raise ConfigError(f"sample_stats[{key!r}] must start with (chains, draws) = {(num_c, num_d)}.")
    matrix = _matrix_dims(model.adapters.shapes)
    dims: dict[str, list[str]] = {name: list(axes) for name, axes in matrix.items()}
    groups: dict[str, Any] = {"posterior": {name: value.double().numpy() for name, value in chains.items()}}
    if data is not None:
        flat = {k: v.reshape(num_c * num_d, *v.shape[2:]) for k, v in chains.items()}
        with contextlib.ExitStack() as scope:
            if seed is not None:
                scope.enter_context(torch.random.fork_rng())
                torch.manual_seed(seed + 1)
            log_lik, y_rep, y = pointwise(model, flat, data, samples_per_pass=samples_per_pass, progress=progress)
        assert y_rep is not None
        n = y.shape[0]
        log_likelihood = {OBS: log_lik.reshape(num_c, num_d, n).numpy()}  # one value per example
        groups["posterior_predictive"] = {OBS: y_rep.reshape(num_c, num_d, *y_rep.shape[1:]).numpy()}
        groups["observed_data"] = {OBS: y.numpy()}
        dims[OBS] = ["example", *[f"output_{i}" for i in range(1, y.dim())]]
    if stats:
        groups["sample_stats"] = {k: v.numpy() for k, v in stats.items()}
    info = {
        "pyrolora_sites": json.dumps(list(model.site_names)),
        "pyrolora_num_latents": int(model.num_latents),
        "pyrolora_guide": type(guide).__name__ if guide is not None and draws is None else "explicit draws",
        **(attrs or {}),
    }
    idata = az.from_dict(**groups, dims=dims)
    if data is not None:  # its own call: vector targets have an output axis that the log-likelihood lacks
        idata.extend(az.from_dict(log_likelihood=log_likelihood, dims={OBS: ["example"]}))
    for group in idata.groups():
        getattr(idata, group).attrs.update(info)  # netCDF attributes: strings and numbers only
    return idata


def save_inference_data(idata: arviz.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` to a netCDF file atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        idata.to_netcdf(tmp)
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_inference_data(path: str | Path) -> arviz.InferenceData:
    """Read an ``InferenceData`` from netCDF fully into memory and close the file (so it can be rewritten)."""
    import arviz as az

    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"no netCDF file at {path}; write one with save_inference_data or `pyrolora diagnose`.")
    lazy = az.from_netcdf(path)
    loaded = {}
    for group in lazy.groups():
        dataset = getattr(lazy, group)
        loaded[group] = dataset.load().copy(deep=True)
        dataset.close()
    return az.InferenceData(**loaded)
