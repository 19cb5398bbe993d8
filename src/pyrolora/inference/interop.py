"""Posteriors out to the tools people deploy with, and existing adapters in.

- :func:`export_peft`: a point of the posterior (mean or median; the median of the ``delta`` guide is the MAP)
  as one standard peft LoRA adapter, or S posterior draws as S named adapters (an ensemble a multi-adapter
  server can average).
- :func:`merge_to_pretrained`: a plain transformers checkpoint with the update of one point folded in.
- :func:`import_peft`: start a guide (and the head) from an existing peft adapter, projected onto the LoRA-XS
  subspace by least squares; :class:`ImportReport` says how exact that was.

The same from a saved run folder: :mod:`pyrolora.runs.export` (used by the command line).

Everything works for any guide honouring the guide contract (``median()``; draws through
:func:`~pyrolora.inference.predict.draw_latents`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyro
import torch
from pyro.infer import autoguide
from torch import nn
from torch.distributions import biject_to, constraints

from pyrolora._atomic import umask_mode, umask_tree
from pyrolora._outfolder import clear_previous_export
from pyrolora._version import __version__
from pyrolora.adapters.peft_format import adapter_deltas, merged_copy, project_update, save_peft_adapter
from pyrolora.errors import ConfigError
from pyrolora.inference.families import setup
from pyrolora.inference.predict import draw_latents, temper, temperature_of
from pyrolora.models import BayesianLoraModel

__all__ = [
    "MANIFEST_NAME",
    "ImportReport",
    "export_peft",
    "import_peft",
    "initialize_guide",
    "merge_to_pretrained",
    "point_latents",
]

Which = Literal["mean", "median", "sample"]
Point = Literal["mean", "median"]

#: Written next to the exported adapters: what was exported, from which posterior point or draws.
MANIFEST_NAME = "pyrolora_export.json"

#: Guides whose posterior is a Gaussian (or a point mass) in unconstrained space: their mean is their median.
_SYMMETRIC = (
    autoguide.AutoDelta,
    autoguide.AutoNormal,
    autoguide.AutoDiagonalNormal,
    autoguide.AutoMultivariateNormal,
    autoguide.AutoLowRankMultivariateNormal,
)


def _real_support(model: BayesianLoraModel) -> bool:
    """Whether every adapter latent is unconstrained (its prior's support is the real matrices)."""
    for name, shape in model.adapters.shapes.items():
        support = model.prior(name, shape).support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is not constraints.real:
            return False
    return True


@torch.no_grad()
def point_latents(
    model: BayesianLoraModel,
    guide: nn.Module,
    which: Point = "median",
    *,
    num_samples: int = 1000,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One value of every adapter core R (shape (r, r)): the posterior median or mean.

    ``median`` is ``guide.median()`` (the MAP for the ``delta`` guide). ``mean`` is exact for Gaussian and
    point-mass guides over real-valued latents (where it equals the median); for other guides it is the
    average of ``num_samples`` draws (Monte Carlo error of order ``posterior scale / sqrt(num_samples)``),
    unless the guide offers ``mean()`` itself.

    Raises:
        ConfigError: for an unknown ``which``.
    """
    if which not in ("mean", "median"):
        raise ConfigError(f"which must be 'mean' or 'median' for one point, got {which!r}.")
    setup(guide, model)
    sites = model.adapters.shapes
    with pyro.settings.context(module_local_params=True):
        if which == "median" or (isinstance(guide, _SYMMETRIC) and _real_support(model)):
            values = guide.median()
        elif callable(getattr(guide, "mean", None)):
            values = guide.mean()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                draws = draw_latents(guide, model, num_samples)
            values = {name: draws[name].mean(0) for name in sites}
    return {name: values[name].detach().reshape(shape) for name, shape in sites.items()}


def _draws(model: BayesianLoraModel, guide: nn.Module, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer for which='sample', got {num_samples!r}.")
    device = model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        draws = draw_latents(guide, model, num_samples)
        # the posterior temperature chosen on validation data, as predict applies it: the exported draws are the
        # models whose average predict returns
        return temper(draws, guide, temperature_of(guide))


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def draw_name(index: int, num_samples: int) -> str:
    """The adapter name of posterior draw ``index`` out of ``num_samples`` (``draw_00`` .. ``draw_14``)."""
    return f"draw_{index:0{max(2, len(str(num_samples - 1)))}d}"


def export_peft(
    model: BayesianLoraModel,
    guide: nn.Module,
    out: str | Path,
    *,
    which: Which = "median",
    num_samples: int = 15,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> list[Path]:
    """Write the posterior as standard peft LoRA adapters (see :mod:`pyrolora.adapters.peft_format`).

    Every adapter has rank r, ``lora_alpha = r``, ``lora_A = A`` and ``lora_B = (alpha / r) · B R``, and carries
    the point-estimate task head in ``modules_to_save``; ``PeftModel.from_pretrained(base, folder)`` computes
    the same outputs as pyrolora with R at that point.

    Args:
        model: the Bayesian model (its head as trained).
        guide: a fitted guide.
        out: for ``mean``/``median``, the adapter folder; for ``sample``, a folder that receives one adapter
            folder per draw (``draw_00``, ``draw_01``, ...). A manifest ``pyrolora_export.json`` is written
            into ``out`` either way.
        which: ``mean`` or ``median`` of the posterior (one adapter), or ``sample``: S draws θ_s ~ q.
        num_samples: S, for ``sample`` (the paper averages 15).
        seed: seed of the draws (global RNG restored afterwards).
        base_model_name_or_path: recorded in each adapter config.
        task_type: peft task type of each adapter, e.g. ``"SEQ_CLS"``.

    Returns:
        The adapter folders written, one for a point, S for draws.
    """
    out = Path(out)
    clear_previous_export(out, MANIFEST_NAME)  # no stale draw_* folders of an earlier export into the same folder
    head = model.head_state()
    common = {
        "head_state": head,
        "modules_to_save": list(model.head_names),
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
    }
    manifest: dict[str, Any] = {
        "format": "pyrolora-peft-export-1",
        "pyrolora_version": __version__,
        "which": which,
        "guide_class": type(guide).__name__,
        "rank": model.adapters.config.rank,
        "alpha": model.adapters.config.alpha,
        "lora_alpha": model.adapters.config.rank,
        "sites": list(model.adapters),
        "modules_to_save": list(model.head_names),
    }
    if which == "sample":
        draws = _draws(model, guide, num_samples, seed)
        folders = []
        for s in range(num_samples):
            values = {name: draws[name][s] for name in model.adapters}
            folders.append(save_peft_adapter(out / draw_name(s, num_samples), model.adapters, values, **common))
        manifest.update(
            num_samples=num_samples,
            seed=seed,
            adapters=[f.name for f in folders],
            combine="Bayesian model average: the mean over adapters of softmax(logits) (the class probabilities)",
        )
    elif which in ("mean", "median"):
        values = point_latents(model, guide, which, seed=seed)
        folders = [save_peft_adapter(out, model.adapters, values, **common)]
        manifest.update(adapters=["."])
    else:
        raise ConfigError(f"which must be 'mean', 'median' or 'sample', got {which!r}.")
    _write_json(out / MANIFEST_NAME, manifest)
    return folders


def merge_to_pretrained(
    model: BayesianLoraModel,
    guide: nn.Module,
    out: str | Path,
    *,
    which: Point = "median",
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Save a plain copy of the backbone with the update at the posterior ``which`` folded into its weights.

    ``W = W0 + (alpha / r) · B R A`` at every site; the result is written with ``save_pretrained`` (and the
    tokenizer's, if given) into a temporary folder that is then moved to ``out``, so it reloads with
    ``AutoModelForSequenceClassification.from_pretrained(out)`` and needs neither pyrolora nor peft. With
    ``label_names`` the saved config's ``id2label`` / ``label2id`` name the classes.

    Raises:
        ConfigError: when the backbone has no ``save_pretrained`` (not a transformers model), or ``out``
            exists and is not empty.
    """
    out = Path(out)
    if not hasattr(model.backbone, "save_pretrained"):
        raise ConfigError(
            f"the backbone {type(model.backbone).__name__} has no save_pretrained; merging writes transformers "
            "checkpoints. Use pyrolora.adapters.peft_format.merged_copy for a plain module."
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for the merged model.")
    values = point_latents(model, guide, which)
    merged = merged_copy(model.backbone, model.adapters, values)
    out.parent.mkdir(parents=True, exist_ok=True)
    if label_names:  # the task's class names, so that pipelines and Hub widgets show them, not LABEL_0
        merged.config.id2label = dict(enumerate(label_names))
        merged.config.label2id = {name: i for i, name in enumerate(label_names)}
    staging = umask_mode(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        umask_tree(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass
class ImportReport:
    """What :func:`import_peft` took from an adapter, and how exactly.

    Attributes:
        values: the projected R (r, r) of every pyrolora site.
        residuals: per site, ``||ΔW - (alpha / r) B R A||_F / ||ΔW||_F``: 0 when the adapter's update lies in
            the site's top-r singular subspaces, up to 1 when it is orthogonal to them.
        missing: pyrolora sites the adapter does not touch; their R is 0 (exact: the adapter leaves them as is).
        dropped: modules the adapter updates but pyrolora does not adapt, with ``||ΔW||_F``; those updates
            are lost.
        head_loaded: whether the adapter's ``modules_to_save`` replaced the model's head.
    """

    values: dict[str, torch.Tensor]
    residuals: dict[str, float]
    missing: tuple[str, ...] = ()
    dropped: dict[str, float] = field(default_factory=dict)
    head_loaded: bool = False

    @property
    def max_residual(self) -> float:
        """The largest relative residual over the projected sites (0 if none)."""
        return max(self.residuals.values(), default=0.0)

    def exact(self, tol: float = 1e-4) -> bool:
        """Whether the imported LoRA-XS model reproduces the adapter: nothing dropped, every residual ≤ tol."""
        return not self.dropped and self.max_residual <= tol


def initialize_guide(guide: nn.Module, model: BayesianLoraModel, values: Mapping[str, torch.Tensor]) -> None:
    """Move the guide's location to ``values`` (one R per site), keeping its scales.

    Supported: Pyro's ``AutoContinuous`` guides with a ``loc`` (``lowrank``, ``diagonal``, ``full``), point
    masses (``AutoDelta``, ``delta``), per-site ``AutoNormal``, and any guide with a ``set_latents(values)``
    method.

    Raises:
        ConfigError: for any other guide; the message names its class.
    """
    model.adapters._check(values)
    setup(guide, model)
    with pyro.settings.context(module_local_params=True), torch.no_grad():
        if hasattr(guide, "set_latents"):
            guide.set_latents(values)
        elif isinstance(guide, autoguide.AutoContinuous) and isinstance(getattr(guide, "loc", None), torch.Tensor):
            parts = []
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                value = values[name].to(guide.loc)
                parts.append(biject_to(site["fn"].support).inv(value).reshape(-1))
            guide.loc.copy_(torch.cat(parts))
        elif isinstance(guide, autoguide.AutoDelta | autoguide.AutoNormal):
            # Pyro 1.9 keeps site `a.b` as the unconstrained parameter `b_unconstrained` of the submodule `a`,
            # reached from the guide (AutoDelta) or from its `locs` (AutoNormal) by attribute access. (A site
            # path starting with `model.` lands on the guide's model, not on the guide.)
            root = guide if isinstance(guide, autoguide.AutoDelta) else guide.locs
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                owner_path, _, leaf = name.rpartition(".")
                owner = root
                for part in owner_path.split(".") if owner_path else ():
                    owner = getattr(owner, part)
                param = owner._parameters.get(f"{leaf}_unconstrained")
                if param is None:
                    raise ConfigError(f"cannot find the location of site {name!r} in {type(guide).__name__}.")
                param.copy_(biject_to(site["fn"].support).inv(values[name].to(param)).reshape(param.shape))
        else:
            raise ConfigError(
                f"cannot set the location of a {type(guide).__name__}; supported are Pyro's AutoContinuous guides, "
                "AutoDelta, AutoNormal and guides with a set_latents(values) method."
            )


def import_peft(
    model: BayesianLoraModel, guide: nn.Module, path: str | Path, *, load_head: bool = True
) -> ImportReport:
    """Start ``guide`` (and the head) from an existing peft adapter folder.

    The adapter is loaded with peft onto a plain copy of the backbone; each adapted module's dense update ΔW
    is projected onto its LoRA-XS subspace by least squares (:func:`~pyrolora.adapters.peft_format.project_update`),
    and the guide's location is set to the projected R (its scales are kept).

    When this is exact (every residual 0 up to rounding):

    - a LoRA adapter exported by pyrolora (:func:`export_peft`) for the same base weights and rank, or any
      adapter built from the same truncated SVD (official LoRA-XS checkpoints saved as LoRA);
    - a peft TinyLoRA adapter of rank ``r_t <= r`` on the same base weights: its update is
      ``U S^½ R_t S^½ Vᵀ`` within the top-``r_t`` ⊆ top-``r`` singular subspaces (exact provided
      ``s_r > s_{r+1}``, so that the top-r subspace is unique and both SVDs find the same one).

    When it is not: a general LoRA adapter, whose factors span arbitrary subspaces (the projection keeps the
    part of ΔW inside span(U_r) x span(V_r); ``residuals`` measures what is lost); TinyLoRA or LoRA-XS of a
    larger rank than pyrolora's; adapters on modules pyrolora does not adapt (``dropped``); adapters whose
    update is not a dense weight delta (e.g. DoRA's magnitude, IA³ scaling vectors, embeddings).

    Args:
        model: the Bayesian model whose backbone carries the same base weights the adapter was trained on.
        guide: the guide to initialise (see :func:`initialize_guide` for the supported kinds).
        path: the peft adapter folder.
        load_head: copy the adapter's ``modules_to_save`` into the model's head when their keys match.

    Returns:
        An :class:`ImportReport`.

    Raises:
        RunFolderError: when the folder is not a peft adapter for this backbone.
        ConfigError: when the adapter's saved head does not match the model's head.
    """
    deltas, head = adapter_deltas(model.backbone, path)
    values: dict[str, torch.Tensor] = {}
    residuals: dict[str, float] = {}
    missing = []
    for name, layer in model.adapters.items():
        if name in deltas:
            values[name], residuals[name] = project_update(layer, deltas[name])
        else:
            values[name] = torch.zeros(layer.shape, dtype=layer.A.dtype, device=layer.A.device)
            missing.append(name)
    dropped = {n: float(torch.linalg.matrix_norm(d.double())) for n, d in deltas.items() if n not in model.adapters}
    loaded = False
    if load_head and head:
        expected = model.head_state()
        if set(head) != set(expected):
            raise ConfigError(
                f"the adapter's modules_to_save hold {sorted(head)}, the model's head has {sorted(expected)}; "
                "pass load_head=False to keep the model's head."
            )
        with torch.no_grad():
            for key, value in head.items():
                expected[key].copy_(value.to(expected[key]))
        loaded = True
    initialize_guide(guide, model, values)
    return ImportReport(values, residuals, tuple(missing), dropped, loaded)


def check_which(which: str) -> None:
    if which not in ("mean", "median", "sample"):
        raise ConfigError(f"which must be 'mean', 'median' or 'sample', got {which!r}.")
