"""Atomic file writes and checksums, shared by run folders and training checkpoints.

A file is written to a temporary name in the destination folder, flushed to disk, and then renamed over the
destination with :func:`os.replace`, which POSIX and Windows perform atomically within one file system. A
reader therefore sees either the complete old file or the complete new one, never a mixture, even when the
writer is killed half-way; at worst a stray ``.<name>.*.tmp`` file is left behind.

``tempfile`` creates its files with mode 0600 and its folders with 0700 whatever the umask; every file and folder
that ends up in a run folder or an export is given the ordinary permissions instead (0666 / 0777 less the
process's umask, what ``open`` and ``mkdir`` give), so that a shared run folder is as readable as any other file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "file_sha256", "json_safe", "umask_mode", "umask_tree", "write_json"]


def _current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: str | Path) -> Path:
    """Give a file 0666 and a folder 0777, less the umask: what it would have had from ``open`` / ``mkdir``."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_current_umask())
    return path


def umask_tree(folder: str | Path) -> Path:
    """:func:`umask_mode` on a folder and everything in it (libraries such as safetensors write 0600 files)."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        umask_mode(path)
    return umask_mode(folder)


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is synced and renamed onto ``path``.

    The caller writes the complete file to the yielded path (with any library's ``save(path)``). If the block
    raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask_mode(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None``: JSON has no NaN, and Python's ``NaN``
    token makes a file that strict readers (and most other languages) reject."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, valid JSON (non-finite numbers as ``null``), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
