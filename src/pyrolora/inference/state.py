"""Saving and loading a fitted posterior (guide parameters) and the point-estimate head, as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pyrolora._atomic import umask_mode
from pyrolora.errors import RunFolderError
from pyrolora.inference.families import setup
from pyrolora.models import BayesianLoraModel

__all__ = ["load_state", "save_state"]

_GUIDE = "guide."
_HEAD = "head."
_PRIOR = "prior."


def _sites(model: BayesianLoraModel) -> str:
    return json.dumps({name: list(shape) for name, shape in model.adapters.shapes.items()})


def save_state(path: str | Path, model: BayesianLoraModel, guide: nn.Module) -> None:
    """Write the guide's parameters and the head's state to one safetensors file (no pickle).

    The file's metadata records the adapter sites and their shapes and the guide's class, which
    :func:`load_state` checks.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in guide.state_dict().items():
        tensors[_GUIDE + key] = value.detach().to("cpu").contiguous().clone()
    for key, value in model.head_state().items():
        tensors[_HEAD + key] = value.detach().to("cpu").contiguous().clone()
    for key, value in model.prior_state().items():  # a fitted prior (empirical Bayes) travels with the run
        tensors[_PRIOR + key] = value.detach().to("cpu").contiguous().clone()
    metadata = {"sites": _sites(model), "guide_class": type(guide).__name__, "format": "pyrolora-state-1"}
    if getattr(guide, "posterior_temperature", None) is not None:  # chosen on validation data by fit
        metadata["posterior_temperature"] = repr(float(guide.posterior_temperature))
    save_file(tensors, str(path), metadata=metadata)
    umask_mode(path)  # safetensors creates its files 0600 whatever the umask


def load_state(path: str | Path, model: BayesianLoraModel, guide: nn.Module) -> None:
    """Load what :func:`save_state` wrote into a freshly built ``model`` and ``guide``.

    The guide's parameters are created first from a data-free trace of the model (:func:`guides.setup`).

    Raises:
        RunFolderError: if the file is missing or unreadable, or its sites, shapes, guide class or keys do not
            match the model and guide it is loaded into.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # OSError, or safetensors' own SafetensorError on a corrupt or truncated file
        raise RunFolderError(f"cannot read the saved state {path}: {err}") from err
    if metadata.get("sites") != _sites(model):
        raise RunFolderError(
            f"{path} was saved for adapter sites {metadata.get('sites', '?')[:200]}, but the model has "
            f"{_sites(model)[:200]}; rebuild the model with the run's adapter config."
        )
    if metadata.get("guide_class") != type(guide).__name__:
        raise RunFolderError(
            f"{path} holds a {metadata.get('guide_class')} posterior but the guide is a {type(guide).__name__}."
        )
    setup(guide, model)
    guide_state = {k[len(_GUIDE) :]: v for k, v in tensors.items() if k.startswith(_GUIDE)}
    head_state = {k[len(_HEAD) :]: v for k, v in tensors.items() if k.startswith(_HEAD)}
    prior_state = {k[len(_PRIOR) :]: v for k, v in tensors.items() if k.startswith(_PRIOR)}
    if set(prior_state) != set(model.prior_state()):
        raise RunFolderError(
            f"{path} holds fitted prior parameters {sorted(prior_state)} but the model's prior has "
            f"{sorted(model.prior_state())}; rebuild the model with the run's prior."
        )
    model.load_prior_state(prior_state)
    try:
        guide.load_state_dict(guide_state, strict=True)
    except RuntimeError as err:
        raise RunFolderError(f"the guide parameters in {path} do not fit this guide: {err}") from err
    expected = set(model.head_state())
    if set(head_state) != expected:
        raise RunFolderError(
            f"{path} holds head tensors {sorted(head_state)} but the model's head has {sorted(expected)}."
        )
    with torch.no_grad():
        for name in model.head_names:
            module = model.backbone.get_submodule(name)
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in head_state.items() if k.startswith(prefix)})
    if "posterior_temperature" in metadata:
        try:
            guide.posterior_temperature = float(metadata["posterior_temperature"])
        except ValueError as err:
            raise RunFolderError(f"{path} holds a bad posterior_temperature: {err}") from err
    guide.to(model.device)
