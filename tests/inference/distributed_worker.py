"""The scenarios of the multi-process tests, run alike in one process and under ``torchrun``.

``test_distributed.py`` launches ``python -m torch.distributed.run --nproc_per_node 2 -m
tests.inference.distributed_worker OUT`` (gloo on the CPU); every process runs the scenarios, checks after
every step that its guide and head parameters equal the other process's, and process 0 writes the results to
``OUT/results.pt``. The test then runs the same scenarios in its own single process and compares.

Everything is float64 so that the only difference between the runs, the order of floating-point sums over the
shards, stays near machine precision.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch
from torch import nn

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict
from pyrolora.inference import distributed

#: Global batches of the training data: equal halves, odd sizes (unequal shards) and a batch of one row
#: (fewer rows than processes). 61 training rows in all.
TRAIN_BATCHES = (16, 16, 16, 9, 3, 1)
#: Prediction batches: odd sizes and one single row; 13 rows.
TEST_BATCHES = (7, 1, 5)
NUM_STEPS = 12  # two passes over the training batches
NUM_SAMPLES = 4


def _batches(sizes: tuple[int, ...], features: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), features, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # three classes the network can learn
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]


def mlp_model() -> BayesianLoraModel:
    """A small classifier: two adapted hidden layers and a trainable head (module ``"4"``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0", "2"]))
    return BayesianLoraModel(net, adapters, dataset_size=sum(TRAIN_BATCHES), head=("4",))


def bert_model() -> BayesianLoraModel:
    """A tiny BERT (no dropout) with adapters on query and value and its classifier as the head."""
    from tests.conftest import tiny_bert

    torch.manual_seed(0)
    net = tiny_bert(num_labels=3).double()
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["query", "value"]))
    return BayesianLoraModel(net, adapters, dataset_size=sum(TRAIN_BATCHES))


def _token_batches(sizes: tuple[int, ...], seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        ids = torch.randint(2, 64, (size, 6), generator=g)
        mask = torch.ones(size, 6, dtype=torch.long)
        mask[0, -2:] = 0  # a padded row exercises the attention mask
        out.append(({"input_ids": ids, "attention_mask": mask}, (ids[:, 0] % 3).long()))
    return out


def trainable(model: BayesianLoraModel, guide: nn.Module) -> torch.Tensor:
    """Every guide and head parameter, flattened into one vector."""
    params = [*guide.parameters(), *model.head_parameters()]
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def shard_backbone(model: BayesianLoraModel) -> tuple[int, int]:
    """FSDP2 ``fully_shard`` on every encoder layer and the embeddings of a BERT backbone (its head stays whole).

    Returns the number of parameter elements of the BERT body: held locally by this process, and in all.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (distributed.world_size(),))
    bert = model.backbone.bert
    full = sum(p.numel() for p in bert.parameters())
    for layer in bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(bert.embeddings, mesh=mesh)
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in bert.parameters()), full


def scenario(name: str, *, sharded: bool = False) -> dict[str, object]:
    """:func:`run_scenario` with float64 as the default dtype (the prior and the guide follow it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return run_scenario(name, sharded=sharded)
    finally:
        torch.set_default_dtype(previous)


def run_scenario(name: str, *, sharded: bool = False) -> dict[str, object]:
    """Fit a low-rank guide (Monte Carlo ELBO, one particle) and the head, then predict. Returns the results.

    Under ``torchrun`` the head of process 1 starts perturbed (so that only DDP's broadcast of process 0's head
    can make the runs agree), and after every step each process compares its trainable parameters with the
    others' (``max_rank_gap``: the largest absolute difference seen over all steps).
    """
    model = mlp_model() if name == "mlp" else bert_model()
    if name == "mlp":
        train, test = _batches(TRAIN_BATCHES, 4, seed=1), _batches(TEST_BATCHES, 4, seed=2)
    else:
        train, test = _token_batches(TRAIN_BATCHES, seed=1), _token_batches(TEST_BATCHES, seed=2)
    world = distributed.world_size() if distributed.is_distributed() else 1
    local_numel, full_numel = shard_backbone(model) if sharded else (None, None)
    if world > 1 and distributed.rank() == 1:
        with torch.no_grad():
            for p in model.head_parameters():
                p.add_(0.5)
    guide = guides.make("lowrank", model, rank=2)
    gaps: list[float] = []

    def check(step: int, loss: float) -> None:
        if world == 1:
            return
        mine = trainable(model, guide)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(everyone, mine)
        gaps.append(max((e - mine).abs().max().item() for e in everyone))

    result = fit(
        model,
        guide,
        train,
        num_steps=NUM_STEPS,
        lr=0.05,
        head_lr=0.05,
        warmup=0,
        seed=0,
        progress=False,
        callback=check,
    )
    prediction = predict(model, guide, test, num_samples=NUM_SAMPLES, seed=3)
    shared = predict(model, guide, test, num_samples=NUM_SAMPLES, seed=None)  # process 0's seed, shared
    if world > 1:
        everyone = [torch.empty_like(shared.probs) for _ in range(world)]
        torch.distributed.all_gather(everyone, shared.probs)
        gaps.append(max((e - shared.probs).abs().max().item() for e in everyone))
    return {
        "losses": result.losses,
        "params": trainable(model, guide),
        "probs": prediction.probs,
        "max_rank_gap": max(gaps, default=0.0),
        "steps_checked": len(gaps),
        "local_backbone_numel": local_numel,
        "backbone_numel": full_numel,
    }


def failure_scenario() -> list[str]:
    """Process 1's shard of the second batch holds NaN inputs: every process must raise, none may hang.

    Returns every process's outcome (exception type and message), gathered on every process.
    """
    model = mlp_model()
    train = _batches(TRAIN_BATCHES, 4, seed=1)
    x, y = train[1]
    bad = x.clone()
    bad[8:] = math.nan  # rows 8..15 of 16: process 1's shard only
    train[1] = (bad, y)
    try:
        fit(model, guides.make("lowrank", model, rank=2), train, num_steps=4, seed=0, progress=False)
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    outcomes: list[str] = [""] * distributed.world_size()
    torch.distributed.all_gather_object(outcomes, outcome)
    return outcomes


def main(out: Path) -> None:
    torch.set_num_threads(1)
    results = {
        "world_size": distributed.world_size() if distributed.is_distributed() else 1,
        "mlp": scenario("mlp"),
        "bert_fsdp": scenario("bert", sharded=True),
        "failure": failure_scenario(),
    }
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
