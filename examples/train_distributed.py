"""Train B-LoRA-XS on all-MiniLM-L6-v2 with N processes (one per GPU, or N CPU processes).

An ordinary training script: run it with ``python`` for one process, or unchanged under a launcher::

    torchrun --nproc_per_node 2 examples/train_distributed.py --task sst2 --epochs 1 --out runs/sst2-2gpu
    accelerate launch --num_processes 2 examples/train_distributed.py --task sst2 --epochs 1 --out runs/sst2-2gpu

Every process builds the same backbone and the same batches; ``fit`` gives each process its shard of every
global batch (``--batch-size`` is the global batch, so results and learning rates do not depend on N) and
averages the gradients of the guide and the head with DistributedDataParallel; ``predict`` shards the test
batches and gathers the predictions in order on every process. Only process 0 prints and writes files.

Tasks: ``vader`` (embedded, no files needed) or ``sst2`` (``$PYROLORA_DATA/glue/sst2/{train,dev}.tsv``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import pyrolora as pl
from pyrolora.data import ClassificationSplit, TokenizedLoader, vader_splits
from pyrolora.inference import distributed
from pyrolora.inference.state import save_state
from pyrolora.models.backbones import load_sequence_classifier, load_tokenizer

TARGETS = ["query", "value", "attention.output.dense", "output.dense"]


def sst2_split(path: Path) -> ClassificationSplit:
    rows = [line.rsplit("\t", 1) for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return ClassificationSplit(
        texts=tuple(r[0] for r in rows),
        labels=np.array([int(r[1]) for r in rows], dtype=np.int64),
        label_names=("negative", "positive"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["vader", "sst2"], default="vader")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("PYROLORA_DATA", "../shared/data")))
    p.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--test-rows", type=int, default=None, help="use only the first N test rows")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size, split across the processes")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--samples", type=int, default=15, help="posterior samples S for prediction")
    p.add_argument("--out", type=Path, default=Path("runs/distributed"))
    args = p.parse_args()

    if args.task == "vader":
        splits = vader_splits()
        train, test = splits["train"], splits["test"]
    else:
        train, test = sst2_split(args.data / "glue/sst2/train.tsv"), sst2_split(args.data / "glue/sst2/dev.tsv")
    if args.train_rows:
        train = train.subset(range(min(args.train_rows, len(train))))
    if args.test_rows:
        test = test.subset(range(min(args.test_rows, len(test))))

    device = distributed.device()  # cuda:LOCAL_RANK on a GPU machine, else the CPU
    backbone = load_sequence_classifier("minilm", num_labels=train.num_classes, seed=0).to(device)
    tokenizer = load_tokenizer("minilm")
    adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=8, target_modules=TARGETS))
    model = pl.BayesianLoraModel(backbone, adapters, prior=pl.priors.IsotropicNormal(0.1), dataset_size=len(train))
    guide = pl.guides.make("lowrank", model, rank=2)

    loader = TokenizedLoader(train, tokenizer, batch_size=args.batch_size, max_length=args.max_length, shuffle=True)
    result = pl.fit(model, guide, loader, num_epochs=args.epochs, seed=0)
    test_loader = TokenizedLoader(test, tokenizer, batch_size=128, max_length=args.max_length)
    prediction = pl.predict(model, guide, test_loader, num_samples=args.samples, progress=True)

    if distributed.is_main_process():
        labels = test.labels
        metrics = {
            "processes": distributed.world_size(),
            "steps": result.num_steps,
            "seconds": result.seconds,
            "final_loss_per_example": result.final_loss,
            "accuracy": pl.metrics.accuracy(prediction.mean, labels),
            "ece": pl.metrics.ece(prediction.mean, labels),
            "nll": pl.metrics.nll(prediction.mean, labels),
            "num_test": len(test),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        save_state(args.out / "state.safetensors", model, guide)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
