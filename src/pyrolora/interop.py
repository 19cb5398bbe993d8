"""Backward-compatible path of :mod:`pyrolora.inference.interop` (peft export, merge and import of a model and
guide) and :mod:`pyrolora.runs.export` (the same for a saved run folder); the README's examples import it."""

from pyrolora.inference.interop import (
    MANIFEST_NAME,
    ImportReport,
    export_peft,
    import_peft,
    initialize_guide,
    merge_to_pretrained,
    point_latents,
)
from pyrolora.runs.export import export_run, merge_run

__all__ = [
    "MANIFEST_NAME",
    "ImportReport",
    "export_peft",
    "export_run",
    "import_peft",
    "initialize_guide",
    "merge_run",
    "merge_to_pretrained",
    "point_latents",
]
