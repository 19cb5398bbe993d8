"""Run configuration: what to train, on what, and how. Read from TOML or JSON, validated on construction.

A configuration file has one table per section; every key is optional and unknown keys are errors::

    [model]
    name = "sentence-transformers/all-MiniLM-L6-v2"
    max_length = 32

    [task]
    name = "vader"

    [adapters]
    rank = 8
    target_modules = ["query", "value", "output.dense"]

    [prior]
    scale = 0.1

    [guide]
    name = "lowrank"
    options = { rank = 2 }

    [train]
    epochs = 10
    batch_size = 32
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyrolora import validation
from pyrolora.adapters import LoraXSConfig
from pyrolora.errors import ConfigError
from pyrolora.models.backbones import DEFAULT_MODEL
from pyrolora.runs.device import check_device_name

__all__ = [
    "GuideSpec",
    "LogSpec",
    "MethodSpec",
    "ModelSpec",
    "PredictSpec",
    "PriorSpec",
    "RunConfig",
    "TaskSpec",
    "TrainSpec",
    "load_config",
]


def _check_number(value: Any, where: str, *, positive: bool = False, minimum: float | None = None) -> None:
    """A finite number (already type-checked by :func:`_coerce`), positive or at least ``minimum`` if asked."""
    if positive:
        validation.positive(value, where)
    elif minimum is not None:
        validation.at_least(value, where, minimum)
    else:
        validation.finite(value, where)


@dataclass(frozen=True)
class ModelSpec:
    """The pretrained backbone: a hub id or folder (default all-MiniLM-L6-v2), and the token limit."""

    name: str = DEFAULT_MODEL
    max_length: int = 64
    #: a GGUF weights file inside the ``name`` folder (causal LMs, e.g. ``name = "smollm2"``)
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty; give a hub id or a local folder.")
        _check_number(self.max_length, "model.max_length", positive=True)


@dataclass(frozen=True)
class TaskSpec:
    """The task. ``vader`` is the embedded default (see :mod:`pyrolora.data.vader`).

    GLUE (``sst2``, ``rte``, ``cola``) and multiple-choice QA (``arc_easy``, ``arc_challenge``, ``openbookqa``)
    read from ``data_dir`` (default ``$PYROLORA_DATA``) or, with ``source = "hub"``, from the Hugging Face hub;
    ``tsv`` is any labelled table at ``path``: one ``.tsv``, ``.csv``, ``.json`` or ``.jsonl`` file, or a folder
    holding ``train_file`` and ``eval_file``; ``text_columns`` (default: the ``text`` or ``sentence`` column),
    ``label_column`` and ``labels`` (default: the label column's distinct values, sorted) describe it, and without
    an evaluation file a seeded ``test_fraction`` of it is the test split. ``mcqa`` is any AI2-schema task at
    ``path``. See :func:`pyrolora.data.load_splits`.
    """

    name: Literal["vader", "sst2", "rte", "cola", "arc_easy", "arc_challenge", "openbookqa", "tsv", "mcqa"] = "vader"
    neutral_margin: float = 0.0
    source: Literal["local", "hub"] = "local"
    data_dir: str | None = None
    path: str | None = None
    hub_config: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train: int | None = None
    max_eval: int | None = None
    split_seed: int = 0
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    train_file: str = "train.tsv"
    eval_file: str = "dev.tsv"
    scoring: Literal["loglik", "letters"] = "loglik"

    def __post_init__(self) -> None:
        _check_number(self.neutral_margin, "task.neutral_margin", minimum=0.0)
        validation.in_range(self.validation_fraction, "task.validation_fraction", 0, 1, low_open=True, high_open=True)
        for name in ("max_train", "max_eval"):
            if getattr(self, name) is not None:
                _check_number(getattr(self, name), f"task.{name}", positive=True)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"task.test_fraction must lie in (0, 1), got {self.test_fraction!r}.")
        if self.name == "tsv" and not self.path:
            raise ConfigError(
                "task.name = 'tsv' needs task.path: one .tsv, .csv, .json or .jsonl file, or a folder holding "
                "train_file (and eval_file), e.g. task = { name = 'tsv', path = 'reviews.csv' }."
            )
        if self.name == "mcqa" and not self.path:
            raise ConfigError("task.name = 'mcqa' needs task.path: a folder with train.jsonl and dev.jsonl.")

    @property
    def multiple_choice(self) -> bool:
        """Whether the task is multiple-choice QA (a causal LM scores the options)."""
        return self.name in ("arc_easy", "arc_challenge", "openbookqa", "mcqa")


@dataclass(frozen=True)
class PriorSpec:
    """The prior on every entry of every R (see :mod:`pyrolora.models.priors`).

    - ``isotropic``: ``N(0, scale²)``.
    - ``empirical_bayes``: ``N(0, σ²)`` with σ fitted by maximising the ELBO, starting at ``scale``.
    - ``hierarchical``: ``N(0, σ²)`` with ``σ ~ LogNormal(log scale, hyper_scale)`` inferred with the adapters.
    - ``student_t``: Student-t with ``df`` degrees of freedom and scale ``scale`` (heavy tails).
    - ``laplace``: Laplace with scale ``scale``.
    """

    name: Literal["isotropic", "empirical_bayes", "hierarchical", "student_t", "laplace"] = "isotropic"
    scale: float = 0.1
    df: float = 3.0
    hyper_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_number(self.scale, "prior.scale", positive=True)
        _check_number(self.df, "prior.df", positive=True)
        _check_number(self.hyper_scale, "prior.hyper_scale", positive=True)
        if self.name not in ("isotropic", "empirical_bayes", "hierarchical", "student_t", "laplace"):
            raise ConfigError(
                f"prior.name {self.name!r} is unknown; choose isotropic, empirical_bayes, hierarchical, student_t "
                "or laplace."
            )

    def build(self) -> Any:
        """The prior object this section describes."""
        from pyrolora.models import priors

        if self.name == "empirical_bayes":
            return priors.EmpiricalBayes(self.scale)
        if self.name == "hierarchical":
            return priors.Hierarchical(self.scale, self.hyper_scale)
        if self.name == "student_t":
            return priors.StudentT(self.df, self.scale)
        if self.name == "laplace":
            return priors.Laplace(self.scale)
        return priors.IsotropicNormal(self.scale)


@dataclass(frozen=True)
class GuideSpec:
    """A registered guide name (``pyrolora.guides.available()``) and its options."""

    name: str = "lowrank"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pyrolora.inference import guides

        if self.name not in guides.available():
            raise ConfigError(f"guide.name {self.name!r} is unknown; choose one of {list(guides.available())}.")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings, passed to :func:`pyrolora.fit`."""

    epochs: float = 10.0
    batch_size: int = 32
    lr: float = 1e-2
    head_lr: float = 1e-3
    warmup: float = 0.06
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    clip_norm: float | None = None  # no clipping: clipping every step biased the fitted covariance (see fit)
    num_particles: int = 1
    seed: int = 0
    kl_weight: float = 0.1  # pyrolora.inference.svi.DEFAULT_KL_WEIGHT (tested equal); 1 is the ELBO
    kl_warmup: float = 0.0
    #: candidate posterior temperatures, chosen on the validation split after training (see pyrolora.fit)
    temperatures: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    #: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``--device`` overrides it
    device: str = "auto"
    #: ``"bf16"`` runs the backbone under bfloat16 autocast in training and prediction; guide, prior and
    #: likelihood stay in float32 (see :mod:`pyrolora.inference.precision`)
    precision: Literal["float32", "bf16"] = "float32"

    def kl_schedule(self) -> Any:
        """``kl_weight`` for :func:`pyrolora.fit`: the number, or a linear rise to it over ``kl_warmup``."""
        if self.kl_warmup > 0:
            from pyrolora.inference.svi import kl_annealing

            return kl_annealing(self.kl_warmup, self.kl_weight)
        return self.kl_weight

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "head_lr", "num_particles"):
            _check_number(getattr(self, name), f"train.{name}", positive=True)
        if self.clip_norm is not None:
            _check_number(self.clip_norm, "train.clip_norm", positive=True)
        _check_number(self.warmup, "train.warmup", minimum=0.0)
        _check_number(self.kl_weight, "train.kl_weight", positive=True)
        _check_number(self.kl_warmup, "train.kl_warmup", minimum=0.0)
        if isinstance(self.temperatures, list):  # from TOML or JSON
            object.__setattr__(self, "temperatures", tuple(self.temperatures))
        if not isinstance(self.temperatures, tuple) or not self.temperatures:
            raise ConfigError(
                f"train.temperatures must be a non-empty list of numbers >= 0, got {self.temperatures!r}."
            )
        for value in self.temperatures:
            _check_number(value, "train.temperatures", minimum=0.0)
        check_device_name(self.device, "train.device")
        if self.precision not in ("float32", "bf16"):
            raise ConfigError(f"train.precision must be 'float32' or 'bf16', got {self.precision!r}.")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {self.seed!r}.")


@dataclass(frozen=True)
class PredictSpec:
    """Prediction and evaluation: S posterior samples, batch size, ECE bins."""

    num_samples: int = 15
    batch_size: int = 128
    n_bins: int = 15

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "n_bins"):
            _check_number(getattr(self, name), f"predict.{name}", positive=True)


@dataclass(frozen=True)
class LogSpec:
    """Training logs in the run folder (see :mod:`pyrolora.runs.tracking`); both sinks are off by default.

    ``csv`` writes ``train_log.csv``; ``tensorboard`` writes events under ``tensorboard/`` (view them with
    ``tensorboard --logdir RUN_DIR``). ``every``: log every n-th step. ``validation_every``: steps between
    validation metrics (0: only after the last step), each with ``validation_samples`` posterior draws.
    ``kl_particles``: draws per KL estimate (0: no KL column).
    """

    csv: bool = False
    tensorboard: bool = False
    every: int = 1
    validation_every: int = 0
    validation_samples: int = 4
    kl_particles: int = 1

    def __post_init__(self) -> None:
        _check_number(self.every, "log.every", positive=True)
        _check_number(self.validation_samples, "log.validation_samples", positive=True)
        _check_number(self.validation_every, "log.validation_every", minimum=0)
        _check_number(self.kl_particles, "log.kl_particles", minimum=0)


@dataclass(frozen=True)
class MethodSpec:
    """How the posterior (or its stand-in) is obtained; every method shares task, model, data and metrics.

    - ``bayesian``: the guide of ``[guide]`` fit by SVI (``delta`` = LoRA-XS MAP, ``lowrank`` = B-LoRA-XS, any
      registered guide).
    - ``mc_dropout``: the ``[guide]`` (normally ``delta``) fit as above, then predicted with the backbone's
      dropout active, one dropout mask per sample.
    - ``ensemble``: ``ensemble_size`` independent ``[guide]`` fits with seeds ``train.seed + i``, probabilities
      averaged.
    - ``peft_lora``: standard LoRA through peft (rank ``lora_rank`` on ``lora_targets``) trained by maximum
      likelihood with ``lora_lr``; no prior.
    """

    #: a method of :data:`pyrolora.runs.methods.METHODS` (checked when it is looked up, before any training)
    name: str = "bayesian"
    ensemble_size: int = 5
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_dropout: float = 0.0
    lora_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(
                f"method.name must be a method name such as 'bayesian' or 'peft_lora', got {self.name!r}."
            )
        for name in ("ensemble_size", "lora_rank", "lora_alpha", "lora_lr"):
            _check_number(getattr(self, name), f"method.{name}", positive=True)
        validation.in_range(self.lora_dropout, "method.lora_dropout", 0, 1, high_open=True)
        if not self.lora_targets:
            raise ConfigError("method.lora_targets is empty; name the modules peft LoRA adapts, e.g. ['query'].")


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "task": TaskSpec,
    "adapters": LoraXSConfig,
    "prior": PriorSpec,
    "guide": GuideSpec,
    "train": TrainSpec,
    "predict": PredictSpec,
    "log": LogSpec,
    "method": MethodSpec,
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type annotation, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where} has an invalid value {value!r}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}.")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where} must be a finite number, got an integer of {len(str(value))} digits.") from None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")  # a bug in this module, not user input


def _section(cls: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields - ({"svd_convention"} if cls is LoraXSConfig else set()))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}]; known keys are {sorted(fields)}.")
    values = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in data.items() if k in fields}
    if cls is LoraXSConfig:
        values.setdefault("rank", 8)
        if "svd_convention" in data:
            values["svd_convention"] = data["svd_convention"]
        return LoraXSConfig.from_dict(values)
    return cls(**values)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. Frozen; build variants with :meth:`replace`."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    adapters: LoraXSConfig = field(default_factory=lambda: LoraXSConfig(rank=8))
    prior: PriorSpec = field(default_factory=PriorSpec)
    guide: GuideSpec = field(default_factory=GuideSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    predict: PredictSpec = field(default_factory=PredictSpec)
    log: LogSpec = field(default_factory=LogSpec)
    method: MethodSpec = field(default_factory=MethodSpec)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate from nested dictionaries; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run configuration must be a table of sections, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(_SECTIONS) - {"pyrolora_version"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; known sections are {sorted(_SECTIONS)}.")
        return cls(**{k: _section(_SECTIONS[k], v, k) for k, v in data.items() if k in _SECTIONS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dictionaries (tuples as lists)."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            if isinstance(section, LoraXSConfig):
                out[name] = section.to_dict()
            else:
                out[name] = json.loads(json.dumps(dataclasses.asdict(section)))
        return out

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some keys changed: ``config.replace(guide={"name": "delta"}, train={"epochs": 2})``."""
        data = self.to_dict()
        for name, changes in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section {name!r}; known sections are {sorted(_SECTIONS)}.")
            if name == "guide" and "name" in changes and "options" not in changes:
                changes = {**changes, "options": {}}
            data[name] = {**data[name], **changes}
        return RunConfig.from_dict(data)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}; give a UTF-8 .toml or .json file.") from err
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from err
    except RecursionError:
        raise ConfigError(
            f"{path} is nested too deeply to be a run configuration; give sections of settings."
        ) from None
    if data == {}:  # an empty file is more likely a mistake than a wish for every default
        warnings.warn(
            f"{path} sets nothing: every setting takes its default (see the sections in pyrolora/runs/config.py).",
            UserWarning,
            stacklevel=2,
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run configuration must be a table of sections, got {type(data).__name__}.")
    return data


def overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, section by section: a key of ``over`` replaces the same key of ``base``.

    A ``[guide]`` table that names another guide without ``options`` starts from no options (the base's options
    belong to the base's guide). Keys outside sections (``pyrolora_version``) are taken from ``over``.
    """
    merged = {name: dict(section) if isinstance(section, dict) else section for name, section in base.items()}
    for name, section in over.items():
        if isinstance(section, dict) and isinstance(merged.get(name), dict):
            if name == "guide" and "name" in section and "options" not in section:
                merged[name] = {k: v for k, v in merged[name].items() if k != "options"}
            merged[name] = {**merged[name], **section}
        else:
            merged[name] = section
    return merged


def _expand(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The sections of ``path`` laid over those of its ``base`` file(s), recursively."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"config files name each other as base in a circle ({chain}); remove one `base` key.")
    data = _read(path)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"`base` in {path} must be a file name or a list of them, got {bases!r}.")
    merged: dict[str, Any] = {}
    for name in bases:
        base = path.parent / name
        if not base.is_file():
            raise ConfigError(f"{path} names base {name!r}, but {base} does not exist; give a path relative to {path}.")
        merged = overlay(merged, _expand(base, (*seen, resolved)))
    return overlay(merged, data)


def load_config(*paths: str | Path) -> RunConfig:
    """Read a run configuration from one or more ``.toml`` / ``.json`` files, each laid over the ones before.

    A file may name the files it builds on with a top-level key ``base = "sst2.toml"`` (or a list, paths relative
    to the file); they are read first, recursively. So ``configs/sst2.toml`` can hold a task's settings and
    ``configs/sst2-blora-xs.toml`` only ``base = ["sst2.toml", "methods/blora-xs.toml"]``; equally
    ``load_config("configs/sst2.toml", "configs/methods/blora-xs.toml")`` (``pyrolora train --config A --config B``).
    Later files win key by key (see :func:`overlay`); the merged result is validated as one configuration.
    """
    if not paths:
        raise ConfigError("give at least one configuration file.")
    merged: dict[str, Any] = {}
    for path in paths:
        merged = overlay(merged, _expand(Path(path), ()))
    return RunConfig.from_dict(merged)
