"""Training checkpoints: everything :func:`pyrolora.fit` needs to continue a run exactly where it stopped.

A checkpoint is one safetensors file (no pickle) written atomically (temporary file, then rename). Its tensors
are the guide's parameters, the task head, the optimizer's moments, and the random-number states; its metadata
holds, as JSON, the structure around them: the step, the learning-rate scheduler, Python's and NumPy's RNG
states, the position in the data, the loss history so far, and a SHA-256 over all tensor bytes, which loading
verifies. Resuming from it restores all of that, so a run killed at any moment and resumed from its last
checkpoint takes the same steps on the same batches with the same random draws as one never interrupted.

What "the position in the data" means: :class:`BatchStream` records, at the start of every pass over the data,
the torch CPU RNG state and (if the data object has ``state_dict()``, like
:class:`~pyrolora.data.TokenizedLoader`, or a torch ``generator`` attribute, like a ``DataLoader``) the data
object's own state, and counts the batches drawn in the pass. Resuming re-creates that pass from the recorded
state and skips the batches already used. This is exact for any data whose batch order is a function of those
states: lists, :class:`~pyrolora.data.TokenizedLoader`, single-process DataLoaders (shuffled or not).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyrolora._atomic import atomic_path
from pyrolora.errors import ConfigError, DivergenceError, RunFolderError

__all__ = [
    "CHECKPOINT_FILE",
    "BatchStream",
    "Checkpointer",
    "find_checkpoint",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
_FORMAT = "pyrolora-checkpoint-2"  # 2: the checksum covers the JSON header (the tree) as well as the tensors
_FORMAT_1 = "pyrolora-checkpoint-1"  # the checksum covered the tensors only; still read


# ---------------------------------------------------------------------------------------------- data position
class BatchStream(Iterator[Any]):
    """Cycle over re-iterable ``data`` for ``total`` batches, remembering where it is so it can resume.

    Raises:
        ConfigError: if a pass over ``data`` yields no batch, or a one-shot iterator runs out before ``total``.
    """

    def __init__(self, data: Iterable[Any], total: int) -> None:
        self.data = data
        self.total = total
        self.taken = 0  # batches yielded in all
        self.epoch = 0  # completed passes
        self.position = 0  # batches yielded in the current pass
        self._iterator: Iterator[Any] | None = None
        self._pass_state: dict[str, Any] = {}

    def _data_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if callable(getattr(self.data, "state_dict", None)):
            state["data"] = self.data.state_dict()  # type: ignore[union-attr]
        generator = getattr(self.data, "generator", None)
        if isinstance(generator, torch.Generator):
            state["generator"] = generator.get_state()
        return state

    def _start_pass(self) -> None:
        self._pass_state = self._data_state()
        self._iterator = iter(self.data)
        self.position = 0

    def __next__(self) -> Any:
        if self.taken >= self.total:
            raise StopIteration
        while True:
            if self._iterator is None:
                self._start_pass()
            try:
                batch = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                if self.position == 0:
                    raise ConfigError(
                        "the training data yielded no batches; check the dataset and the batch size."
                    ) from None
                if self._iterator is self.data:
                    raise ConfigError(
                        "the training data is a one-shot iterator and ran out; pass a re-iterable (a list or "
                        "DataLoader)."
                    ) from None
                self._iterator = None
                self.epoch += 1
                continue
            self.position += 1
            self.taken += 1
            return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: counters, and the state the current pass started from."""
        size = None
        try:
            size = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            pass
        return {
            "taken": self.taken,
            "epoch": self.epoch,
            "position": self.position,
            "batches_per_pass": size,
            "pass_state": self._pass_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-create the current pass from its recorded start and skip the batches already drawn.

        Leaves the torch RNG as the skipping left it; the caller restores the checkpoint's RNG states after.
        """
        try:
            size = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            size = None
        if state["batches_per_pass"] != size:
            raise RunFolderError(
                f"the checkpoint was written for data of {state['batches_per_pass']} batches per pass, but this "
                f"data has {size}; resume with the same dataset and batch size."
            )
        pass_state = state["pass_state"]
        if "data" in pass_state:
            self.data.load_state_dict(pass_state["data"])  # type: ignore[union-attr]
        if "generator" in pass_state:
            self.data.generator.set_state(pass_state["generator"])  # type: ignore[union-attr]
        torch.set_rng_state(pass_state["torch_rng"])
        self._pass_state = pass_state
        self._iterator = iter(self.data)
        for _ in range(state["position"]):
            next(self._iterator)
        self.taken, self.epoch, self.position = state["taken"], state["epoch"], state["position"]


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The state of every global random-number generator a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global generator is what other code may use
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise RunFolderError(
                f"the checkpoint holds RNG states of {len(state['cuda'])} CUDA device(s), which this machine lacks; "
                "resume on a machine with the same GPUs (or accept a different random stream by starting afresh)."
            )
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- tree <-> file
def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """A JSON tree for ``obj``; tensors and arrays go into ``tensors`` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj, dtype=np.int64 if obj.dtype.kind in "iu" else obj.dtype)
        tensors[key] = torch.from_numpy(array.copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} at {key} in a checkpoint")  # a bug, not user input


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    return {k: _decode(v, tensors) for k, v in tree["__dict__"]}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checked_digest(tensors: dict[str, torch.Tensor], header: str) -> str:
    """SHA-256 over the tensors' digest and the JSON header: one flipped bit anywhere changes it."""
    return hashlib.sha256(f"{_tensor_digest(tensors)}:{header}".encode()).hexdigest()


def write_checkpoint(path: str | Path, tree: dict[str, Any]) -> Path:
    """Write a nested structure of tensors, arrays, dicts, lists, tuples and JSON scalars atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, "t")
    header = json.dumps(encoded)
    metadata = {"format": _FORMAT, "tree": header, "sha256": _checked_digest(tensors, header)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify what :func:`write_checkpoint` wrote.

    Raises:
        RunFolderError: if the file is missing, truncated, corrupt or not a pyrolora checkpoint.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # OSError, or safetensors' SafetensorError on a truncated or garbled file
        raise RunFolderError(
            f"cannot read the checkpoint {path}: {err}. It is missing, truncated or corrupt; resume from an intact "
            "copy or start the run afresh."
        ) from err
    fmt = metadata.get("format")
    if fmt not in (_FORMAT, _FORMAT_1):
        raise RunFolderError(f"{path} is not a pyrolora training checkpoint (format {fmt!r}).")
    header = metadata.get("tree", "")
    want = _checked_digest(tensors, header) if fmt == _FORMAT else _tensor_digest(tensors)
    if metadata.get("sha256") != want:
        raise RunFolderError(
            f"the checkpoint {path} is corrupt: its tensors do not match their recorded checksum, or its JSON header "
            "(step, settings, learning rates) was altered; resume from an intact copy or start the run afresh."
        )
    try:
        return _decode(json.loads(header), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as err:  # a v1 file's header
        raise RunFolderError(
            f"the checkpoint {path} has a damaged JSON header ({err!r}); start the run afresh."
        ) from err


def find_checkpoint(location: str | Path) -> Path:
    """A checkpoint file, given the file itself or the folder holding :data:`CHECKPOINT_FILE`."""
    location = Path(location)
    path = location / CHECKPOINT_FILE if location.is_dir() else location
    if not path.is_file():
        raise RunFolderError(f"no training checkpoint at {path}; nothing to resume (start without resuming).")
    return path


# ---------------------------------------------------------------------------------------------- fit's helper
def _sites(model: Any) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in model.adapters.shapes.items()}


class Checkpointer:
    """Periodic checkpoints for one :func:`pyrolora.fit` call, and resuming from one.

    Args:
        directory: folder for :data:`CHECKPOINT_FILE` (created if missing), or ``None`` for no checkpoints.
        every: write a checkpoint after every ``every`` optimizer steps and after the last step.
    """

    def __init__(self, directory: str | Path | None, every: int | None, tag: str | None = None) -> None:
        self.tag = tag  # e.g. the digest of the run's configuration: resuming under another one is refused
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"checkpoint_every must be a positive number of steps, got {every!r}.")
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.every = every if every is not None else 100
        self.last: tuple[Path, int] | None = None  # the last good checkpoint and its step
        self._t0 = time.perf_counter()  # training time so far, including that before a resume
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"cannot create the checkpoint folder {self.path.parent}: {err}") from err

    def maybe_save(self, step: int, num_steps: int, **parts: Any) -> None:
        """After ``step`` completed steps, write a checkpoint if one is due."""
        if self.path is None or (step % self.every and step != num_steps):
            return
        self.save(step, num_steps, **parts)

    def save(self, step: int, num_steps: int, *, model, guide, optimizer, scheduler, stream, result) -> None:
        assert self.path is not None
        tree = {
            "step": step,
            "num_steps": num_steps,
            "sites": _sites(model),
            "guide_class": type(guide).__name__,
            "tag": self.tag,
            "guide": guide.state_dict(),
            "head": model.head_state(),
            "prior": model.prior_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "stream": stream.state_dict(),
            "rng": rng_state(),
            "history": {
                "losses": result.losses,
                "learning_rates": result.learning_rates,
                "seconds": time.perf_counter() - self._t0,
            },
        }
        write_checkpoint(self.path, tree)
        self.last = (self.path, step)

    def resume(
        self, location: str | Path, num_steps: int, *, model, guide, optimizer, scheduler, stream, result
    ) -> tuple[int, float]:
        """Load a checkpoint into freshly built objects; returns the steps already done and their seconds.

        Raises:
            RunFolderError: the checkpoint is unreadable or belongs to a different model, guide or schedule.
        """
        path = find_checkpoint(location)
        tree = read_checkpoint(path)
        if tree["sites"] != _sites(model):
            raise RunFolderError(
                f"the checkpoint {path} was written for adapter sites {json.dumps(tree['sites'])[:200]}, but this "
                f"model has {json.dumps(_sites(model))[:200]}; resume with the run's model and adapter config."
            )
        if self.tag is not None and tree.get("tag") != self.tag:
            raise RunFolderError(
                f"the checkpoint {path} was written by a run with another configuration (its tag "
                f"{str(tree.get('tag'))[:12]}..., this run's {self.tag[:12]}...): resuming would mix two runs. "
                "Resume with the configuration the checkpoint was started with, or start afresh in another folder."
            )
        if tree["guide_class"] != type(guide).__name__:
            raise RunFolderError(
                f"the checkpoint {path} holds a {tree['guide_class']} guide, but this guide is a "
                f"{type(guide).__name__}; resume with the run's guide."
            )
        if tree["num_steps"] != num_steps:
            raise RunFolderError(
                f"the checkpoint {path} belongs to a run of {tree['num_steps']} steps, but this one has {num_steps}; "
                "resume with the same number of epochs/steps and batch size (the schedule depends on them)."
            )
        try:
            guide.load_state_dict(tree["guide"], strict=True)
            head = tree["head"]
            for name in model.head_names:
                prefix = name + "."
                sub = {k[len(prefix) :]: v for k, v in head.items() if k.startswith(prefix)}
                model.backbone.get_submodule(name).load_state_dict(sub)
            model.load_prior_state(tree.get("prior", {}))
            optimizer.load_state_dict(tree["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise RunFolderError(f"the checkpoint {path} does not fit this model and guide: {err}") from err
        scheduler.load_state_dict(tree["scheduler"])
        stream.load_state_dict(tree["stream"])
        set_rng_state(tree["rng"])
        result.losses[:] = tree["history"]["losses"]
        result.learning_rates[:] = tree["history"]["learning_rates"]
        result.num_steps = tree["step"]
        self.last = (path, tree["step"])
        self._t0 -= tree["history"]["seconds"]
        return tree["step"], tree["history"]["seconds"]

    def on_exit(self, exc_type, exc, tb) -> bool:
        """An exit callback for fit's ExitStack: a divergence names the intact last checkpoint."""
        if isinstance(exc, DivergenceError) and self.last is not None:
            path, step = self.last
            raise DivergenceError(
                f"{exc} The last good checkpoint, {path} (step {step}), is intact: resume_from (or `pyrolora train "
                "--resume`) continues from it, e.g. after removing bad examples; a lower lr or clip_norm needs a new "
                "run (a resumed run keeps its settings)."
            ) from exc
        return False
