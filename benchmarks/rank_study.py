"""Calibration against the rank K of the low-rank guide, on the VADER task with all-MiniLM-L6-v2.

The paper's second claim is that the posterior covariance over the LoRA-XS cores has low rank (K = 2 is
enough). This study fits the same model with ``lowrank`` guides of rank K in {1, 2, 5, 10}, the ``full``
covariance guide and, as a reference, the MAP point estimate (``delta``), on a training subset trained for
several epochs (the regime where MAP becomes overconfident), and reports test accuracy, ECE, NLL, Brier, the
Spearman correlation of predictive entropy with human rater disagreement, and the covariance spectrum of each
fitted posterior (effective rank, share of variance in the top 2 directions).

Run (CPU, one thread; about 15 minutes at the defaults)::

    PYTHONPATH=src python benchmarks/rank_study.py --out benchmarks/results/rank_study.json

``--train-size 0`` uses the whole training split; ``--threads`` raises the thread count on a larger machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pyrolora.diagnostics.spectrum import covariance_spectrum
from pyrolora.runs.build import evaluate, load_task, train
from pyrolora.runs.config import RunConfig


def _guides(ks: list[int], with_full: bool, with_map: bool) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if with_map:
        out["delta (MAP)"] = {"name": "delta"}
    for k in ks:
        out[f"lowrank K={k}"] = {"name": "lowrank", "options": {"rank": k}}
    if with_full:
        out["full"] = {"name": "full"}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10], help="ranks K of the lowrank guide")
    parser.add_argument("--no-full", action="store_true", help="skip the full-covariance guide")
    parser.add_argument("--no-map", action="store_true", help="skip the MAP (delta) reference")
    parser.add_argument("--train-size", type=int, default=1000, help="training rows (0: the whole split)")
    parser.add_argument("--test-size", type=int, default=0, help="test rows (0: the whole split, 1,501)")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--adapter-rank", type=int, default=4, help="LoRA-XS rank r (D = modules · r²)")
    parser.add_argument("--targets", nargs="+", default=["query", "value"], help="adapted module names")
    parser.add_argument("--prior-scale", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=15, help="S posterior samples for prediction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rank_study.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = RunConfig.from_dict(
        {
            "model": {"max_length": args.max_length},
            "adapters": {"rank": args.adapter_rank, "target_modules": args.targets},
            "prior": {"scale": args.prior_scale},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-2, "head_lr": 3e-3, "seed": args.seed},
            "predict": {"num_samples": args.num_samples},
        }
    )
    splits = load_task(base.task)
    rng = np.random.default_rng(args.seed)
    if args.train_size:
        splits["train"] = splits["train"].subset(rng.permutation(len(splits["train"]))[: args.train_size])
    if args.test_size:
        splits["test"] = splits["test"].subset(np.arange(args.test_size))
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    for label, guide in _guides(args.ks, not args.no_full, not args.no_map).items():
        t0 = time.perf_counter()
        run = train(base.replace(guide=guide), progress=False, splits=splits)
        evaluation = evaluate(run, "test")
        spectrum = covariance_spectrum(run.guide, run.model).to_dict(ks=(1, 2, 5, 10))
        assert run.fit_result is not None
        rows[label] = {
            **evaluation.metrics,
            "spectrum": spectrum,
            "final_loss": run.fit_result.final_loss,
            "train_seconds": run.fit_result.seconds,
            "seconds": time.perf_counter() - t0,
        }
        print(f"{label}: {json.dumps(rows[label])}", flush=True)

    header = "| guide | acc | ECE | NLL | Brier | Spearman vs human | eff. rank | top-2 share | train s |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for label, m in rows.items():
        s = m["spectrum"]
        share2 = s.get("share_top_2", float("nan"))
        lines.append(
            f"| {label} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['nll']:.3f} | {m['brier']:.3f} "
            f"| {m['spearman_human_disagreement']:.3f} | {s['effective_rank']:.1f} | {share2:.2f} "
            f"| {m['train_seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    result = {
        "study": "calibration vs lowrank guide rank K",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "threads": args.threads,
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_train": len(splits["train"]),
        "num_test": len(splits["test"]),
        "latent_dimension": rows and next(iter(rows.values()))["spectrum"]["dimension"],
        "config": base.to_dict(),
        "rows": rows,
        "table": table,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
