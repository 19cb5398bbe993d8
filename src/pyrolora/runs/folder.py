"""Run-folder integrity: a manifest of checksums and of what the run was trained on, written last, checked first.

``manifest.json`` lists every file of the run folder with its size and SHA-256, and describes the model the
posterior belongs to: the base model's name and a fingerprint of its adapted weights (SHA-256 over the name,
shape, dtype and bytes of the weight and bias of every adapted layer, see
:func:`pyrolora.models.backbones.weights_fingerprint`), the adapter rank, alpha, target modules and sites, and the
guide's class. :func:`pyrolora.runs.build.save_run` writes it after every other file, so a folder whose saving
was interrupted has no manifest, or one whose checksums do not match; loading refuses both. Nothing in a run
folder is ever unpickled: JSON and safetensors only.

A folder can be loaded into a model built in code with :func:`load_into`, which refuses a model whose base
weights, rank, target modules or sites differ from the run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from pyrolora._atomic import file_sha256, write_json
from pyrolora._integrity import check_manifest_shape, model_fingerprint
from pyrolora._version import __version__
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.inference.checkpoint import CHECKPOINT_FILE
from pyrolora.inference.state import load_state
from pyrolora.models import BayesianLoraModel
from pyrolora.models.backbones import weights_fingerprint
from pyrolora.runs.config import RunConfig

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "CSV_NAME",
    "FIT_FILE",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "PEFT_LORA_FILE",
    "PLOT_FILE",
    "RESULT_FILE",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "UNCERTAINTY_FILE",
    "adapted_weight_names",
    "check_model",
    "load_into",
    "member_folder",
    "read_config",
    "verify_files",
    "write_json",
    "write_manifest",
]

# Every name inside a run folder, in one place (the modules that write them import them from here).
CONFIG_FILE = "config.json"  # the RunConfig and the package version
STATE_FILE = "state.safetensors"  # guide parameters, head, fitted prior (bayesian, mc_dropout, ensemble members)
FIT_FILE = "fit.json"  # loss history and timing
METRICS_FILE = "metrics.json"  # evaluation results
RESULT_FILE = "result.json"  # metrics, seconds and parameter counts of a runner or `pyrolora train` run
PEFT_LORA_FILE = "peft_lora.safetensors"  # LoRA matrices and head of a peft_lora run
PEFT_LORA_FORMAT = "pyrolora-peft-lora-1"
UNCERTAINTY_FILE = "uncertainty.json"  # `pyrolora evaluate --uncertainty`
PLOT_FILE = "accuracy_coverage.png"
CSV_NAME = "train_log.csv"  # [log] csv
TENSORBOARD_DIR = "tensorboard"  # [log] tensorboard
MANIFEST_FILE = "manifest.json"
FORMAT = "pyrolora-run-1"


def member_folder(directory: str | Path, index: int) -> Path:
    """The sub-folder of ensemble member ``index`` (0-based), itself a complete run folder."""
    return Path(directory) / f"member-{index}"


def adapted_weight_names(model: BayesianLoraModel) -> list[str]:
    """Backbone parameter names of the frozen weights (and biases) of every adapted layer."""
    return [
        f"{site}.base.{name}" for site, layer in model.adapters.items() for name, _ in layer.base.named_parameters()
    ]


def _adapters(model: BayesianLoraModel) -> dict[str, Any]:
    config = model.adapters.config.to_dict()
    return {
        "rank": config["rank"],
        "alpha": config["alpha"],
        "target_modules": config["target_modules"],
        "sites": {name: list(shape) for name, shape in model.adapters.shapes.items()},
    }


def write_manifest(
    directory: str | Path, files: list[str], model: BayesianLoraModel, guide: nn.Module, *, base_model: str
) -> None:
    """Write ``manifest.json`` for the listed files of ``directory`` (atomically; call it after the files)."""
    directory = Path(directory)
    manifest = {
        "format": FORMAT,
        "pyrolora_version": __version__,
        "base_model": {
            "name": base_model,
            "fingerprint": weights_fingerprint(model.backbone, adapted_weight_names(model)),
            "backbone_fingerprint": model_fingerprint(model),  # every frozen tensor (pyrolora._integrity)
        },
        "adapters": _adapters(model),
        "guide_class": type(guide).__name__,
        "files": {
            name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in files
        },
    }
    write_json(directory / MANIFEST_FILE, manifest)


def verify_files(directory: str | Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's presence, size and checksum; return the manifest.

    Raises:
        RunFolderError: no manifest (not a run folder, or saving was interrupted), or a file missing, truncated
            or corrupt; the message names the file and the fix.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise RunFolderError(f"{directory} is not a folder; give the run folder written by `pyrolora train`.")
    if not path.is_file():
        resumable = (directory / "checkpoint.safetensors").is_file()
        raise RunFolderError(
            f"{directory} has no {MANIFEST_FILE}: it is not a pyrolora run folder, or saving it was interrupted "
            "(the manifest is written last). "
            + (
                f"Its training checkpoint is there: continue it with pyrolora train --config "
                f"{directory / 'config.json'} --out {directory} --resume."
                if resumable
                else "Save the run again."
            )
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        fmt = manifest["format"]
        check_manifest_shape(manifest)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        raise RunFolderError(f"cannot read {path}: {err!r}; the manifest is damaged. Save the run again.") from err
    if fmt != FORMAT:
        raise RunFolderError(f"{path} has format {fmt!r}; this version of pyrolora reads {FORMAT!r}.")
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise RunFolderError(f"{file} is listed in the manifest but missing; copy the whole run folder.")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise RunFolderError(
                f"{file} is {'truncated' if size < entry['bytes'] else 'altered'}: {size} bytes, the manifest says "
                f"{entry['bytes']}. Copy the run folder again from its source."
            )
        if file_sha256(file) != entry["sha256"]:
            raise RunFolderError(
                f"{file} is corrupt: its SHA-256 does not match the manifest. Copy the run folder again from "
                "its source."
            )
    return manifest


def check_model(manifest: dict[str, Any], model: BayesianLoraModel, where: str | Path) -> None:
    """Refuse a model whose adapters or base weights differ from those the run in ``where`` was trained with.

    Raises:
        RunFolderError: naming the first mismatch (rank, target modules, sites, base weights) and the fix.
    """
    if not isinstance(manifest.get("adapters"), dict):
        raise RunFolderError(f"the manifest of {where} does not describe adapters; it is damaged. Save the run again.")
    saved, have = manifest["adapters"], _adapters(model)
    for key, what in (("rank", "adapter rank"), ("target_modules", "target modules"), ("alpha", "alpha")):
        if saved[key] != have[key]:
            raise RunFolderError(
                f"the run in {where} was trained with {what} {saved[key]!r}, but this model has {have[key]!r}; "
                f"build the model with adapters.{key} = {saved[key]!r} (as in the run's config.json)."
            )
    if saved["sites"] != have["sites"]:
        missing = sorted(set(saved["sites"]) - set(have["sites"]))[:3]
        extra = sorted(set(have["sites"]) - set(saved["sites"]))[:3]
        raise RunFolderError(
            f"the run in {where} has adapter sites that this model lacks ({missing}) or does not have ({extra}); "
            "load it into the same architecture it was trained on."
        )
    fingerprint = weights_fingerprint(model.backbone, adapted_weight_names(model))
    base = manifest["base_model"]
    if fingerprint != base["fingerprint"]:
        raise RunFolderError(
            f"the base model's adapted weights differ from those the run in {where} was trained on (fingerprint "
            f"{fingerprint[:12]}..., the run's {base['fingerprint'][:12]}..., base model {base['name']!r}); its "
            "posterior is meaningless on other weights. Load it with the base model it was trained on."
        )
    whole = base.get("backbone_fingerprint")  # absent in folders of older versions: adapted weights only
    if whole is not None and model_fingerprint(model) != whole:
        raise RunFolderError(
            f"the base model differs from the one the run in {where} was trained on (its frozen weights, e.g. "
            f"embeddings or unadapted layers, do not match the run's fingerprint; base model {base['name']!r}); its "
            "posterior and head are meaningless on other weights. Load it with the base model it was trained on."
        )


def load_into(directory: str | Path, model: BayesianLoraModel, guide: nn.Module) -> dict[str, Any]:
    """Load a run folder's posterior and head into a model and guide built in code, after checking they match.

    Returns:
        The manifest.
    """
    manifest = verify_files(directory)
    check_model(manifest, model, directory)
    load_state(Path(directory) / STATE_FILE, model, guide)
    return manifest


def read_config(directory: str | Path) -> RunConfig:
    """The :class:`~pyrolora.runs.config.RunConfig` of a run folder's ``config.json``.

    Raises:
        RunFolderError: no ``config.json`` (not a run folder, or training stopped before it was written), or
            one that cannot be read or is not a valid configuration.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(
            f"{directory} has no {CONFIG_FILE}: it is not a run folder of `pyrolora train` (which writes it when "
            "training starts), or its training stopped before it began. Train it again."
        )
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {path}: {err}") from err
    except ConfigError as err:
        raise RunFolderError(f"{path} is not a valid run configuration: {err}") from err
