"""The one manifest of every method's run folder: files with size and SHA-256, the base model, the method.

A ``bayesian`` or ``mc_dropout`` folder gets its manifest from :func:`pyrolora.runs.folder.write_manifest` (which
adds adapters and guide); :func:`write_method_manifest` writes the same format for the folders of the other
methods: ``peft_lora`` (its state file and config, and the fingerprint of the frozen backbone under its LoRA
layers) and ``ensemble`` (its config and each member's own manifest, so one check covers the whole tree).
:func:`pyrolora.runs.folder.verify_files` checks either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyrolora._atomic import file_sha256, write_json
from pyrolora._version import __version__

__all__ = ["write_method_manifest"]

MANIFEST_FILE = "manifest.json"
FORMAT = "pyrolora-run-1"  # the format of pyrolora.runs.folder.FORMAT


def write_method_manifest(
    directory: str | Path,
    files: list[str],
    *,
    method: str,
    base_model: str,
    backbone_fingerprint: str | None = None,
) -> None:
    """Write ``manifest.json`` for the listed files (paths relative to ``directory``), atomically, last."""
    directory = Path(directory)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "pyrolora_version": __version__,
        "method": method,
        "base_model": {"name": base_model, "backbone_fingerprint": backbone_fingerprint},
        "files": {
            name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in files
        },
    }
    write_json(directory / MANIFEST_FILE, manifest)
