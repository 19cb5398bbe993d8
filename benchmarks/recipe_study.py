"""Why B-LoRA-XS by SVI underfits its MAP, and which recipe fixes it: one table of variants, several seeds.

For every (task, variant, seed) it trains one model on the task's ``train`` split (the task's ``validation`` split
held out of it), then reports on ``validation`` and ``test``:

- the BMA's accuracy / ECE / NLL / Brier at every posterior temperature τ of a grid (τ = 0 is the posterior mean
  alone, 1 the fitted posterior), and at the τ chosen on validation NLL (:func:`pyrolora.inference.select_temperature`);
- the cause-analysis numbers: per-site posterior standard deviation against the prior's and against the size of
  the mean (and of the MAP's R), the spread of the logit margin under posterior draws against the mean model's
  margin, and the two ELBO terms (expected log-likelihood, KL) over training.

Variants (``--variants``; all with the task's prior N(0, σ²) unless said):

    map          LoRA-XS MAP (delta guide)
    map_w01      MAP with the prior term weighted 0.1 (β = 0.1 on a delta guide)
    svi_old      lowrank K=2, the defaults before this study: clip_norm 1.0, init scale 0.05
    svi_noclip   lowrank K=2, no gradient clipping
    svi_warm     lowrank K=2, no clipping, warm start: the first half of the steps train the mean alone (MAP)
    svi_freeze   as svi_warm, then the mean stays fixed and only the spread is fitted to the ELBO
    svi_b01      lowrank K=2, no clipping, KL weight β = 0.1, init scale 0.001
    svi_eb       lowrank K=2, no clipping, empirical-Bayes prior scale (fitted by the ELBO)
    svi_default  lowrank K=2 with ``fit``'s and the guide's current defaults (whatever they are)

Example (GPU, MiniLM on 2,000 SST-2 rows for 10 epochs, the long-training regime)::

    PYROLORA_DATA=/path/to/shared/data python benchmarks/recipe_study.py --tasks sst2 --size full --seeds 3 \\
        --workers 8 --minilm /path/to/minilm --out /tmp/recipe
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import interval, prepare_models, task_config

TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
#: variant -> (guide name, guide options, fit keyword arguments, prior override)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any] | None]] = {
    "map": ("delta", {}, {}, None),
    "map_w01": ("delta", {}, {"kl_weight": 0.1}, None),
    "svi_old": ("lowrank", {"rank": 2, "init_scale": 0.05}, {"clip_norm": 1.0}, None),
    "svi_noclip": ("lowrank", {"rank": 2, "init_scale": 0.05}, {"clip_norm": None}, None),
    "svi_warm": ("lowrank", {"rank": 2}, {"clip_norm": None, "warm_start": 0.5}, None),
    "svi_freeze": ("lowrank", {"rank": 2}, {"clip_norm": None, "warm_start": 0.5, "freeze_mean": True}, None),
    "svi_b01": ("lowrank", {"rank": 2, "init_scale": 0.001}, {"clip_norm": None, "kl_weight": 0.1}, None),
    "svi_eb": ("lowrank", {"rank": 2}, {"clip_norm": None}, {"name": "empirical_bayes"}),
    "svi_default": ("lowrank", {"rank": 2}, {}, None),
}
METRICS = ("accuracy", "ece", "nll", "brier")


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from pyrolora.evaluation import metrics

    return {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=15),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
    }


def _site_table(model: Any, guide: Any, prior_scale: float) -> dict[str, Any]:
    """Per-site posterior sd (median over the site's entries) and rms of the mean, for a Gaussian guide."""
    import torch

    median = {k: v.detach().float().cpu() for k, v in guide.median().items()}
    rows: dict[str, Any] = {"rms_mean": {k: float(v.pow(2).mean().sqrt()) for k, v in median.items()}}
    if hasattr(guide, "get_posterior"):
        posterior = guide.get_posterior()
        if hasattr(posterior, "covariance_matrix") and model.num_latents <= 8192:
            sd = posterior.covariance_matrix.diagonal().sqrt()
        else:
            sd = posterior.stddev if hasattr(posterior, "stddev") else posterior.variance.sqrt()
        sd = sd.detach().float().cpu()
        pieces = torch.split(sd, [r * c for r, c in model.adapters.shapes.values()])
        rows["median_sd"] = {k: float(p.median()) for k, p in zip(model.adapters.shapes, pieces, strict=True)}
        rows["prior_scale"] = prior_scale
    return rows


def _margin_spread(samples: np.ndarray, mean_probs: np.ndarray) -> dict[str, float]:
    """Median over examples of the sd over draws of the top-2 log-probability margin, and of the mean-model margin."""
    top2 = np.argsort(-mean_probs, axis=1)[:, :2]  # (N, 2)
    logp = np.log(np.clip(samples, 1e-12, None))  # (S, N, C)
    rows = np.arange(samples.shape[1])
    margins = logp[:, rows, top2[:, 0]] - logp[:, rows, top2[:, 1]]  # (S, N)
    center = np.log(np.clip(mean_probs[rows, top2[:, 0]], 1e-12, None)) - np.log(
        np.clip(mean_probs[rows, top2[:, 1]], 1e-12, None)
    )
    return {"median_draw_sd_of_margin": float(np.median(margins.std(0))), "median_abs_margin": float(np.median(center))}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run: metrics at every τ on validation and test, the chosen τ, and the cause-analysis numbers."""
    import torch

    torch.set_num_threads(job["threads"])
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    from pyrolora.inference import fit, predict
    from pyrolora.inference.predict import select_temperature
    from pyrolora.runs.build import build, load_task
    from pyrolora.runs.config import RunConfig

    guide_name, guide_options, fit_options, prior = VARIANTS[job["variant"]]
    raw = dict(job["config"])
    raw["guide"] = {"name": guide_name, "options": guide_options}
    if prior is not None:
        raw["prior"] = {**raw["prior"], **prior}
    config = RunConfig.from_dict(raw)
    splits = load_task(config.task)
    run = build(config, splits)
    device = torch.device(job["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    run.model.to(device)
    precision = "bf16" if job["bf16"] else "float32"
    t = config.train
    start = time.perf_counter()
    result_fit = fit(
        run.model,
        run.guide,
        run.loader("train", shuffle=True),
        num_epochs=t.epochs,
        lr=t.lr,
        head_lr=t.head_lr,
        seed=t.seed,
        progress=False,
        precision=precision,
        **fit_options,
    )
    train_seconds = time.perf_counter() - start
    point = guide_name == "delta"
    out: dict[str, Any] = {k: v for k, v in job.items() if k != "config"}
    out["train_seconds"] = train_seconds
    every = max(1, len(result_fit.losses) // 50)
    n = run.model.dataset_size
    out["curve"] = {
        "step": list(range(0, len(result_fit.losses), every)),
        "loss": [v / n for v in result_fit.losses[::every]],
        "log_lik": [v / n for v in result_fit.log_likelihoods[::every]],
        "kl": [v / n for v in result_fit.kls[::every]],
    }
    out["sites"] = _site_table(run.model, run.guide, float(config.prior.scale))
    s = 1 if point else 15
    by_tau: dict[str, dict[str, Any]] = {"validation": {}, "test": {}}
    taus = (0.0,) if point else TEMPERATURES
    for split in ("validation", "test"):
        labels = np.asarray(splits[split].labels)
        for tau in taus:
            pred = predict(
                run.model, run.guide, run.loader(split), num_samples=1 if tau == 0 else s, seed=0,
                precision=precision, temperature=tau,
            )  # fmt: skip
            by_tau[split][str(tau)] = _metrics(pred.mean.numpy(), labels)
            if tau == 1.0 and split == "test":
                out["margins"] = _margin_spread(pred.probs.numpy(), pred.mean.numpy())
    out["by_tau"] = by_tau
    if not point:
        tau, scores = select_temperature(
            run.model, run.guide, run.loader("validation"), grid=TEMPERATURES, num_samples=s, precision=precision
        )
        out["chosen_tau"] = tau
        out["validation_nll_by_tau"] = {str(k): v for k, v in scores.items()}
        out["test_at_chosen"] = by_tau["test"][str(tau)]
    else:
        out["chosen_tau"] = 0.0
        out["test_at_chosen"] = by_tau["test"]["0.0"]
    out["wall_seconds"] = time.perf_counter() - start
    return out


def summarize(results: list[dict[str, Any]]) -> str:
    """Markdown tables: test metrics at τ = 1 (the fitted posterior), τ = 0 (mean alone) and the chosen τ."""
    lines = []
    for task in sorted({r["task"] for r in results}):
        lines += [f"### {task}", "", "| variant | seeds | prediction | " + " | ".join(METRICS) + " | τ chosen |"]
        lines.append("|---|---|---|" + "---|" * (len(METRICS) + 1))
        for variant in VARIANTS:
            rows = [r for r in results if r["task"] == task and r["variant"] == variant]
            if not rows:
                continue
            views = [("chosen τ", lambda r: r["test_at_chosen"])]
            if variant.startswith("svi"):
                views += [("τ = 1 (ELBO)", lambda r: r["by_tau"]["test"]["1.0"]), ("τ = 0 (mean)",
                          lambda r: r["by_tau"]["test"]["0.0"])]  # fmt: skip
            for label, view in views:
                cells = []
                for m in METRICS:
                    mean, half = interval([view(r)[m] for r in rows])
                    cells.append(f"{mean:.3f} ± {half:.3f}" if np.isfinite(half) else f"{mean:.3f}")
                taus = sorted(r["chosen_tau"] for r in rows)
                lines.append(f"| {variant} | {len(rows)} | {label} | " + " | ".join(cells) + f" | {taus} |")
        lines.append("")
        lines += ["| variant | median posterior sd / prior sd | rms of mean R | draw sd of margin | |margin| |"]
        lines.append("|---|---|---|---|---|")
        for variant in VARIANTS:
            rows = [r for r in results if r["task"] == task and r["variant"] == variant]
            if not rows:
                continue
            sd = [np.median(list(r["sites"]["median_sd"].values())) / r["sites"]["prior_scale"] for r in rows
                  if "median_sd" in r["sites"]]  # fmt: skip
            rms = [np.median(list(r["sites"]["rms_mean"].values())) for r in rows]
            spread = [r["margins"]["median_draw_sd_of_margin"] for r in rows if "margins" in r]
            margin = [r["margins"]["median_abs_margin"] for r in rows if "margins" in r]
            fmt = lambda xs: f"{np.mean(xs):.3f}" if xs else "–"  # noqa: E731
            lines.append(f"| {variant} | {fmt(sd)} | {fmt(rms)} | {fmt(spread)} | {fmt(margin)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--size", default="full", choices=("tiny", "small", "full", "long"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the backbone (GPU)")
    parser.add_argument("--minilm", default=None)
    parser.add_argument("--smollm2", default=None)
    parser.add_argument("--models", default="/tmp/pyrolora-models")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    models = prepare_models(args.size, Path(args.models), args.minilm, args.smollm2, tasks)
    jobs = [
        {"task": task, "variant": v, "seed": seed, "threads": args.threads, "device": args.device, "bf16": args.bf16,
         "config": {**task_config(task, args.size, models),
                    "train": {**task_config(task, args.size, models)["train"], "seed": seed}}}
        for seed in range(args.seeds) for task in tasks for v in variants
    ]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        with (out / "jobs.jsonl").open("a") as log:
            for future in cf.as_completed(futures):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # one failed run must not lose the others
                    print(f"FAILED {job['task']} {job['variant']} seed {job['seed']}: {err!r}", flush=True)
                    continue
                results.append(result)
                log.write(json.dumps(result) + "\n")
                log.flush()
                t = result["test_at_chosen"]
                print(f"{result['task']} {result['variant']} seed {result['seed']}: acc {t['accuracy']:.3f} "
                      f"ece {t['ece']:.3f} nll {t['nll']:.3f} tau {result['chosen_tau']} "
                      f"({result['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
    meta = {
        "command": " ".join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "device": _device_name(),
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}))
    table = summarize(results)
    (out / "table.md").write_text(table + "\n")
    print(table)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
