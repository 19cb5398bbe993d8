"""Bayesian model averaging: predictions averaged over posterior samples of the adapter latents."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from functools import partial
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import autoguide
from torch import nn
from tqdm.auto import tqdm

from pyrolora.errors import ConfigError
from pyrolora.inference import distributed
from pyrolora.inference.batches import check_batches, split_batch, to_device
from pyrolora.inference.families import setup
from pyrolora.inference.fitted import require_fitted
from pyrolora.inference.precision import Precision, autocast, compiled_outputs
from pyrolora.models import BayesianLoraModel

__all__ = [
    "DEFAULT_MAX_TOKENS_PER_PASS",
    "Prediction",
    "draw_latents",
    "draws_needed",
    "predict",
    "samples_per_pass_for",
    "select_temperature",
    "temper",
    "temperature_of",
]

#: Default memory budget of one forward pass, in tokens (examples x sequence length, summed over the samples
#: folded into it). 65,536 tokens of a 1B Llama (hidden 2,048, FFN 8,192) in bf16 peak at about 2 GB of
#: activations in inference; 15 samples of a batch of 8 x 128 tokens (15,360) fit in one pass.
DEFAULT_MAX_TOKENS_PER_PASS = 65_536

#: Candidate posterior temperatures of :func:`select_temperature`: from the median alone (0) through the fitted
#: posterior (1) to 3 ≈ 1/√β. Fitted with the default KL weight β = 0.1 the posterior is about √β ≈ 0.32x as wide
#: as the ELBO's (β = 1) in the directions the data determine, so τ up to 1/√β undoes that narrowing around the
#: tempered mean but does not go beyond the untempered width. Validation chose the end of the grid in every SST-2
#: run, but a grid reaching 6 (chosen in 5 of 5 runs) gave no better test NLL: 0.435 ± 0.006 against 0.432 ± 0.015
#: (benchmarks/README.md, "The SVI recipe").
DEFAULT_TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


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


def draws_needed(guide: nn.Module, num_samples: int, *, dropout: bool = False) -> int:
    """Draws a prediction of ``guide`` needs: ``num_samples``, or 1 for a point mass (``AutoDelta``, the MAP) when
    no dropout is sampled (with ``dropout``, MC dropout, each of the S rows gets its own mask, so S are needed).

    S draws of a point mass are S copies of one model: the average is the same, S times the cost, and their
    mutual information, exactly 0 in theory, becomes float noise (about 1e-10 nats on a GPU, where the S copies
    folded into one batch take slightly different kernels) that an OOD score would then rank.
    """
    return 1 if isinstance(guide, autoguide.AutoDelta) and not dropout else num_samples


def _tokens(inputs: Any) -> int:
    """Tokens in one batch: the size of ``input_ids`` (or of the first tensor) if 2-D or more, else its rows."""
    if isinstance(inputs, torch.Tensor):
        tensor = inputs
    else:
        tensor = (
            inputs.get("input_ids")
            if "input_ids" in inputs
            else next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        )
        if tensor is None:
            return 1
    return tensor.shape[0] * (tensor.shape[1] if tensor.dim() > 1 else 1)


def samples_per_pass_for(num_samples: int, batch_tokens: int, max_tokens: int) -> int:
    """How many of ``num_samples`` draws one pass evaluates so that it holds at most ``max_tokens`` tokens.

    At least one draw per pass (a single batch larger than the budget still runs, one draw at a time); the
    draws are spread evenly over the fewest passes, so ``ceil(S / passes)`` rather than a full pass plus a
    small remainder.
    """
    fit = max(1, max_tokens // max(1, batch_tokens))
    passes = -(-num_samples // min(num_samples, fit))
    return -(-num_samples // passes)


def predict(
    model: BayesianLoraModel,
    guide: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int = 15,
    samples_per_pass: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    max_tokens_per_pass: int = DEFAULT_MAX_TOKENS_PER_PASS,
    precision: Precision = "float32",
    compile: bool | dict[str, Any] = False,
    temperature: float | None = None,
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
        samples_per_pass: draws per forward pass; ``None`` (default) folds as many as the memory budget
            ``max_tokens_per_pass`` allows into each pass (all S for usual batches), 1 is the sequential loop.
            A pass holds ``samples_per_pass x batch`` examples.
        seed: seed of the posterior draws (the global RNG state is restored afterwards); ``None`` uses the
            current global RNG.
        progress: show a progress bar over batches.
        max_tokens_per_pass: memory budget of one pass in tokens (rows x sequence length, or rows for inputs
            without a sequence), used when ``samples_per_pass`` is ``None``.
        precision: ``"bf16"`` runs the backbone under bfloat16 autocast; softmax and averaging stay float32.
        compile: run the backbone through ``torch.compile`` (``True``, or a dict of its options).
        temperature: τ ≥ 0, the spread of the draws around the posterior median m: each draw θ_s is replaced by
            ``m + τ (θ_s - m)`` (covariance τ² Σ for a Gaussian). 0 predicts the median alone, 1 the posterior
            as fitted. ``None`` uses the guide's ``posterior_temperature`` attribute if
            :func:`select_temperature` set one, else 1.

    Returns:
        :class:`Prediction` with ``probs`` (S, N, C) and their average ``mean`` (N, C), float32 on the CPU.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}.")
    chunk = num_samples if samples_per_pass is None else samples_per_pass
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"samples_per_pass must be a positive integer or None, got {samples_per_pass!r}.")
    if isinstance(max_tokens_per_pass, bool) or not isinstance(max_tokens_per_pass, int) or max_tokens_per_pass < 1:
        raise ConfigError(f"max_tokens_per_pass must be a positive integer, got {max_tokens_per_pass!r}.")
    check_batches(data)
    require_fitted(guide, "predict")
    context = autocast(precision, model.device)
    outputs_fn = compiled_outputs(model, compile)
    device = model.device
    if distributed.is_distributed():  # under torchrun: each process predicts its shard; gathered in order
        show = progress and distributed.is_main_process()
        local = partial(
            predict,
            model,
            guide,
            num_samples=num_samples,
            samples_per_pass=chunk,
            progress=show,
            temperature=temperature,
        )
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
        draws = temper(draws, guide, temperature_of(guide, temperature))
        for batch in tqdm(data, desc="predict", disable=not progress, unit="batch", dynamic_ncols=True):
            inputs, _ = split_batch(to_device(batch, device))
            if samples_per_pass is None:
                chunk = samples_per_pass_for(num_samples, _tokens(inputs), max_tokens_per_pass)
            parts = []
            for start in range(0, num_samples, chunk):
                values = {k: v[start : start + chunk] for k, v in draws.items()}
                with context():
                    out = model.sample_outputs(inputs, values, outputs=outputs_fn)  # (s, B, ...)
                s, b = out.shape[:2]
                parts.append(model.likelihood.predictive(out.reshape(s * b, *out.shape[2:])).reshape(s, b, -1))
            outputs.append(torch.cat(parts).float().cpu())  # (S, B, C)
    if not outputs:
        raise ConfigError("predict got no batches; the data is empty.")
    probs = torch.cat(outputs, dim=1)  # (S, N, C)
    return Prediction(probs=probs, mean=probs.mean(0))


def temperature_of(guide: nn.Module, temperature: float | None = None) -> float:
    """τ to predict with: ``temperature`` if given, else the guide's ``posterior_temperature``, else 1."""
    value = getattr(guide, "posterior_temperature", 1.0) if temperature is None else temperature
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"temperature must be a finite number >= 0, got {value!r}.")
    return float(value)


def temper(draws: dict[str, torch.Tensor], guide: nn.Module, temperature: float) -> dict[str, torch.Tensor]:
    """Draws (S, r, r) per site moved to ``m + τ (θ_s - m)`` around the guide's median m (unchanged at τ = 1)."""
    if temperature == 1.0:
        return draws
    median = guide.median()
    return {k: median[k].to(v) + temperature * (v - median[k].to(v)) for k, v in draws.items()}


def select_temperature(
    model: BayesianLoraModel,
    guide: nn.Module,
    data: Iterable[Any],
    *,
    grid: Iterable[float] = DEFAULT_TEMPERATURES,
    num_samples: int = 15,
    seed: int | None = 0,
    **options: Any,
) -> tuple[float, dict[float, float]]:
    """Choose the posterior temperature τ (see :func:`predict`) that minimises the predictive NLL on ``data``.

    Every τ of ``grid`` is scored with the same S draws (common random numbers), so the comparison is not
    blurred by sampling noise: ``NLL(τ) = -(1/N) Σ_i log((1/S) Σ_s p(y_i | x_i, m + τ (θ_s - m)))``. With τ = 0
    (the median alone, a MAP-like point prediction) among the candidates, as in the default grid, the chosen τ is
    never worse on ``data`` than predicting with the posterior median. Ties go to the larger τ.
    Use held-out data (a validation split), not the training data, where every τ > 0 looks worse.

    Args:
        model: the Bayesian model.
        guide: a fitted guide with ``median()``.
        data: batches ``(inputs, targets)`` of held-out examples.
        grid: candidate τ values (each ≥ 0).
        num_samples: S draws per candidate.
        seed: seed of the draws.
        options: more keyword arguments for :func:`predict` (precision, samples_per_pass, ...).

    Returns:
        ``(τ, {τ: NLL})``; the caller keeps τ, e.g. ``guide.posterior_temperature = τ``.
    """
    batches = list(data)
    targets = [split_batch(b)[1] for b in batches]
    if any(t is None for t in targets):
        raise ConfigError("select_temperature needs labelled batches (inputs, targets) of held-out data.")
    labels = torch.cat([t.reshape(-1) for t in targets]).cpu().long()
    scores: dict[float, float] = {}
    candidates = sorted({temperature_of(guide, float(t)) for t in grid})
    if not candidates:
        raise ConfigError("select_temperature needs at least one candidate temperature in grid.")
    for tau in candidates:
        samples = 1 if tau == 0.0 else num_samples  # τ = 0: every draw is the median
        mean = predict(model, guide, batches, num_samples=samples, seed=seed, temperature=tau, **options).mean
        picked = mean[torch.arange(len(labels)), labels].clamp_min(torch.finfo(mean.dtype).tiny)
        scores[tau] = float(-picked.log().mean())
    best = min(scores.values())
    return max(t for t, v in scores.items() if v <= best), scores
