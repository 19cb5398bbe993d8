"""Export and merge of a saved run folder: :mod:`pyrolora.inference.interop` applied to what the folder holds."""

from __future__ import annotations

from pathlib import Path

from pyrolora.errors import ConfigError
from pyrolora.inference.interop import Point, Which, check_which, export_peft, merge_to_pretrained
from pyrolora.runs.build import load_run

__all__ = ["export_run", "merge_run"]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    which: Which = "median",
    num_samples: int = 15,
    seed: int = 0,
    device: str | None = None,
) -> list[Path]:
    """Load a saved run folder (on ``device``; default the CPU) and :func:`export_peft` it as sequence-classification
    adapters."""
    check_which(which)
    run = load_run(run_dir, device=device)
    return export_peft(
        run.model,
        run.guide,
        out,
        which=which,
        num_samples=num_samples,
        seed=seed,
        base_model_name_or_path=run.config.model.name,
        task_type="SEQ_CLS",
    )


def merge_run(run_dir: str | Path, out: str | Path, *, which: Point = "median", device: str | None = None) -> Path:
    """Load a saved run folder and :func:`merge_to_pretrained` it (model and tokenizer)."""
    if which not in ("mean", "median"):
        raise ConfigError(f"which must be 'mean' or 'median' for merging, got {which!r}.")
    run = load_run(run_dir, device=device)
    names = next((tuple(s.label_names) for s in run.splits.values() if hasattr(s, "label_names")), None)
    return merge_to_pretrained(run.model, run.guide, out, which=which, tokenizer=run.tokenizer, label_names=names)
