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
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from torch import nn
from tqdm.auto import tqdm

from pyrolora.errors import ConfigError, DataError, DivergenceError
from pyrolora.inference import distributed
from pyrolora.inference.batches import split_batch, to_device
from pyrolora.inference.checkpoint import BatchStream, Checkpointer
from pyrolora.inference.divergence import RunawayLoss, factorisation_failed
from pyrolora.inference.guides import check_local
from pyrolora.inference.lean import LeanELBO, supports
from pyrolora.inference.precision import Precision, autocast, compiled_outputs
from pyrolora.models import BayesianLoraModel

__all__ = ["FitResult", "fit", "kl_annealing", "make_schedule"]

Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "sgd"]


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
    """

    losses: list[float] = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0
    learning_rates: list[float] = field(default_factory=list)
    dataset_size: int = 1

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
    clip_norm: float | None = 1.0,
    num_particles: int = 1,
    loss: ELBO | None = None,
    seed: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    precision: Precision = "float32",
    compile: bool | dict[str, Any] = False,
    lean: bool = True,
    kl_weight: float | Callable[[int, int], float] = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    optimizer: Optimizer = "adamw",
    momentum: float = 0.0,
    checkpoint_tag: str | None = None,
) -> FitResult:
    """Fit ``guide`` (and the model's head) by maximising the ELBO with a torch optimizer.

    Each step draws ``num_particles`` samples of θ from the guide and minimises the negative ELBO estimate
    ``-(N/B) Σ_batch log p(y|x, θ) + log q(θ) - log p(θ)`` (the data plate scales the minibatch); with the
    ``delta`` guide this is MAP training of LoRA-XS. The guide's parameters use AdamW (or SGD, see
    ``optimizer``) with ``lr`` and no weight decay (the prior regularises); the head uses ``head_lr`` and
    ``head_weight_decay``. All Pyro settings are scoped to the call: it runs in Pyro's module-local parameter
    mode and touches no global parameter store.

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
        clip_norm: max global gradient norm, or ``None`` for no clipping.
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
            ``kl_weight`` < 1 is a "cold" posterior, > 1 a warm one. Not available under torchrun.
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
    if (num_epochs is None) == (num_steps is None):
        raise ConfigError("give exactly one of num_epochs and num_steps.")
    if num_steps is None:
        batches = _num_batches(data)
        if batches is None:
            raise ConfigError("num_epochs needs data with a length; pass num_steps for an unsized iterable.")
        if num_epochs is None or num_epochs <= 0:
            raise ConfigError(f"num_epochs must be positive, got {num_epochs!r}.")
        num_steps = max(1, math.ceil(num_epochs * batches))
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
    for value, what in ((lr, "lr"), (head_lr, "head_lr")):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{what} must be a positive number, got {value!r}.")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup!r}.")
    warmup_steps = round(warmup * num_steps) if warmup < 1 else int(warmup)
    _check_optimizer(optimizer, momentum)
    elbo = loss if loss is not None else Trace_ELBO(num_particles=num_particles)
    device = model.device
    if distributed.is_distributed():  # under torchrun: shard every global batch, average gradients with DDP
        data, elbo = distributed.data_parallel(model, guide, data, elbo)
        progress = progress and distributed.is_main_process()
        # The DDP wrapper averages gradients around the Pyro ELBO; the lean step bypasses it, so it is not used.
        lean = False

    beta = _kl_schedule(kl_weight)
    if distributed.is_distributed() and kl_weight != 1.0:
        raise ConfigError("kl_weight other than 1 is not supported under torchrun; train with kl_weight=1.")
    check_local(guide)
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
        scope.callback(setattr, model, "kl_weight", 1.0)  # prediction and diagnostics use the plain model
        model.train()
        stream = BatchStream(data, num_steps)
        batch = next(stream)
        inputs, targets = split_batch(to_device(batch, device))
        if getattr(guide, "prototype_trace", True) is None:
            guide(inputs, targets)  # autoguides create their parameters on first call
        guide_params = [p for p in guide.parameters() if p.requires_grad]
        head_params = model.head_parameters()
        # an empirical-Bayes prior's parameters climb the same ELBO at the guide's learning rate
        groups = [{"params": guide_params + model.prior_parameters(), "lr": lr, "weight_decay": 0.0}]
        if head_params:
            groups.append({"params": head_params, "lr": head_lr, "weight_decay": head_weight_decay})
        optimizer = _make_optimizer(optimizer, groups, momentum)  # the name now holds the torch optimizer
        scheduler = make_schedule(optimizer, schedule, warmup_steps, num_steps)
        params = guide_params + model.prior_parameters() + head_params
        context = autocast(precision, device)
        compiled = compiled_outputs(model, compile)
        lean_elbo = None
        if lean and loss is None and supports(model, guide):
            lean_elbo = LeanELBO(model, guide, num_particles=num_particles, autocast=context, outputs=compiled)
        elif compiled is not None:
            raise ConfigError(
                "compile needs the lean step: the default loss, lean=True and a built-in guide and model "
                f"(got guide {type(guide).__name__}, loss {type(loss).__name__ if loss else None})."
            )

        def pyro_model(*args: Any, **kwargs: Any) -> Any:
            with context():
                return model(*args, **kwargs)

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
            optimizer.zero_grad(set_to_none=True)
            model.kl_weight = beta(step, num_steps)
            try:
                if lean_elbo is not None and targets is not None:
                    value = lean_elbo.differentiable_loss(inputs, targets)
                else:
                    # β scales log q(θ) as the model scales log p(θ) (distributed runs keep β = 1)
                    weighted = guide if model.kl_weight == 1.0 else poutine.scale(guide, scale=model.kl_weight)
                    value = elbo.differentiable_loss(pyro_model, weighted, inputs, targets)
            except torch.linalg.LinAlgError as err:
                raise factorisation_failed(err, step, num_steps, scheduler.get_last_lr()[0]) from err
            except ValueError as err:
                if "found invalid values" not in str(err):
                    raise
                if "within the support" in str(err):  # observed values the likelihood cannot produce: bad data
                    raise DataError(
                        f"the targets of the batch at step {step + 1} lie outside the likelihood's support (e.g. a "
                        "class index >= the number of classes, or < 0); check the labels and the label map. "
                        f"Pyro said: {str(err).splitlines()[0][:300]}"
                    ) from err
                # Pyro's validation rejects a distribution built from NaN or infinite outputs: a divergence.
                raise DivergenceError(
                    f"the model produced non-finite outputs at step {step + 1} of {num_steps}; lower lr (now "
                    f"{scheduler.get_last_lr()[0]:.3g}), enable clip_norm, or check the inputs of this batch. "
                    f"Pyro said: {str(err).splitlines()[0][:300]}"
                ) from err
            if not torch.isfinite(value):
                raise DivergenceError(
                    f"the loss is {value.item()} at step {step + 1} of {num_steps}; lower lr (now "
                    f"{scheduler.get_last_lr()[0]:.3g}), enable clip_norm, or check the data for bad targets."
                )
            runaway(step, value.item(), num_steps, scheduler.get_last_lr()[0])
            value.backward()
            max_norm = clip_norm if clip_norm is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not torch.isfinite(norm):
                raise DivergenceError(
                    f"a gradient is not finite at step {step + 1} of {num_steps}; lower lr, enable "
                    "clip_norm, or use a smaller init_scale for the guide."
                )
            optimizer.step()
            result.learning_rates.append(scheduler.get_last_lr()[0])
            scheduler.step()
            loss_value = value.item()
            result.losses.append(loss_value)
            result.num_steps = step + 1
            checkpoints.maybe_save(step + 1, num_steps, **parts)
            bar.update(1)
            if step % 10 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{loss_value / model.dataset_size:.4f}")
            if callback is not None:
                callback(step, loss_value)
        result.seconds = time.perf_counter() - start
    return result
