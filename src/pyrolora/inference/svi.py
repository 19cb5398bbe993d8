"""Stochastic variational inference: fit a guide (and the point-estimate head) to a model."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import nn
from tqdm.auto import tqdm

from pyrolora.errors import ConfigError, DataError, DivergenceError
from pyrolora.inference import distributed
from pyrolora.inference.batches import check_batches, require_targets, split_batch, to_device
from pyrolora.inference.checkpoint import BatchStream, Checkpointer
from pyrolora.inference.divergence import RunawayLoss, factorisation_failed
from pyrolora.inference.families import check_local
from pyrolora.inference.lean import LeanELBO, supports
from pyrolora.inference.precision import Precision, autocast, compiled_outputs
from pyrolora.inference.predict import DEFAULT_TEMPERATURES, draws_needed, select_temperature
from pyrolora.models import BayesianLoraModel
from pyrolora.validation import at_least, positive

__all__ = ["DEFAULT_KL_WEIGHT", "FitResult", "LossStep", "fit", "kl_annealing", "make_schedule", "resolve_steps"]

Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "sgd"]

#: β, the default weight of the KL term (prior and entropy) against the likelihood. The ELBO (β = 1) under the
#: N(0, 0.1²) prior left B-LoRA-XS 4 points below its MAP on SST-2 (MiniLM-L6, 2,000 rows x 10 epochs, 3 seeds):
#: the posterior stayed at 0.9x the prior's width in most directions, and its noise, passed through diag(s_r) and
#: alpha / r, shrank the mean to rms 0.03 against the MAP's 0.05. At β = 0.1 the posterior is 0.11x the prior's
#: width and B-LoRA-XS matches the better of the two MAPs in accuracy (benchmarks/README.md, "The SVI recipe").
#: A delta guide (the MAP) is fitted with the same β: its prior term then weighs 0.1, the MAP that validation NLL
#: preferred too. ``kl_weight=1.0`` is the untempered ELBO.
DEFAULT_KL_WEIGHT = 0.1


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        losses: the loss of every step: the negative ELBO estimate on the step's minibatch, scaled to the whole
            dataset (so comparable across batch sizes); divide by ``dataset_size`` for a per-example value.
        num_steps: optimizer steps taken.
        seconds: wall-clock time of the loop.
        learning_rates: the latent learning rate at every step (after warm-up and decay).
        dataset_size: N, from the model.
        log_likelihoods: the expected log-likelihood term of every step's estimate, scaled to the whole dataset
            (lean step only; empty on Pyro's path).
        kls: the KL term ``log q(θ) - log p(θ)`` of every step's estimate (lean step only), before β.
        temperature: the posterior temperature chosen on ``validation`` data, if any were given.
        validation_nll: the validation NLL of every candidate temperature.
    """

    losses: list[float] = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0
    learning_rates: list[float] = field(default_factory=list)
    dataset_size: int = 1
    log_likelihoods: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    temperature: float | None = None
    validation_nll: dict[float, float] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one), per example."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) / self.dataset_size


def make_schedule(
    optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine or linear decay to zero at ``total_steps``, or constant.

    Uses transformers' schedule helpers, the ones users already know from the HF Trainer.
    """
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ConfigError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}.")


def _num_batches(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def resolve_steps(data: Iterable[Any], num_epochs: float | None, num_steps: int | None) -> int:
    """The number of optimizer steps: ``num_steps``, or ``ceil(num_epochs · len(data))`` (at least 1).

    One rule for every procedure that trains by steps (SVI, the MAP and collection stages of SWAG, ...).

    Raises:
        ConfigError: neither or both given, a non-positive value, or epochs of data without a length.
    """
    if (num_epochs is None) == (num_steps is None):
        raise ConfigError("give exactly one of num_epochs and num_steps.")
    if num_steps is None:
        batches = _num_batches(data)
        if batches is None:
            raise ConfigError("num_epochs needs data with a length; pass num_steps for an unsized iterable.")
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, int | float) or not num_epochs > 0:
            raise ConfigError(f"num_epochs must be positive, got {num_epochs!r}.")
        if not math.isfinite(num_epochs):
            raise ConfigError(f"num_epochs must be finite, got {num_epochs!r}.")
        num_steps = max(1, math.ceil(num_epochs * batches))
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
    return num_steps


def kl_annealing(warmup: float, final: float = 1.0) -> Callable[[int, int], float]:
    """A KL-annealing schedule for :func:`fit`'s ``kl_weight``: β rises linearly from 0 to ``final``.

    Args:
        warmup: length of the rise, a fraction of all steps if < 1, else a number of steps.
        final: β after the rise (1 gives the ELBO).

    Returns:
        ``schedule(step, num_steps) -> β`` with ``β = final · min(1, (step + 1) / warmup_steps)``.
    """
    if not (math.isfinite(warmup) and warmup > 0):
        raise ConfigError(f"the KL warm-up must be positive, got {warmup!r}.")
    if not (math.isfinite(final) and final > 0):
        raise ConfigError(f"the final KL weight must be > 0, got {final!r}.")

    def schedule(step: int, num_steps: int) -> float:
        steps = max(1, round(warmup * num_steps) if warmup < 1 else int(warmup))
        return final * min(1.0, (step + 1) / steps)

    return schedule


def _kl_schedule(kl_weight: float | Callable[[int, int], float]) -> Callable[[int, int], float]:
    if callable(kl_weight):
        return kl_weight
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, int | float) or not math.isfinite(kl_weight):
        raise ConfigError(f"kl_weight must be a number > 0 or a schedule (step, num_steps) -> β, got {kl_weight!r}.")
    if kl_weight <= 0:
        raise ConfigError(f"kl_weight must be > 0 (Pyro scales log densities by positive factors), got {kl_weight!r}.")
    value = float(kl_weight)
    return lambda step, num_steps: value


def _check_optimizer(optimizer: Any, momentum: Any) -> None:
    if optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}.")
    if momentum and optimizer != "sgd":
        raise ConfigError(f"momentum={momentum!r} applies to optimizer='sgd' only (got {optimizer!r}); drop it.")


def _make_optimizer(kind: Optimizer, groups: list[dict[str, Any]], momentum: float) -> torch.optim.Optimizer:
    """AdamW, or SGD (with ``momentum``) over the same parameter groups and learning rates."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    return torch.optim.AdamW(groups)


class _ScaleLatents(Messenger):
    """Multiply the log density of every latent (not observed) sample site by β; the likelihood is untouched."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


class LossStep:
    """One evaluation of the training objective: ``loss_step(inputs, targets, beta) -> -ELBO_β`` (differentiable).

    ``-ELBO_β = -E_q[log p(y | θ)] + β · E_q[log q(θ) - log p(θ)]``, estimated with ``num_particles`` draws of
    θ (β = 1: the negative ELBO). The path is picked once: :class:`~pyrolora.inference.lean.LeanELBO` when
    ``lean`` and it equals ``Trace_ELBO`` for this model and guide (the built-in guides and models), else the
    Pyro ``loss`` (default ``Trace_ELBO``) with β applied to the latent sites of the model and to the guide.
    Pyro's validation errors become :class:`~pyrolora.errors.DataError` (targets outside the likelihood's
    support) or :class:`~pyrolora.errors.DivergenceError` (non-finite outputs), as does a non-finite loss.
    """

    def __init__(
        self,
        model: BayesianLoraModel,
        guide: nn.Module,
        *,
        loss: ELBO | None = None,
        num_particles: int = 1,
        lean: bool = True,
        precision: Precision = "float32",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        self.model, self.guide = model, guide
        self.elbo = loss if loss is not None else Trace_ELBO(num_particles=num_particles)
        self.autocast = autocast(precision, model.device)
        compiled = compiled_outputs(model, compile)
        self.lean = None
        if lean and supports(model, guide):
            self.lean = LeanELBO(model, guide, num_particles=num_particles, autocast=self.autocast, outputs=compiled)
        elif compiled is not None:
            raise ConfigError(
                "compile needs the lean step: the default loss, lean=True and a built-in guide and model "
                f"(got guide {type(guide).__name__}, loss {type(loss).__name__ if loss else None})."
            )

    def _model(self, *args: Any, **kwargs: Any) -> Any:
        with self.autocast():
            return self.model(*args, **kwargs)

    def __call__(
        self,
        inputs: Any,
        targets: torch.Tensor | None,
        beta: float = 1.0,
        *,
        step: int = 0,
        num_steps: int = 1,
        lr: float = math.nan,
    ) -> torch.Tensor:
        """The loss of one batch; ``step`` (0-based) of ``num_steps`` and ``lr`` go into error messages."""
        try:
            if self.lean is not None and targets is not None:
                value = self.lean.differentiable_loss(inputs, targets, kl_weight=beta)
            elif beta == 1.0:
                value = self.elbo.differentiable_loss(self._model, self.guide, inputs, targets)
            else:  # β scales log p(θ) in the model and log q(θ) in the guide
                with _ScaleLatents(beta):
                    value = self.elbo.differentiable_loss(self._model, self.guide, inputs, targets)
        except torch.linalg.LinAlgError as err:  # the guide's covariance could not be factorised
            raise factorisation_failed(err, step, num_steps, lr) from err
        except ValueError as err:
            if "found invalid values" not in str(err):
                raise
            said = str(err).splitlines()[0][:300]
            if "within the support" in str(err):  # observed values the likelihood cannot produce: bad data
                raise DataError(
                    f"the targets of the batch at step {step + 1} lie outside the likelihood's support (e.g. a class "
                    "index >= the number of classes, or < 0); check the labels and the label map. Pyro said: "
                    f"{said}"
                ) from err
            # Pyro's validation rejects a distribution built from NaN or infinite outputs: a divergence.
            raise DivergenceError(
                f"the model produced non-finite outputs at step {step + 1} of {num_steps}; lower lr (now {lr:.3g}), "
                f"enable clip_norm, or check the inputs of this batch. Pyro said: {said}"
            ) from err
        if not torch.isfinite(value):
            raise DivergenceError(
                f"the loss is {value.item()} at step {step + 1} of {num_steps}; lower lr (now {lr:.3g}), enable "
                "clip_norm, or check the data for bad targets."
            )
        return value


def _check_rates(lr: Any, head_lr: Any, warmup: Any) -> None:
    positive(lr, "lr")
    positive(head_lr, "head_lr")
    at_least(warmup, "warmup", 0)


def _guide_mean(guide: nn.Module) -> nn.Parameter | None:
    """The mean parameter μ of a joint Gaussian guide (Pyro's ``AutoContinuous`` Gaussians keep it as ``loc``)."""
    from pyro.infer import autoguide

    gaussian = (
        autoguide.AutoLowRankMultivariateNormal,
        autoguide.AutoDiagonalNormal,
        autoguide.AutoMultivariateNormal,
    )
    loc = getattr(guide, "loc", None)
    return loc if isinstance(guide, gaussian) and isinstance(loc, nn.Parameter) else None


def _param_groups(
    model: BayesianLoraModel,
    guide: nn.Module,
    lr: float,
    head_lr: float,
    head_weight_decay: float,
    scale_lr: float | None = None,
) -> list[dict[str, Any]]:
    """The guide's (and a fitted prior's) parameters at ``lr`` without decay (the spread of a Gaussian guide at
    ``scale_lr`` if given); the head's at ``head_lr``."""
    # an empirical-Bayes prior's parameters climb the same ELBO at the guide's learning rate
    latent = [p for p in guide.parameters() if p.requires_grad] + model.prior_parameters()
    mean = _guide_mean(guide)
    if mean is not None and scale_lr is not None:
        spread = [p for p in latent if p is not mean and not any(p is q for q in model.prior_parameters())]
        rest = [p for p in latent if not any(p is q for q in spread)]
        groups = [
            {"params": rest, "lr": lr, "weight_decay": 0.0},
            {"params": spread, "lr": scale_lr, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": latent, "lr": lr, "weight_decay": 0.0}]
    head_params = model.head_parameters()
    if head_params:
        groups.append({"params": head_params, "lr": head_lr, "weight_decay": head_weight_decay})
    return groups


def _apply_gradients(
    value: torch.Tensor,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    clip_norm: float | None,
    where: str,
    frozen: torch.Tensor | None = None,
) -> None:
    """Backpropagate, clip the global gradient norm and step; a non-finite gradient is a DivergenceError.
    ``frozen`` (a parameter) gets no gradient, so AdamW leaves it where it is."""
    value.backward()
    if frozen is not None:
        frozen.grad = None
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm is not None else math.inf)
    if not torch.isfinite(norm):
        raise DivergenceError(
            f"a gradient is not finite at {where}; lower lr, enable clip_norm, or use a smaller init_scale for the "
            "guide."
        )
    optimizer.step()


def fit(
    model: BayesianLoraModel,
    guide: nn.Module,
    data: Iterable[Any],
    *,
    num_epochs: float | None = None,
    num_steps: int | None = None,
    lr: float = 1e-2,
    head_lr: float = 1e-3,
    head_weight_decay: float = 0.0,
    warmup: float = 0.06,
    schedule: Schedule = "cosine",
    clip_norm: float | None = None,
    num_particles: int = 1,
    loss: ELBO | None = None,
    seed: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    precision: Precision = "float32",
    compile: bool | dict[str, Any] = False,
    lean: bool = True,
    kl_weight: float | Callable[[int, int], float] = DEFAULT_KL_WEIGHT,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    optimizer: Optimizer = "adamw",
    momentum: float = 0.0,
    warm_start: float = 0.0,
    freeze_mean: bool = False,
    scale_lr: float | None = None,
    validation: Iterable[Any] | None = None,
    temperatures: Iterable[float] = DEFAULT_TEMPERATURES,
    checkpoint_tag: str | None = None,
) -> FitResult:
    """Fit ``guide`` (and the model's head) by maximising the β-weighted ELBO with a torch optimizer.

    Each step draws ``num_particles`` samples of θ from the guide and minimises the estimate
    ``-(N/B) Σ_batch log p(y|x, θ) + β (log q(θ) - log p(θ))`` (the data plate scales the minibatch; β =
    ``kl_weight``, :data:`DEFAULT_KL_WEIGHT` = 0.1 by default, 1 for the ELBO); with the ``delta`` guide this is
    MAP training of LoRA-XS with the prior term weighted β. Given ``validation`` batches, the posterior
    temperature used by :func:`~pyrolora.inference.predict.predict` is then chosen on their NLL. The guide's
    parameters use AdamW (or SGD, see ``optimizer``) with ``lr`` and no weight decay (the prior regularises); the
    head uses ``head_lr`` and ``head_weight_decay``. All Pyro settings are scoped to the call: it runs in Pyro's
    module-local parameter mode and touches no global parameter store.

    Args:
        model: the Bayesian model.
        guide: a guide for ``model`` (see :mod:`pyrolora.inference.guides`).
        data: re-iterable of ``(inputs, targets)`` batches, e.g. a DataLoader or a list.
        num_epochs: passes over ``data`` (fractions allowed; needs ``len(data)``). Exactly one of
            ``num_epochs`` and ``num_steps`` must be given.
        num_steps: optimizer steps.
        lr: peak learning rate of the guide parameters. 1e-2 worked for R in the prototype.
        head_lr: peak learning rate of the task head.
        head_weight_decay: decoupled weight decay of the head.
        warmup: warm-up length, a fraction of all steps if < 1, else a number of steps.
        schedule: decay after warm-up.
        clip_norm: max global gradient norm, or ``None`` (the default) for no clipping. The loss is summed over N,
            so a fixed threshold clips every step, which moves the optimum: clipping at 1.0 made the fitted
            covariance of a closed-form problem 17% wrong (tests/inference/test_closed_form.py).
        num_particles: samples of θ per step.
        loss: an ELBO object; default ``Trace_ELBO(num_particles=num_particles)``.
        seed: if given, the run is reproducible and the global RNG state is restored afterwards.
        progress: show a progress bar with the loss per example.
        callback: called as ``callback(step, loss)`` after every step.
        precision: ``"bf16"`` runs the backbone under bfloat16 autocast (on the GPU's tensor cores, or on the
            CPU); the guide, the prior and the log-likelihood stay in float32.
        compile: run the backbone through ``torch.compile`` (``True``, or a dict of its options); needs the
            lean step.
        lean: compute the loss with :class:`~pyrolora.inference.lean.LeanELBO` when it equals ``Trace_ELBO``
            for this model and guide (the built-in guides and models, default ``loss``): one joint draw of θ
            split into the cores instead of Pyro's per-site tracing. Same values and gradients; ``False``
            forces Pyro's path.

        kl_weight: β, the weight of the KL term: each step minimises
            ``-E_q[log p(y | θ)] + β · E_q[log q(θ) - log p(θ)]`` (the ELBO at β = 1). A number, or a schedule
            ``kl_weight(step, num_steps) -> β > 0`` such as :func:`kl_annealing` (β rising towards 1). β = T is the
            same optimum as tempering the likelihood to ``p(y | θ)^(1/T)`` (the objective times 1/T), so
            ``kl_weight`` < 1 is a "cold" posterior, > 1 a warm one. Default :data:`DEFAULT_KL_WEIGHT` (0.1).
        checkpoint_dir: if given, write ``checkpoint.safetensors`` there (atomically) every ``checkpoint_every``
            steps and after the last: guide, head, optimizer, scheduler, RNG states and data position
            (see :mod:`pyrolora.inference.checkpoint`).
        checkpoint_every: steps between checkpoints (default 100).
        resume_from: a checkpoint file (or its folder) of an interrupted fit with the same model, guide, data
            and settings; the fit continues from it and ends where the uninterrupted fit would have.
        optimizer: ``"adamw"`` (the default) or ``"sgd"``: plain stochastic gradient descent
            ``θ ← θ - η_t (g_t + λ θ)``, with heavy-ball momentum if ``momentum`` > 0 (``head_weight_decay`` is
            then the coupled L2 coefficient λ). The loss is summed over the N training examples, so SGD's
            gradients grow with N and its stable ``lr`` is about 1 / (N · per-example curvature), far below
            AdamW's, whose step size does not depend on the gradient's scale. SWAG's theory (iterates of
            constant-lr SGD scatter around the optimum like a posterior) is about SGD.
        momentum: SGD momentum in [0, 1); only with ``optimizer="sgd"``.
        warm_start: for a joint Gaussian guide (``lowrank``, ``diagonal``, ``full``), the first steps (a fraction
            of all steps if < 1, else a number) train only its mean μ, at θ = μ: the MAP objective
            ``-(N/B) Σ log p(y | x, μ) - β log p(μ)``. The remaining steps fit the whole guide. Needs the lean
            step. 0 (the default) fits the whole guide from the first step.
        freeze_mean: after the warm start, keep μ where the warm start left it and fit only the spread (the
            scale and covariance factors).
        scale_lr: peak learning rate of the guide's spread parameters (everything but μ); ``None`` uses ``lr``.
        validation: held-out batches ``(inputs, targets)``. If given, after training the posterior temperature τ
            that minimises their predictive NLL is chosen from ``temperatures`` (see
            :func:`~pyrolora.inference.predict.select_temperature`) and kept as ``guide.posterior_temperature``,
            which :func:`~pyrolora.inference.predict.predict` then uses: draws ``m + τ (θ - m)`` around the
            posterior median m. A point-mass guide has nothing to temper. ``None``: τ = 1.
        temperatures: the candidate τ values (the default grid holds 0, the median alone).
        checkpoint_tag: a string stored in every checkpoint (e.g. a digest of the run's configuration);
            ``resume_from`` then refuses a checkpoint whose tag differs.

    Returns:
        A :class:`FitResult` with the loss history.

    Raises:
        DivergenceError: when the loss or a gradient is not finite, the loss runs away (grows more than
            :data:`~pyrolora.inference.divergence.RUNAWAY_FACTOR` times over its first value's scale), or the
            guide's covariance cannot be factorised; the message names the step (and the last good checkpoint,
            which is left intact).
    """
    check_batches(data)
    num_steps = resolve_steps(data, num_epochs, num_steps)
    _check_rates(lr, head_lr, warmup)
    _check_optimizer(optimizer, momentum)
    beta = _kl_schedule(kl_weight)
    warmup_steps = round(warmup * num_steps) if warmup < 1 else int(warmup)
    if isinstance(warm_start, bool) or not isinstance(warm_start, int | float) or not 0 <= warm_start:
        raise ConfigError(f"warm_start must be a fraction in [0, 1) or a number of steps, got {warm_start!r}.")
    warm_steps = min(num_steps, round(warm_start * num_steps) if warm_start < 1 else int(warm_start))
    if scale_lr is not None:
        positive(scale_lr, "scale_lr")
    elbo = loss if loss is not None else Trace_ELBO(num_particles=num_particles)
    lean = lean and loss is None  # a loss of the caller's own is used as given
    if distributed.is_distributed():  # under torchrun: shard every global batch, average gradients with DDP
        data, elbo = distributed.data_parallel(model, guide, data, elbo)
        progress = progress and distributed.is_main_process()
        lean = False  # the DDP wrapper averages gradients around the Pyro ELBO; the lean step would bypass it
    check_local(guide)
    device = model.device
    result = FitResult(dataset_size=model.dataset_size)
    # In a distributed job every process holds the same state: only the main process writes checkpoints.
    checkpoints = Checkpointer(
        checkpoint_dir if distributed.is_main_process() else None, checkpoint_every, tag=checkpoint_tag
    )
    with contextlib.ExitStack() as scope:
        scope.push(checkpoints.on_exit)
        scope.enter_context(pyro.settings.context(module_local_params=True))
        if seed is not None:
            scope.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
        scope.callback(model.eval)
        model.train()
        stream = BatchStream(data, num_steps)
        inputs, targets = split_batch(to_device(next(stream), device))
        require_targets(targets, 0)
        if getattr(guide, "prototype_trace", True) is None:
            guide(inputs, targets)  # autoguides create their parameters on first call
        mean = _guide_mean(guide)
        if (warm_steps or freeze_mean) and mean is None:
            raise ConfigError(
                f"warm_start and freeze_mean need a joint Gaussian guide (lowrank, diagonal, full) with a mean "
                f"parameter, not {type(guide).__name__}; set warm_start=0 and freeze_mean=False."
            )
        groups = _param_groups(model, guide, lr, head_lr, head_weight_decay, scale_lr)
        params = [p for group in groups for p in group["params"]]
        optimizer = _make_optimizer(optimizer, groups, momentum)  # the name now holds the torch optimizer
        scheduler = make_schedule(optimizer, schedule, warmup_steps, num_steps)
        step_loss = LossStep(
            model, guide, loss=elbo, num_particles=num_particles, lean=lean, precision=precision, compile=compile
        )
        if warm_steps and step_loss.lean is None:
            raise ConfigError(
                "warm_start needs the lean step: the default loss, lean=True and a built-in guide and model; "
                "set warm_start=0 to fit with this loss."
            )
        bar = scope.enter_context(
            tqdm(total=num_steps, desc="fit", disable=not progress, unit="step", dynamic_ncols=True)
        )
        start = time.perf_counter()
        parts = dict(model=model, guide=guide, optimizer=optimizer, scheduler=scheduler, stream=stream, result=result)
        first_step = 0
        runaway = RunawayLoss(model.dataset_size)
        if resume_from is not None:
            first_step, seconds = checkpoints.resume(resume_from, num_steps, **parts)
            runaway.resume(result.losses)
            start -= seconds
            bar.update(first_step)
        for step in range(first_step, num_steps):
            if step:
                inputs, targets = split_batch(to_device(next(stream), device))
                require_targets(targets, step)
            if step_loss.lean is not None:
                step_loss.lean.mean_only = step < warm_steps
            where, rate = f"step {step + 1} of {num_steps}", scheduler.get_last_lr()[0]
            optimizer.zero_grad(set_to_none=True)
            value = step_loss(inputs, targets, beta(step, num_steps), step=step, num_steps=num_steps, lr=rate)
            runaway(step, value.item(), num_steps, rate)
            frozen = mean if freeze_mean and step >= warm_steps else None
            _apply_gradients(value, params, optimizer, clip_norm, where, frozen)
            scheduler.step()
            result.learning_rates.append(rate)
            result.losses.append(value.item())
            if step_loss.lean is not None and step_loss.lean.last_terms is not None:
                result.log_likelihoods.append(step_loss.lean.last_terms[0].item())
                result.kls.append(step_loss.lean.last_terms[1].item())
            result.num_steps = step + 1
            checkpoints.maybe_save(step + 1, num_steps, **parts)
            bar.update(1)
            if step % 10 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{result.losses[-1] / model.dataset_size:.4f}")
            if callback is not None:
                callback(step, result.losses[-1])
        result.seconds = time.perf_counter() - start
    if validation is not None and draws_needed(guide, 2) > 1:
        tau, scores = select_temperature(model, guide, validation, grid=temperatures, precision=precision)
        guide.posterior_temperature = tau
        result.temperature, result.validation_nll = tau, scores
    return result
