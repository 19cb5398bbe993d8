"""Swap the prior and the posterior family in one line each and compare them on the VADER task.

Every row uses the same backbone (all-MiniLM-L6-v2), adapters, data and schedule; only the prior and the guide
change. Prints a Markdown table of the final training loss per example (the negative ELBO for variational
guides; the negative log joint at the MAP for delta, laplace, swag and nuts, whose second stage is not an
ELBO), test accuracy, ECE, NLL and training time, and writes it as JSON to ``--out``.

``--only NAME ...`` runs the rows of those guides and merges them into an existing ``--out`` file: rows it runs
replace the stored ones of the same label, the others are kept (``--fresh`` starts from an empty file). Each
row records its device, epochs and options, so merged rows from different runs stay identifiable.

CPU smoke run (minutes)::

    PYTHONPATH=src python benchmarks/zoo_vader.py --epochs 1 --train-rows 128 --test-rows 64 \
        --targets layer.5.attention.self.query --rank 2 --out /tmp/zoo.json

Full comparison (GPU; the default adapters sit on the last layer's query and value, D = 2 x 8² = 128, which
keeps the Laplace Hessian and NUTS affordable; NUTS's chains pass over all 5254 training examples per leapfrog
step, in batches of ``--eval-batch-size``)::

    PYTHONPATH=src python benchmarks/zoo_vader.py --epochs 8 --out zoo.json
    PYTHONPATH=src python benchmarks/zoo_vader.py --epochs 8 --only laplace swag nuts --out zoo.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pyrolora import guides, priors
from pyrolora.runs.build import build, evaluate, fit_run, load_task
from pyrolora.runs.config import RunConfig


def cases(args: argparse.Namespace) -> list[tuple[str, Any, str, dict[str, Any]]]:
    """(label, prior, guide name, guide options): each row differs from the first in one or two arguments."""
    nuts = {
        "num_chains": args.nuts_chains,
        "num_samples": args.nuts_samples,
        "warmup_steps": args.nuts_warmup,
        "max_tree_depth": args.nuts_depth,
    }
    return [
        ("MAP, N(0, 0.1²)", priors.IsotropicNormal(0.1), "delta", {}),
        ("lowrank K=2, N(0, 0.1²)", priors.IsotropicNormal(0.1), "lowrank", {"rank": 2}),
        ("meanfield, N(0, 0.1²)", priors.IsotropicNormal(0.1), "meanfield", {}),
        ("blockwise K=2, N(0, 0.1²)", priors.IsotropicNormal(0.1), "blockwise", {"rank": 2}),
        ("lowrank K=2, hierarchical per module", priors.Hierarchical(per_module=True), "lowrank", {"rank": 2}),
        ("lowrank K=2, Student-t(3, 0.1)", priors.StudentT(3.0, 0.1), "lowrank", {"rank": 2}),
        ("flow (IAF x2), N(0, 0.1²)", priors.IsotropicNormal(0.1), "flow", {}),
        ("laplace, N(0, 0.1²)", priors.IsotropicNormal(0.1), "laplace", {"damping": args.laplace_damping}),
        (
            f"swag K={args.swag_rank}, N(0, 0.1²)",
            priors.IsotropicNormal(0.1),
            "swag",
            {"rank": args.swag_rank, "start": args.swag_start},  # default frequency: >= min(K, steps) iterates
        ),
        (f"nuts {args.nuts_chains} chains, N(0, 0.1²)", priors.IsotropicNormal(0.1), "nuts", nuts),
    ]


def _write(path: str, rows: dict[str, Any]) -> None:
    """Write ``rows`` as JSON atomically (a cut-short run never leaves a half-written file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=2)
    os.replace(tmp, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--rank", type=int, default=8, help="LoRA-XS rank r")
    parser.add_argument(
        "--targets", nargs="+", default=["layer.5.attention.self.query", "layer.5.attention.self.value"]
    )
    parser.add_argument("--only", nargs="*", default=None, help="guide names to run; merged into --out")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already in --out")
    parser.add_argument("--out", default="zoo_vader.json")
    parser.add_argument("--model", default=None, help="backbone name or folder (default: the packaged MiniLM)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="prediction and NUTS-potential batches")
    parser.add_argument("--train-rows", type=int, default=None, help="first rows of the train split (smoke runs)")
    parser.add_argument("--test-rows", type=int, default=None, help="first rows of the test split (smoke runs)")
    parser.add_argument("--laplace-damping", type=float, default=1.0)
    parser.add_argument("--swag-rank", type=int, default=20)
    parser.add_argument("--swag-start", type=float, default=0.5)
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--nuts-samples", type=int, default=50)
    parser.add_argument("--nuts-warmup", type=int, default=50)
    parser.add_argument("--nuts-depth", type=int, default=4, help="at most 2^depth - 1 leapfrog steps per draw")
    args = parser.parse_args()
    device = torch.device(args.device)
    eval_batch = args.eval_batch_size or (512 if device.type == "cuda" else 128)
    config = RunConfig.from_dict(
        {
            "model": {"max_length": 16, **({"name": args.model} if args.model else {})},
            "adapters": {"rank": args.rank, "target_modules": args.targets},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-2, "head_lr": 3e-3, "seed": 0},
            "predict": {"batch_size": eval_batch},
        }
    )
    splits = load_task(config.task)
    for split, rows_kept in (("train", args.train_rows), ("test", args.test_rows)):
        if rows_kept is not None:
            splits[split] = splits[split].subset(range(min(rows_kept, len(splits[split].labels))))
    rows: dict[str, Any] = {}
    if args.only and not args.fresh and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text(encoding="utf-8"))
    elif args.only is None and not args.fresh and Path(args.out).exists():
        print(f"{args.out} exists and every row runs: it is overwritten row by row", flush=True)
    for label, prior, guide_name, options in cases(args):
        if args.only and guide_name not in args.only:
            continue
        run = build(config, splits)
        run.model.prior = priors.resolve(prior)  # one line: the prior
        run.model.to(device)
        run.guide = guides.make(guide_name, run.model, **options)  # one line: the posterior family
        # NUTS passes over all training examples per leapfrog step: large batches (the potential is the same)
        extra = {"sample_data": run.loader("train")} if guide_name == "nuts" else {}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fit_run(run, progress=False, **extra)  # the family's own procedure, with [train]'s settings
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        metrics = evaluate(run, "test").metrics
        info = {"device": str(device), "epochs": args.epochs, "train_rows": len(run.splits["train"].labels)}
        info.update(guide=guide_name, options=options)
        if guide_name == "swag":
            info["swag_collected"] = run.guide.num_collected
        rows[label] = {"final_loss": result.final_loss, "train_seconds": seconds, **metrics, **info}
        print(label, json.dumps({k: round(v, 4) for k, v in rows[label].items() if isinstance(v, float)}), flush=True)
        _write(args.out, rows)  # after every row: a cut-short run keeps its rows
    print("| prior and guide | final loss / N | acc | ECE | NLL | train s |")
    print("|---|---|---|---|---|---|")
    for label, m in rows.items():
        print(
            f"| {label} | {m['final_loss']:.3f} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['nll']:.3f} | "
            f"{m['train_seconds']:.0f} |"
        )
    _write(args.out, rows)


if __name__ == "__main__":
    main()
