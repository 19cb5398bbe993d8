"""Bayesian model averaging: predictions averaged over posterior samples of the adapter latents."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import partial
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from torch import nn
from tqdm.auto import tqdm

from pyrolora.errors import ConfigError
from pyrolora.inference import distributed
from pyrolora.inference.batches import split_batch, to_device
from pyrolora.inference.guides import setup
from pyrolora.models import BayesianLoraModel

__all__ = ["Prediction", "draw_latents", "predict"]


class Prediction(NamedTuple):
    """Output of :func:`predict`.

    Attributes:
        probs: per-sample predictive, shape (S, N, C): class probabilities for classification, the mean for
            regression.
        mean: the Bayesian model average ``(1/S) Σ_s probs[s]``, shape (N, C).
    """

    probs: torch.Tensor
    mean: torch.Tensor


def draw_latents(guide: nn.Module, model: BayesianLoraModel, num_samples: int) -> dict[str, torch.Tensor]:
    """``num_samples`` joint draws of every adapter core from the guide, each of shape (S, r, r).

    Guides that are not Pyro autoguides may provide ``sample_latents(num_samples)`` returning the same dict;
    otherwise the guide is run once, vectorised over a sample plate left of the model's data plate.
    """
    if hasattr(guide, "sample_latents"):
        return guide.sample_latents(num_samples)
    setup(guide, model)
    with pyro.settings.context(module_local_params=True), torch.no_grad():
        with pyro.plate("_posterior_samples", num_samples, dim=-2):
            trace = poutine.trace(guide).get_trace(None)
    draws = {}
    for name, shape in model.adapters.shapes.items():
        value = trace.nodes[name]["value"]
        draws[name] = value.reshape(num_samples, *shape).detach()  # (S, r, r)
    return draws


def predict(
    model: BayesianLoraModel,
    guide: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int = 15,
    samples_per_pass: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
) -> Prediction:
    """Bayesian model averaging ``p(y|x) ≈ (1/S) Σ_s p(y|x, θ_s)`` with ``θ_s ~ q``.

    The same S draws are used for every batch, so the per-sample predictions are S coherent models. Samples
    are folded into the batch dimension: each forward pass evaluates ``samples_per_pass`` draws at once, every
    adapter applying its own draw to its slice of the batch (see :meth:`BayesianLoraModel.sample_outputs`).

    Args:
        model: the Bayesian model (its head and backbone as trained).
        guide: a fitted guide.
        data: iterable of batches; targets, if present, are ignored.
        num_samples: S, posterior draws (the paper uses 15).
        samples_per_pass: draws per forward pass; ``None`` takes all S at once, 1 is the sequential loop.
            Lower it to bound memory: a pass holds ``samples_per_pass x batch`` examples.
        seed: seed of the posterior draws (the global RNG state is restored afterwards); ``None`` uses the
            current global RNG.
        progress: show a progress bar over batches.

    Returns:
        :class:`Prediction` with ``probs`` (S, N, C) and their average ``mean`` (N, C), float32 on the CPU.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}.")
    chunk = num_samples if samples_per_pass is None else samples_per_pass
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"samples_per_pass must be a positive integer or None, got {samples_per_pass!r}.")
    device = model.device
    if distributed.is_distributed():  # under torchrun: each process predicts its shard; gathered in order
        show = progress and distributed.is_main_process()
        local = partial(predict, model, guide, num_samples=num_samples, samples_per_pass=chunk, progress=show)
        probs = distributed.sharded_predict(local, data, seed, device)  # (S, N, C)
        return Prediction(probs=probs, mean=probs.mean(0))
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    with contextlib.ExitStack() as scope:
        scope.callback(model.train, was_training)
        if seed is not None:
            scope.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
        scope.enter_context(torch.no_grad())
        draws = {k: v.to(device) for k, v in draw_latents(guide, model, num_samples).items()}
        for batch in tqdm(data, desc="predict", disable=not progress, unit="batch", dynamic_ncols=True):
            inputs, _ = split_batch(to_device(batch, device))
            parts = []
            for start in range(0, num_samples, chunk):
                values = {k: v[start : start + chunk] for k, v in draws.items()}
                out = model.sample_outputs(inputs, values)  # (s, B, ...)
                s, b = out.shape[:2]
                parts.append(model.likelihood.predictive(out.reshape(s * b, *out.shape[2:])).reshape(s, b, -1))
            outputs.append(torch.cat(parts).float().cpu())  # (S, B, C)
    if not outputs:
        raise ConfigError("predict got no batches; the data is empty.")
    probs = torch.cat(outputs, dim=1)  # (S, N, C)
    return Prediction(probs=probs, mean=probs.mean(0))
