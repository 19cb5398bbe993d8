"""Runs: build a backbone, adapters, model and guide from a :class:`RunConfig`; train, evaluate, save, load.

This is the one place where every room of the package is composed. A run folder holds::

    config.json          the RunConfig, the package version
    state.safetensors    guide parameters and the task head (no pickle)
    fit.json             loss history and timing
    metrics.json         evaluation results (after evaluate)
    manifest.json        size and SHA-256 of every file, base-model fingerprint, adapter rank / targets / sites
                         (written last, checked first: see :mod:`pyrolora.runs.folder`)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pyrolora._atomic import atomic_path, write_json
from pyrolora._integrity import config_digest
from pyrolora._version import __version__
from pyrolora.adapters import inject_adapters
from pyrolora.data import ClassificationSplit, TokenizedLoader, vader_splits
from pyrolora.data.mcqa import MultipleChoiceLoader, MultipleChoiceSplit
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.evaluation import metrics
from pyrolora.inference import FitResult, Prediction, distributed, guides, predict
from pyrolora.inference.fitted import require_fitted
from pyrolora.inference.posterior import fit_posterior
from pyrolora.inference.state import load_state, save_state
from pyrolora.models import BayesianLoraModel
from pyrolora.models.backbones import check_tokenizer, input_length_limit, load_sequence_classifier, load_tokenizer
from pyrolora.runs.config import RunConfig, TaskSpec
from pyrolora.runs.device import resolve_device
from pyrolora.runs.folder import (
    CONFIG_FILE,
    FIT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    STATE_FILE,
    check_model,
    verify_files,
    write_manifest,
)

__all__ = ["Evaluation", "Run", "build", "evaluate", "load_run", "load_task", "save_run", "train"]


def load_task(spec: TaskSpec) -> dict[str, ClassificationSplit]:
    """The splits (``train``, ``validation``, ``test``) of the configured task."""
    if spec.name == "vader":
        return vader_splits(neutral_margin=spec.neutral_margin)
    if spec.name in ("sst2", "rte", "cola", "arc_easy", "arc_challenge", "openbookqa", "tsv", "mcqa"):
        return _load_named_task(spec)
    raise ConfigError(f"unknown task {spec.name!r}.")


def _load_named_task(spec: TaskSpec) -> dict[str, Any]:
    """GLUE-style and multiple-choice tasks from local files or the hub (see :func:`pyrolora.data.load_splits`)."""
    from pyrolora.data.glue import TsvSpec
    from pyrolora.data.tasks import load_splits

    tsv = None
    if spec.name == "tsv":
        tsv = TsvSpec(
            text_columns=spec.text_columns,
            label_column=spec.label_column,
            labels=spec.labels,
            label_names=spec.label_names,
            columns=spec.columns,
            train_file=spec.train_file,
            eval_file=spec.eval_file,
        )
    return load_splits(
        spec.name,
        source=spec.source,
        data_dir=spec.data_dir,
        path=spec.path,
        hub_config=spec.hub_config,
        tsv=tsv,
        validation_fraction=spec.validation_fraction,
        test_fraction=spec.test_fraction,
        max_train=spec.max_train,
        max_eval=spec.max_eval,
        seed=spec.split_seed,
    )


def _multiple_choice_backbone(config: RunConfig, num_options: int) -> tuple[nn.Module, Any]:
    """A causal LM wrapped to score the options of a multiple-choice task, and its tokenizer."""
    from pyrolora.models.multiple_choice import MultipleChoiceLM, letter_token_ids, load_causal_lm

    lm, tokenizer = load_causal_lm(config.model.name, config.model.gguf_file)
    letters = letter_token_ids(tokenizer, num_options) if config.task.scoring == "letters" else None
    return MultipleChoiceLM(lm, config.task.scoring, letters).eval(), tokenizer


@dataclass
class Run:
    """A built (and possibly trained) run: everything needed to predict and to save."""

    config: RunConfig
    model: BayesianLoraModel
    guide: nn.Module
    tokenizer: Any
    splits: dict[str, ClassificationSplit]
    fit_result: FitResult | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None  # the token limit in effect: model.max_length, capped at the model's own

    def loader(self, split: str | ClassificationSplit, *, shuffle: bool = False) -> TokenizedLoader:
        """Batches of a named split (or of any split of the same task) for training or prediction."""
        data = self.splits[split] if isinstance(split, str) else split
        batch = self.config.train.batch_size if shuffle else self.config.predict.batch_size
        capped = self.max_length is not None and self.max_length < self.config.model.max_length
        if isinstance(data, MultipleChoiceSplit):
            return MultipleChoiceLoader(  # type: ignore[return-value]
                data,
                self.tokenizer,
                batch_size=batch,
                max_length=self.config.model.max_length,
                scoring=self.config.task.scoring,
                shuffle=shuffle,
                seed=self.config.train.seed,
            )
        return TokenizedLoader(
            data,
            self.tokenizer,
            batch_size=batch,
            max_length=self.max_length or self.config.model.max_length,
            shuffle=shuffle,
            seed=self.config.train.seed,
            truncation_hint=(
                f"model.max_length={self.config.model.max_length} is capped at the {self.max_length} tokens the "
                "model allows; shorten the texts or use a model with longer inputs to keep them whole"
                if capped
                else None
            ),
        )


def build(config: RunConfig, splits: dict[str, ClassificationSplit] | None = None) -> Run:
    """Load the backbone and tokenizer, inject adapters, and compose model and (unfitted) guide."""
    splits = splits if splits is not None else load_task(config.task)
    train_split = splits["train"]
    if config.task.multiple_choice:
        backbone, tokenizer = _multiple_choice_backbone(config, train_split.num_classes)
    else:
        backbone = load_sequence_classifier(config.model.name, train_split.num_classes, seed=config.train.seed)
        tokenizer = load_tokenizer(config.model.name)
    check_tokenizer(tokenizer, backbone, repr(config.model.name))
    # Inputs longer than the model's position embeddings would crash its forward pass: cap the token limit
    # there. The loaders then truncate longer inputs with one warning per split that counts them.
    limit = input_length_limit(backbone, tokenizer)
    max_length = min(config.model.max_length, limit) if limit is not None else config.model.max_length
    adapters = inject_adapters(backbone, config.adapters)
    model = BayesianLoraModel(
        backbone,
        adapters,
        prior=config.prior.build(),
        dataset_size=len(train_split),
    )
    guide = guides.make(config.guide.name, model, **config.guide.options)
    return Run(config=config, model=model, guide=guide, tokenizer=tokenizer, splits=splits, max_length=max_length)


def _training_logger(run: Run, log_dir: str | Path | None) -> Any:
    """The :class:`~pyrolora.runs.tracking.TrainingLogger` the ``[log]`` section asks for, or ``None``.

    With ``[log] csv`` or ``tensorboard`` enabled, ``train(..., log_dir=RUN_DIR)`` logs every step there.
    """
    spec = run.config.log
    if not (spec.csv or spec.tensorboard):
        return None
    if log_dir is None:
        raise ConfigError("[log] enables csv or tensorboard logs; pass log_dir (the run folder) to train().")
    from pyrolora.runs.tracking import TrainingLogger, learning_rates, steps_for

    t = run.config.train
    steps_per_epoch = -(-len(run.splits["train"]) // t.batch_size)
    num_steps = steps_for(steps_per_epoch, t.epochs)
    validate = None
    if "validation" in run.splits:
        val_loader = run.loader("validation")
        val_split = run.splits["validation"]

        def validate() -> dict[str, float]:
            p = run.config.predict
            mean = predict(run.model, run.guide, val_loader, num_samples=spec.validation_samples, seed=0).mean
            keys = ("accuracy", "ece", "nll", "brier")  # the validation columns of the training log
            summary = metrics.summary(mean, val_split.labels, n_bins=p.n_bins, keys=keys)
            return {key: summary[key] for key in keys}

    return TrainingLogger(
        log_dir,
        run.model,
        run.guide,
        csv=spec.csv,
        tensorboard=spec.tensorboard,
        every=spec.every,
        rates=learning_rates(t.lr, t.head_lr, num_steps=num_steps, warmup=t.warmup, schedule=t.schedule),
        steps_per_epoch=steps_per_epoch,
        validate=validate,
        validation_every=spec.validation_every,
        kl_particles=spec.kl_particles,
        num_steps=num_steps,
    )


def fit_run(run: Run, *, progress: bool = True, **extra: Any) -> FitResult:
    """Fit a built run's guide and head with the ``[train]`` settings of its config on its ``train`` split.

    Runs the guide family's whole procedure (:func:`~pyrolora.inference.posterior.fit_posterior`: SVI for
    variational guides; MAP then Hessian, collection or chains for laplace, swag and nuts). ``extra`` goes to
    :func:`pyrolora.fit` (callback, checkpoints, precision, ...).
    """
    t = run.config.train
    return fit_posterior(
        run.model,
        run.guide,
        run.loader("train", shuffle=True),
        num_epochs=t.epochs,
        lr=t.lr,
        head_lr=t.head_lr,
        warmup=t.warmup,
        schedule=t.schedule,
        clip_norm=t.clip_norm,
        num_particles=t.num_particles,
        seed=t.seed,
        progress=progress,
        kl_weight=t.kl_schedule(),
        # the posterior temperature is chosen on the held-out validation split (variational guides only)
        validation=run.loader("validation") if "validation" in run.splits else None,
        temperatures=t.temperatures,
        precision=t.precision,
        **extra,
    )


def train(
    config: RunConfig,
    *,
    progress: bool = True,
    splits: dict[str, ClassificationSplit] | None = None,
    log_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    device: str | None = None,
    check: Callable[[Run], None] | None = None,
) -> Run:
    """Build a run, move it to its device and fit its guide and head on the ``train`` split.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) overrides ``[train] device``; under torchrun
    every process uses its own GPU (``cuda:LOCAL_RANK``) or the CPU. ``check(run)`` may refuse the built run
    before anything is trained.

    With ``checkpoint_dir``, the run's ``config.json`` and periodic training checkpoints are written there
    (see :mod:`pyrolora.inference.checkpoint`); ``resume=True`` continues from the checkpoint in that folder,
    after checking that ``config`` is the configuration it was started with.
    """
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the interrupted run.")
    run = build(config, splits)  # every check of the config against model and data, before anything is written
    if check is not None:  # the method's own refusal (e.g. MC dropout without dropout layers), before training
        check(run)
    resume_from = _prepare_checkpoints(config, checkpoint_dir, resume) if checkpoint_dir is not None else None
    if distributed.is_distributed():  # under torchrun: one device per process (cuda:LOCAL_RANK on a GPU machine)
        run.model.to(distributed.device())
    else:
        run.model.to(resolve_device(device or config.train.device))
    logger = _training_logger(run, log_dir)
    run.fit_result = fit_run(
        run,
        progress=progress,
        callback=logger,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume_from=resume_from,
        checkpoint_tag=config_digest(config.to_dict()),
    )
    if logger is not None:
        logger.close()
    return run


def _prepare_checkpoints(config: RunConfig, directory: str | Path, resume: bool) -> Path | None:
    """Check (resume) or write (fresh start) the folder's config.json; the checkpoint to resume from, if any."""
    from pyrolora.inference.checkpoint import CHECKPOINT_FILE

    directory = Path(directory)
    checkpoint = directory / CHECKPOINT_FILE
    if not resume:
        if checkpoint.exists():
            raise ConfigError(
                f"{directory} holds the checkpoint of an unfinished run; continue it with --resume (resume=True), or "
                "choose another output folder."
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the output folder {directory}: {err}") from err
        write_json(directory / CONFIG_FILE, {"pyrolora_version": __version__, **config.to_dict()})
        return None
    if not checkpoint.is_file():
        raise RunFolderError(
            f"there is no checkpoint to resume in {directory} ({CHECKPOINT_FILE} is missing); start without --resume."
        )
    try:
        saved = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {directory / CONFIG_FILE} of the interrupted run: {err}") from err
    saved.pop("pyrolora_version", None)
    with contextlib.suppress(ConfigError):  # keys added since (with their defaults) are no change
        saved = RunConfig.from_dict(saved).to_dict()
    if saved != config.to_dict():
        now = config.to_dict()
        changed = [f"{s}.{k}" for s in now for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
        raise ConfigError(
            f"the configuration differs from the one the interrupted run in {directory} started with (changed: "
            f"{changed}); resume with the run's own config.json, or start a new run in another folder."
        )
    return checkpoint


@dataclass
class Evaluation:
    """Metrics of one run on one split, and the predictions behind them."""

    metrics: dict[str, float]
    prediction: Prediction
    labels: np.ndarray
    human_probs: np.ndarray | None


def evaluate(
    run: Run, split: str | ClassificationSplit = "test", *, seed: int = 0, progress: bool = False
) -> Evaluation:
    """Predict with S posterior samples and compute accuracy, ECE, NLL, Brier (and MCC).

    When the split carries human label distributions, also the Spearman rank correlation between the
    model's predictive entropy and the entropy of the human label distribution (rater disagreement).
    """
    data = run.splits[split] if isinstance(split, str) else split
    p = run.config.predict
    prediction = predict(
        run.model,
        run.guide,
        run.loader(data),
        num_samples=p.num_samples,
        seed=seed,
        progress=progress,
        precision=run.config.train.precision,
    )
    probs, labels = prediction.mean, data.labels
    result = metrics.summary(probs, labels, n_bins=p.n_bins, human_probs=data.human_probs)
    return Evaluation(result, prediction, np.asarray(labels), data.human_probs)


def save_run(run: Run, directory: str | Path) -> Path:
    """Save configuration (JSON), posterior and head (safetensors), fit history and metrics into ``directory``.

    In a distributed job only the main process writes (every process holds the same run).
    """
    directory = Path(directory)
    if not distributed.is_main_process():
        return directory
    require_fitted(run.guide, "save the run")  # a folder that looks complete but cannot be loaded is worse than none
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)  # until the new one is written, the folder reads as unsaved
    for stale in (FIT_FILE, METRICS_FILE):  # an earlier run's, which this one may not replace
        (directory / stale).unlink(missing_ok=True)
    write_json(directory / CONFIG_FILE, {"pyrolora_version": __version__, **run.config.to_dict()})
    with atomic_path(directory / STATE_FILE) as tmp:
        save_state(tmp, run.model, run.guide)
    files = [CONFIG_FILE, STATE_FILE]
    if run.fit_result is not None:
        r = run.fit_result
        write_json(
            directory / FIT_FILE,
            {
                "num_steps": r.num_steps,
                "seconds": r.seconds,
                "dataset_size": r.dataset_size,
                "losses": r.losses,
                # the ELBO's two terms per step (lean step) and the posterior temperature chosen on validation
                "log_likelihoods": r.log_likelihoods,
                "kls": r.kls,
                "temperature": r.temperature,
                "validation_nll": {str(k): v for k, v in r.validation_nll.items()},
            },
        )
        files.append(FIT_FILE)
    if run.metrics:
        write_json(directory / METRICS_FILE, run.metrics)
        files.append(METRICS_FILE)
    write_manifest(directory, files, run.model, run.guide, base_model=run.config.model.name)
    return directory


def load_run(directory: str | Path, *, model_name: str | None = None, device: str | None = None) -> Run:
    """Rebuild a saved run: same backbone, adapters, model and guide, with the saved posterior and head.

    Every file is checked against the manifest first (size and SHA-256), and the rebuilt model against the
    run's base-model fingerprint, adapter rank, target modules and sites. Nothing is unpickled.

    Args:
        directory: the run folder.
        model_name: load the base model from here instead of the name in the run's config (e.g. a local copy);
            its adapted weights must be the ones the run was trained on.
        device: where the rebuilt run lives (``"auto"``: CUDA when present; default the CPU).

    Raises:
        RunFolderError: the folder is incomplete, a file is truncated or corrupt, or the model does not match.
    """
    directory = Path(directory)
    manifest = verify_files(directory)
    config_path = directory / CONFIG_FILE
    if CONFIG_FILE not in manifest["files"] or STATE_FILE not in manifest["files"]:
        raise RunFolderError(f"{directory} lacks {CONFIG_FILE} or {STATE_FILE}; the run was not saved completely.")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {config_path}: {err}") from err
    config = RunConfig.from_dict(data)
    if model_name is not None:
        config = config.replace(model={"name": model_name})
    run = build(config)
    check_model(manifest, run.model, directory)
    if device is not None:
        run.model.to(resolve_device(device))
    load_state(directory / STATE_FILE, run.model, run.guide)
    fit_path = directory / FIT_FILE
    if FIT_FILE in manifest["files"]:  # only the run's own files: never a stray one the manifest does not list
        fit_data = json.loads(fit_path.read_text(encoding="utf-8"))
        run.fit_result = FitResult(
            losses=fit_data["losses"],
            num_steps=fit_data["num_steps"],
            seconds=fit_data["seconds"],
            dataset_size=fit_data["dataset_size"],
            log_likelihoods=fit_data.get("log_likelihoods", []),  # absent in folders written before these keys
            kls=fit_data.get("kls", []),
            temperature=fit_data.get("temperature"),
            validation_nll={float(k): v for k, v in fit_data.get("validation_nll", {}).items()},
        )
    metrics_path = directory / METRICS_FILE
    if METRICS_FILE in manifest["files"]:
        run.metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return run
