"""Training logs: per-step ELBO, KL, learning rates and validation metrics to a CSV file and to TensorBoard.

:class:`TrainingLogger` is a ``callback`` for :func:`pyrolora.fit`; it never changes training. Its KL estimate
and the validation predictions run on forked random-number generators, so a run with logging takes exactly the
same steps (bit-identical losses) as one without. ``runs.build.train`` builds one from the ``[log]`` section of
the run configuration (:class:`pyrolora.runs.config.LogSpec`).

Logged per step (every ``every`` steps and the last one):

- ``loss``: the step's negative-ELBO estimate for the whole dataset (``FitResult.losses``); ``elbo = -loss``;
  ``elbo_per_example = elbo / N``.
- ``kl``: a Monte Carlo estimate ``E_q[log q(θ) - log p(θ)]`` of ``KL(q || p)`` over the adapter latents with
  ``kl_particles`` draws (for a point mass, ``-log p(θ)``: the MAP objective's prior term).
- ``lr``, ``head_lr``: the learning rates the step used (warm-up and decay included).
- ``val_*``: metrics on the validation data, every ``validation_every`` steps and at the last step.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.families import setup
from pyrolora.inference.svi import make_schedule
from pyrolora.models import BayesianLoraModel
from pyrolora.runs.folder import CSV_NAME, TENSORBOARD_DIR

__all__ = ["CSV_NAME", "TENSORBOARD_DIR", "TrainingLogger", "kl_estimate", "learning_rates", "steps_for"]


_TRAIN_COLUMNS = ("step", "epoch", "seconds", "loss", "elbo", "elbo_per_example", "kl", "lr", "head_lr")


@torch.no_grad()
def kl_estimate(model: BayesianLoraModel, guide: nn.Module, *, num_particles: int = 1, seed: int = 0) -> float:
    """A Monte Carlo estimate of ``KL(q || p) = E_q[log q(θ) - log p(θ)]`` over the adapter latents.

    The guide is traced without data and the model replayed on its draw (``inputs=None`` samples only the
    latents), so no backbone forward pass runs. The global RNG state is left untouched.
    """
    setup(guide, model)
    device = model.device
    total = 0.0
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        pyro.settings.context(module_local_params=True),
    ):
        torch.manual_seed(seed)
        for _ in range(num_particles):
            guide_trace = poutine.trace(guide).get_trace(None)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(None)
            total += float(guide_trace.log_prob_sum() - model_trace.log_prob_sum())
    return total / num_particles


def learning_rates(
    lr: float, head_lr: float, *, num_steps: int, warmup: float, schedule: str
) -> list[tuple[float, float]]:
    """The (latent, head) learning rate of every step of :func:`pyrolora.fit` with these settings.

    Replays fit's schedule (:func:`~pyrolora.inference.svi.make_schedule`, warm-up ``warmup`` as a fraction of
    the steps if < 1, else a number of steps) on a throw-away optimizer.
    """
    warmup_steps = round(warmup * num_steps) if warmup < 1 else int(warmup)
    dummy = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD([{"params": [dummy[0]], "lr": lr}, {"params": [dummy[1]], "lr": head_lr}])
    scheduler = make_schedule(optimizer, schedule, warmup_steps, num_steps)  # type: ignore[arg-type]
    rates = []
    for _ in range(num_steps):
        latent, head = scheduler.get_last_lr()
        rates.append((latent, head))
        optimizer.step()
        scheduler.step()
    return rates


class TrainingLogger:
    """A :func:`pyrolora.fit` callback that writes per-step scalars to a CSV file and/or TensorBoard.

    Use it as a context manager (or call :meth:`close`) so the files are flushed and closed::

        with TrainingLogger(run_dir, model, guide, csv=True, tensorboard=True, rates=rates) as log:
            fit(model, guide, loader, num_steps=n, callback=log)

    Args:
        directory: where ``train_log.csv`` and the ``tensorboard/`` event folder go (created if needed).
        model: the Bayesian model being fitted (for the KL estimate and N).
        guide: its guide.
        csv: write ``train_log.csv`` (one row per logged step, flushed after each row).
        tensorboard: write TensorBoard events with ``torch.utils.tensorboard.SummaryWriter`` (tags
            ``train/<column>`` and ``val/<metric>``).
        every: log every ``every``-th step (and always the last one, when ``num_steps`` is known).
        rates: the (latent, head) learning rate of every step (see :func:`learning_rates`); omitted columns
            stay empty.
        steps_per_epoch: batches per epoch, for the ``epoch`` column.
        validate: a callable returning validation metrics ``{name: value}``; run every ``validation_every``
            steps and at the last step.
        validation_every: steps between validations; 0 validates only at the last step (if ``validate``).
        kl_particles: draws per KL estimate; 0 skips the KL column.
        num_steps: total steps, to recognise the last one.
    """

    def __init__(
        self,
        directory: str | Path,
        model: BayesianLoraModel,
        guide: nn.Module,
        *,
        csv: bool = True,
        tensorboard: bool = False,
        every: int = 1,
        rates: list[tuple[float, float]] | None = None,
        steps_per_epoch: int | None = None,
        validate: Callable[[], Mapping[str, float]] | None = None,
        validation_every: int = 0,
        kl_particles: int = 1,
        num_steps: int | None = None,
    ) -> None:
        for value, what, low in (
            (every, "every", 1),
            (kl_particles, "kl_particles", 0),
            (validation_every, "validation_every", 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"log.{what} must be an integer >= {low}, got {value!r}.")
        self.directory = Path(directory)
        self.model = model
        self.guide = guide
        self.every = every
        self.rates = rates
        self.steps_per_epoch = steps_per_epoch
        self.validate = validate
        self.validation_every = validation_every
        self.kl_particles = kl_particles
        self.num_steps = num_steps if num_steps is not None else (len(rates) if rates is not None else None)
        self.rows: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        self._val_columns: list[str] = []
        self._csv_handle = None
        self._csv_writer: csv.DictWriter | None = None
        self._want_csv = csv
        self._writer = None
        self.directory.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "log.tensorboard needs the tensorboard package: `pip install tensorboard`, or set it to false."
                ) from err
            self._writer = SummaryWriter(log_dir=str(self.directory / TENSORBOARD_DIR))

    # ------------------------------------------------------------------ the callback
    def _is_last(self, step: int) -> bool:
        return self.num_steps is not None and step == self.num_steps - 1

    def __call__(self, step: int, loss: float) -> None:
        last = self._is_last(step)
        if step % self.every and not last:
            return
        n = self.model.dataset_size
        row: dict[str, Any] = {
            "step": step + 1,
            "epoch": (step + 1) / self.steps_per_epoch if self.steps_per_epoch else "",
            "seconds": round(time.perf_counter() - self._start, 4),
            "loss": loss,
            "elbo": -loss,
            "elbo_per_example": -loss / n,
            "kl": kl_estimate(self.model, self.guide, num_particles=self.kl_particles, seed=step)
            if self.kl_particles
            else "",
            "lr": self.rates[step][0] if self.rates is not None and step < len(self.rates) else "",
            "head_lr": self.rates[step][1] if self.rates is not None and step < len(self.rates) else "",
        }
        validating = self.validate is not None and (
            last or (self.validation_every and (step + 1) % self.validation_every == 0)
        )
        if validating:
            metrics = self.validate()  # type: ignore[misc]
            for key, value in metrics.items():
                row[f"val_{key}"] = float(value)
        self._write(row)
        if last:
            self.close()  # every row is flushed as written; closing at the end needs no try/finally around fit

    # ------------------------------------------------------------------ sinks
    def _write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        step = row["step"]
        if self._writer is not None:
            for key, value in row.items():
                if key in ("step", "seconds") or value == "":
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        if self._want_csv:
            new_val = [k for k in row if k.startswith("val_") and k not in self._val_columns]
            if self._csv_writer is None or new_val:
                self._val_columns.extend(new_val)
                self._rewrite_csv()
            else:
                self._csv_writer.writerow(row)
                self._csv_handle.flush()  # type: ignore[union-attr]

    def _rewrite_csv(self) -> None:
        """(Re)write the whole CSV, e.g. when validation columns first appear, then keep appending."""
        if self._csv_handle is not None:
            self._csv_handle.close()
        self._csv_handle = open(self.directory / CSV_NAME, "w", newline="", encoding="utf-8")
        columns = list(_TRAIN_COLUMNS) + self._val_columns
        self._csv_writer = csv.DictWriter(self._csv_handle, fieldnames=columns, restval="")
        self._csv_writer.writeheader()
        for row in self.rows:
            self._csv_writer.writerow(row)
        self._csv_handle.flush()

    def close(self) -> None:
        """Flush and close the CSV file and the TensorBoard writer."""
        if self._csv_handle is not None:
            self._csv_handle.close()
            self._csv_handle = None
            self._csv_writer = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def steps_for(num_batches: int, epochs: float) -> int:
    """Optimizer steps :func:`pyrolora.fit` takes for ``epochs`` passes over ``num_batches`` batches."""
    return max(1, math.ceil(epochs * num_batches))
