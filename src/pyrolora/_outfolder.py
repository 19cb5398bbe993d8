"""The output folder of a training: look before writing, lock while writing, replace an old run only when done.

Rules, applied by :func:`training_folder` before a single byte is written:

- a missing or empty folder is trained into directly;
- a folder holding an unfinished run (a training checkpoint) is continued with ``resume``, and anything else
  there is refused;
- a folder holding a finished run, or any other file, is refused unless ``overwrite`` is given. With
  ``overwrite`` the new run is written *beside* it, into ``.<name>.partial`` in the same parent folder, and
  swapped into place only once it is complete (rename the old folder to ``.<name>.old``, rename the new one to
  ``<name>``, delete the old). A failed, invalid or killed re-train therefore leaves the old run as it was; a
  killed one can be continued with ``resume`` (its checkpoint lies in ``.<name>.partial``).

While it trains, the process holds an exclusive, non-blocking ``flock`` on the output folder itself (POSIX
advisory locks; the kernel drops them when the process dies, so a killed training leaves no stale lock). A second
training into the same folder is refused at once instead of silently mixing two runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pyrolora.errors import RunFolderError

__all__ = ["folder_lock", "training_folder"]

CHECKPOINT_FILE = "checkpoint.safetensors"  # the name of pyrolora.inference.checkpoint.CHECKPOINT_FILE
MANIFEST_FILE = "manifest.json"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the existing ``folder`` for the duration of the block.

    Raises:
        RunFolderError: another process holds the lock (another training writes there).
    """
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): nothing to hold; the overwrite rules still apply
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"another process is training into {folder} (it holds the folder's lock); wait until it ends, or "
                "choose another --out."
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _beside(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}.{suffix}"


def _decide(out: Path, partial: Path, *, overwrite: bool, resume: bool) -> Path:
    """Where to train, from what ``out`` and ``.<name>.partial`` hold now; refuse what the rules refuse."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder for the run.")
    held = _contents(out)
    if resume:
        if CHECKPOINT_FILE in held and MANIFEST_FILE not in held:
            return out  # continue the unfinished run in place
        if (partial / CHECKPOINT_FILE).is_file():
            return partial  # continue a killed overwrite; the old run is replaced when it is complete
        raise RunFolderError(
            f"there is no checkpoint to resume in {out} ({CHECKPOINT_FILE} is missing); start without --resume."
        )
    if not held:
        return out
    if not overwrite:
        what = (
            "a finished run"
            if MANIFEST_FILE in held or "result.json" in held
            else "the checkpoint of an unfinished run (continue it with --resume)"
            if CHECKPOINT_FILE in held
            else f"other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''})"
        )
        raise RunFolderError(
            f"{out} already holds {what}; choose an empty or new --out, or pass --overwrite to replace it "
            "(the old contents stay until the new run is complete)."
        )
    return partial  # overwrite: write beside, swap at the end


@contextlib.contextmanager
def training_folder(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Check and lock the output folder ``out``; yield the folder to train and save into.

    The yielded folder is ``out`` itself, or, when an existing folder is overwritten (or such an overwrite is
    resumed), ``.<name>.partial`` beside it, which is swapped into place when the block ends without an error
    (see the module docstring). A folder this call created is removed again if the block fails before writing
    anything into it. Under ``torchrun`` only the main process locks, creates and swaps; the others take the
    same decision from the same folder contents (they write nothing there).

    Raises:
        RunFolderError: ``out`` is a file; it holds a run or other files and ``overwrite`` is not given; it
            holds an unfinished run and neither ``resume`` nor ``overwrite`` is given; ``resume`` finds no
            checkpoint; or another training holds its lock.
    """
    from pyrolora.inference.distributed import is_main_process

    out = Path(out).absolute()
    partial, old = _beside(out, "partial"), _beside(out, "old")
    if not is_main_process():
        yield _decide(out, partial, overwrite=overwrite, resume=resume)
        return
    _decide(out, partial, overwrite=overwrite, resume=resume)  # refuse before creating anything
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the output folder {out}: {err}") from err
    try:
        with folder_lock(out):
            target = _decide(out, partial, overwrite=overwrite, resume=resume)  # again, now that it is ours
            if target == partial and not resume:
                shutil.rmtree(partial, ignore_errors=True)  # the leftovers of an earlier killed overwrite
                partial.mkdir()
            try:
                yield target
            except BaseException:
                if target == partial and not (partial / CHECKPOINT_FILE).is_file():
                    shutil.rmtree(partial, ignore_errors=True)  # nothing to resume: leave no trace
                raise
            if target == partial:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)  # between these two renames `out` is briefly absent, never half-written
                os.replace(partial, out)
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if created and out.is_dir() and not _contents(out):
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def clear_previous_export(out: str | Path, manifest_name: str) -> None:
    """Before exporting into ``out`` again, remove the posterior draws a previous export left there.

    Only a folder holding a previous export's manifest (``manifest_name``) is touched, and of it only the
    ``draw_<digits>`` subfolders that hold a peft adapter (``adapter_config.json``) and the adapter files of an
    exported point: a new export of fewer draws, or of one point, would otherwise sit beside stale adapters that
    a reader takes for its own.
    """
    out = Path(out)
    if not (out / manifest_name).is_file():
        return
    (out / manifest_name).unlink()  # first: a half-cleared folder reads as no export at all
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # a previous export of one point
        (out / name).unlink(missing_ok=True)
    for child in out.iterdir():
        name = child.name
        if (
            child.is_dir()
            and name.startswith("draw_")
            and name[5:].isdigit()
            and (child / "adapter_config.json").is_file()
        ):
            shutil.rmtree(child)
