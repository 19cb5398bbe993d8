"""Data parallelism across processes: :func:`~pyrolora.fit` and :func:`~pyrolora.predict` under ``torchrun``.

The latents are tiny, so the natural way to use N devices is data parallelism: every process holds the frozen
backbone (whole, or sharded with FSDP), the guide and the head; each sees its shard of every global batch; the
gradients of the guide and the head are averaged by PyTorch's ``DistributedDataParallel``. Nothing here talks
to the network itself: every collective is a ``torch.distributed`` call, and the gradient averaging is DDP's.

A script written for one process runs unchanged under ``torchrun --nproc_per_node N script.py`` or
``accelerate launch --num_processes N script.py``. When the launcher's environment (``WORLD_SIZE > 1``,
``MASTER_ADDR``) is present and no process group exists yet, the first call to :func:`is_distributed` (which
``fit`` and ``predict`` make) creates the default process group (gloo for CPU tensors, NCCL for CUDA tensors)
and, on a GPU machine, selects the device ``cuda:LOCAL_RANK``; put the model on :func:`device` before fitting.

What the distributed fit computes. Every process iterates the same global batches (same data, same order) and
keeps rows ``[start_k, end_k)`` of each (:func:`shard_bounds`, as even as possible). Process k's local loss is
the usual minibatch negative ELBO on its B_k rows, ``L_k = -(N/B_k) Σ_{i∈k} log p(y_i|x_i, θ) + log q(θ) -
log p(θ)`` (the data plate's size N stays global), and its gradient is scaled by ``W·B_k/B`` before DDP's mean
over the W processes, so the applied gradient is ``Σ_k (B_k/B) ∇L_k``. With the same θ on every process this is
exactly the gradient of the single-process loss on the whole global batch of B rows, and the reported loss is
the same weighted sum ``Σ_k (B_k/B) L_k`` (one scalar all-reduce per step). θ is the same on every process when
every process starts from the same seed and its forward pass draws no random numbers (no dropout): then the
distributed fit reproduces the single-process fit on the same global batches up to floating-point reassociation.
With dropout active the processes' draws of θ part after the first step; the gradient is still an unbiased
estimate of the same ELBO's gradient (with W particles of θ instead of one). A global batch with fewer rows than
processes is computed whole by every process (weights 1/W), so the result stays exact.

Guide and head parameters are identical on every process after every step: DDP broadcasts process 0's values
when the first step starts and every process applies the same averaged gradient. Checkpoints and other files
should be written by the main process only (:func:`is_main_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pyrolora.errors import ConfigError, DistributedError
from pyrolora.inference.batches import split_batch

__all__ = [
    "DataParallelELBO",
    "ShardedBatches",
    "barrier",
    "data_parallel",
    "device",
    "is_distributed",
    "is_main_process",
    "is_presharded",
    "rank",
    "shard_bounds",
    "sharded_predict",
    "world_size",
]

#: Set while a process runs its own share of a sharded computation, so that nested calls do not shard again.
_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("pyrolora_distributed_local", default=False)


def _dist():
    import torch.distributed as dist

    return dist


def _init_from_env() -> None:
    """Create the default process group from a launcher's environment, once, if none exists."""
    dist = _dist()
    if not dist.is_available() or dist.is_initialized():
        return
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world <= 1 or "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group()  # env:// rendezvous; gloo for CPU tensors and NCCL for CUDA tensors where available
    atexit.register(_shutdown)


def _shutdown() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several in a ``torch.distributed`` job (initializing it from the
    launcher's environment on first use). ``False`` inside a process's own share of a sharded call."""
    if _LOCAL.get():
        return False
    _init_from_env()
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes W (1 in a single process)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on the process that writes files and shows progress bars: rank 0, or the only process."""
    _init_from_env()
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if is_distributed():
        _dist().barrier()


def device() -> torch.device:
    """The device this process should use: ``cuda:LOCAL_RANK`` on a GPU machine, else the CPU."""
    _init_from_env()
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- data sharding
def shard_bounds(num_rows: int, world: int, index: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a batch of ``num_rows`` kept by process ``index`` of ``world``.

    The first ``num_rows % world`` processes get one row more (``torch.tensor_split``'s rule); with fewer rows
    than processes the last ones get none.
    """
    base, extra = divmod(num_rows, world)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _num_rows(batch: Any) -> int:
    inputs, targets = split_batch(batch)
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return targets.shape[0]
    for leaf in _leaves(inputs):
        if leaf.dim() > 0:
            return leaf.shape[0]
    raise ConfigError(f"cannot find the batch dimension of a batch of type {type(batch).__name__}; it holds no tensor.")


def _leaves(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, tuple | list):
        for v in obj:
            yield from _leaves(v)


def _take(obj: Any, rows: int, start: int, end: int) -> Any:
    """Rows ``start:end`` of every tensor in ``obj`` whose leading dimension is the batch dimension ``rows``."""
    if isinstance(obj, torch.Tensor):
        return obj[start:end] if obj.dim() > 0 and obj.shape[0] == rows else obj
    if isinstance(obj, Mapping):
        return {k: _take(v, rows, start, end) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_take(v, rows, start, end) for v in obj)
    return obj


class ShardedBatches:
    """This process's shard of every global batch of ``data``: a re-iterable with ``data``'s length.

    Every process must iterate the same global batches in the same order (same data, same shuffling seed).
    A global batch with fewer rows than processes leaves some processes without a row; they get the whole
    batch (``small="whole"``, what ``fit`` uses: its loss weights then average W identical shares) or its first
    row as a placeholder whose output is dropped (``small="placeholder"``, what ``predict`` uses). Either way
    every process runs one forward pass per global batch, which a sharded (FSDP) backbone requires.

    Attributes:
        record: for each batch of the latest pass, ``(B, start, end)``: the global batch size and the rows this
            process computed for real (``start == end`` for a placeholder).
    """

    def __init__(
        self, data: Iterable[Any], *, small: str = "whole", rank_: int | None = None, world: int | None = None
    ):
        if small not in ("whole", "placeholder"):
            raise ValueError(f"small must be 'whole' or 'placeholder', got {small!r}")
        self.data = data
        self.small = small
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.record: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError for unsized data, as fit expects

    def __iter__(self) -> Iterator[Any]:
        self.record = []
        for batch in self.data:
            rows = _num_rows(batch)
            start, end = shard_bounds(rows, self.world, self.rank)
            if start < end:
                self.record.append((rows, start, end))
                yield _take(batch, rows, start, end)
            elif self.small == "whole":
                self.record.append((rows, 0, rows))
                yield batch
            else:
                self.record.append((rows, 0, 0))
                yield _take(batch, rows, 0, 1)


def is_presharded(data: Any) -> bool:
    """Whether ``data`` already yields only this process's examples: a DataLoader with a ``DistributedSampler``
    or one prepared by Accelerate (``DataLoaderShard`` / ``DataLoaderDispatcher``)."""
    from torch.utils.data.distributed import DistributedSampler

    samplers = [getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    if any(isinstance(s, DistributedSampler) for s in samplers):
        return True
    return any(c.__module__.startswith("accelerate.") and "DataLoader" in c.__name__ for c in type(data).__mro__)


# ---------------------------------------------------------------------------------------------- fit
def _guide_and_head(model: nn.Module, guide: nn.Module) -> nn.Module:
    """A module whose parameters are exactly the guide's and the head's; the frozen backbone stays out of DDP."""

    class _Trainable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.guide = guide
            self.head = nn.ModuleList([model.backbone.get_submodule(n) for n in model.head_names])

        def forward(self, loss_fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
            return loss_fn(*args, **kwargs)

    return _Trainable()


def _check_same_backbone(model: nn.Module, where: torch.device) -> None:
    """Fail fast if the processes hold different frozen factors (e.g. backbones initialised without a seed)."""
    dist = _dist()
    local = torch.stack([layer.A.detach().double().sum() for layer in model.adapters.values()]).to(where)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.allclose(low, high, rtol=1e-6, atol=0.0):
        raise ConfigError(
            "the processes hold different frozen backbones (their adapter factors differ); load the same "
            "pretrained weights, or seed the random initialisation identically on every process."
        )


class DataParallelELBO:
    """An ELBO whose gradients are averaged across processes by ``DistributedDataParallel``.

    ``differentiable_loss(model, guide, inputs, targets)`` returns a scalar whose value is the global loss
    ``Σ_k (B_k/B) L_k`` (the same on every process) and whose gradient is this process's share
    ``(W·B_k/B) ∇L_k``; the ``backward()`` of it triggers DDP's gradient all-reduce (a mean over processes).
    The DDP wrapper is built on the first call, after the guide has created its parameters; it broadcasts
    process 0's guide and head parameters to the others.

    Args:
        elbo: the ELBO of the single-process fit (e.g. ``Trace_ELBO``).
        model: the Bayesian model.
        guide: the guide.
    """

    def __init__(self, elbo: Any, model: nn.Module, guide: nn.Module) -> None:
        self.elbo = elbo
        self.model = model
        self.guide = guide
        self._ddp: nn.Module | None = None

    def _wrapped(self) -> nn.Module:
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            _check_same_backbone(self.model, self.model.device)
            # no buffer sync at each forward: the guide and head have no running statistics to keep in step; the
            # initial broadcast of parameters and buffers from process 0 still happens. The keyword is
            # forward_sync_buffers from torch 2.13 on, broadcast_buffers before (torch 2.11 has only that one).
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
            self._ddp = DistributedDataParallel(_guide_and_head(self.model, self.guide), **{no_sync: False})
        return self._ddp

    def differentiable_loss(
        self, model: nn.Module, guide: nn.Module, *args: Any, kl_weight: float = 1.0, **kwargs: Any
    ) -> torch.Tensor:
        # ``model`` may be a thin wrapper of ``self.model`` (fit wraps it in its precision context); the guide
        # must be the one whose parameters DDP averages. ``kl_weight`` β scales log q(θ) (the model scales its
        # log p(θ) by its own ``kl_weight``), as in the single-process fit.
        if guide is not self.guide:
            raise ValueError("DataParallelELBO was built for another guide")
        if kl_weight != 1.0:
            from pyro import poutine

            guide = poutine.scale(guide, scale=kl_weight)
        dist = _dist()
        ddp = self._wrapped()
        rows = _num_rows(tuple(args[:2]) if len(args) >= 2 else args[0])  # B_k, from (inputs, targets)
        failure: BaseException | None = None
        try:
            local = ddp(self.elbo.differentiable_loss, model, guide, *args, **kwargs)
            value = local.detach().double().item()
        except Exception as err:  # re-raised below, after the other processes learned of it
            failure, value = err, float("nan")
        stats = torch.tensor([rows * value, rows, failure is not None], dtype=torch.float64, device=self.model.device)
        dist.all_reduce(stats)  # one collective keeps every process's loss, weights and failure in step
        weighted_sum, total_rows, failures = stats.tolist()
        if failure is not None:
            raise failure
        if failures:
            raise DistributedError(
                f"{int(failures)} other process(es) failed in this step (this is rank {rank()}); the cause is in "
                "their output."
            )
        scaled = local * (world_size() * rows / total_rows)  # DDP's mean then yields Σ_k (B_k/B) ∇L_k
        # value: the global loss Σ_k (B_k/B) L_k, identical on every process; gradient: this process's share.
        return scaled - scaled.detach() + weighted_sum / total_rows


def data_parallel(model: nn.Module, guide: nn.Module, data: Iterable[Any], elbo: Any) -> tuple[Iterable[Any], Any]:
    """What ``fit`` trains on in a distributed job: this process's shards of ``data``, and the wrapped ELBO.

    Data from a ``DistributedSampler`` (or prepared by Accelerate) is already sharded and is used as it is;
    its batches are weighted by their sizes all the same.
    """
    shards = data if is_presharded(data) else ShardedBatches(data, small="whole")
    return shards, DataParallelELBO(elbo, model, guide)


# ---------------------------------------------------------------------------------------------- predict
@contextlib.contextmanager
def _local() -> Iterator[None]:
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def _shared_seed(seed: int | None, where: torch.device) -> int:
    """``seed``, or (for ``None``) a fresh seed drawn by process 0 and shared, so every process draws alike."""
    if seed is not None:
        return seed
    value = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(where)
    _dist().broadcast(value, src=0)
    return int(value.item())


def sharded_predict(
    run: Callable[..., Any], data: Iterable[Any], seed: int | None, where: torch.device
) -> torch.Tensor:
    """Run ``run(shards, seed=seed)`` on this process's shard of every batch and gather all rows in original order.

    Args:
        run: this process's prediction (``predict`` with its other arguments bound), returning a result whose
            ``probs`` are the per-sample outputs of shape (S, n_local, C) of the rows it was given, in order.
        data: the full, unsharded batches, the same on every process.
        seed: seed of the posterior draws; every process uses the same (a ``None`` is replaced by one shared).
        where: the device of the model (collectives on CUDA tensors use NCCL).

    Returns:
        The per-sample outputs of all rows, shape (S, N, C), in the order of ``data``, on every process.
    """
    if is_presharded(data):
        raise ConfigError(
            "predict shards the batches itself and gathers them in order; pass the full data to every process, "
            "not a DataLoader with a DistributedSampler."
        )
    dist = _dist()
    seed = _shared_seed(seed, where)
    shards = ShardedBatches(data, small="placeholder")
    with _local():
        local = run(shards, seed=seed).probs  # (S, n_local, C), placeholders included
    keep, index, offset, position = [], [], 0, 0
    for rows, start, end in shards.record:
        kept = max(end - start, 1)
        if end > start:
            keep.extend(range(position, position + kept))
            index.extend(range(offset + start, offset + end))
        position += kept
        offset += rows
    local = local[:, keep]  # (S, n_real, C)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, (index, local.cpu()))
    total = sum(len(i) for i, _ in parts)
    if total != offset:
        raise DistributedError(f"gathered {total} predictions for {offset} rows; the processes saw different data.")
    out = local.new_empty(local.shape[0], total, *local.shape[2:], device="cpu")  # (S, N, C)
    for idx, values in parts:
        out[:, torch.as_tensor(idx, dtype=torch.long)] = values
    return out
