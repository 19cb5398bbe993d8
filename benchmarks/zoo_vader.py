"""Swap the prior and the posterior family in one line each and compare them on the VADER task.

Every row uses the same backbone (all-MiniLM-L6-v2), adapters, data and schedule; only the prior and the guide
change. Prints a Markdown table of the final training loss per example (the negative ELBO for variational
guides; the negative log joint at the MAP for delta, laplace, swag and nuts, whose second stage is not an
ELBO), test accuracy, ECE, NLL and training time, and writes it as JSON to ``--out``.

CPU smoke run (minutes)::

    PYTHONPATH=src python benchmarks/zoo_vader.py --epochs 0.25 --targets query --rank 4 --out /tmp/zoo.json

Full comparison (GPU; adapters on the last layers keep the Laplace Hessian and NUTS affordable)::

    PYTHONPATH=src python benchmarks/zoo_vader.py --epochs 8 --out zoo.json
"""

from __future__ import annotations

import argparse
import json
import time

from pyrolora import guides, priors
from pyrolora.config import RunConfig
from pyrolora.experiment import build, evaluate, fit_run, load_task

#: (label, prior, guide name, guide options): each row differs from the first in one or two arguments.
CASES = [
    ("MAP, N(0, 0.1²)", priors.IsotropicNormal(0.1), "delta", {}),
    ("lowrank K=2, N(0, 0.1²)", priors.IsotropicNormal(0.1), "lowrank", {"rank": 2}),
    ("meanfield, N(0, 0.1²)", priors.IsotropicNormal(0.1), "meanfield", {}),
    ("blockwise K=2, N(0, 0.1²)", priors.IsotropicNormal(0.1), "blockwise", {"rank": 2}),
    ("lowrank K=2, hierarchical per module", priors.Hierarchical(per_module=True), "lowrank", {"rank": 2}),
    ("lowrank K=2, Student-t(3, 0.1)", priors.StudentT(3.0, 0.1), "lowrank", {"rank": 2}),
    ("flow (IAF x2), N(0, 0.1²)", priors.IsotropicNormal(0.1), "flow", {}),
    ("laplace, N(0, 0.1²)", priors.IsotropicNormal(0.1), "laplace", {"damping": 1.0}),
    ("swag K=20, N(0, 0.1²)", priors.IsotropicNormal(0.1), "swag", {"rank": 20, "start": 0.5}),
    ("nuts 2 chains, N(0, 0.1²)", priors.IsotropicNormal(0.1), "nuts", {"num_samples": 50, "warmup_steps": 50}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--rank", type=int, default=8, help="LoRA-XS rank r")
    parser.add_argument(
        "--targets", nargs="+", default=["layer.5.attention.self.query", "layer.5.attention.self.value"]
    )
    parser.add_argument("--only", nargs="*", default=None, help="guide names to keep")
    parser.add_argument("--out", default="zoo_vader.json")
    parser.add_argument("--model", default=None, help="backbone name or folder (default: the packaged MiniLM)")
    args = parser.parse_args()
    config = RunConfig.from_dict(
        {
            "model": {"max_length": 16, **({"name": args.model} if args.model else {})},
            "adapters": {"rank": args.rank, "target_modules": args.targets},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-2, "head_lr": 3e-3, "seed": 0},
        }
    )
    splits = load_task(config.task)
    rows = {}
    for label, prior, guide_name, options in CASES:
        if args.only and guide_name not in args.only:
            continue
        run = build(config, splits)
        run.model.prior = priors.resolve(prior)  # one line: the prior
        run.guide = guides.make(guide_name, run.model, **options)  # one line: the posterior family
        start = time.perf_counter()
        result = fit_run(run, progress=False)  # the family's own procedure, with [train]'s settings
        seconds = time.perf_counter() - start
        metrics = evaluate(run, "test").metrics
        rows[label] = {"final_loss": result.final_loss, "train_seconds": seconds, **metrics}
        print(label, json.dumps({k: round(v, 4) for k, v in rows[label].items() if isinstance(v, float)}), flush=True)
        with open(args.out, "w", encoding="utf-8") as handle:  # after every row: a cut-short run keeps its rows
            json.dump(rows, handle, indent=2)
    print("| prior and guide | final loss / N | acc | ECE | NLL | train s |")
    print("|---|---|---|---|---|---|")
    for label, m in rows.items():
        print(
            f"| {label} | {m['final_loss']:.3f} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['nll']:.3f} | "
            f"{m['train_seconds']:.0f} |"
        )
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
