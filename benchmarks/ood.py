"""Uncertainty under distribution shift, every method, in one run: one Markdown table and one JSON file.

For each *shift pair* (in-distribution evaluation split, shifted data) every method is trained once per seed on
the in-distribution task, predicts both splits as per-sample probabilities (S, N, C), and
:func:`pyrolora.evaluation.uncertainty.uncertainty_report` turns them into the uncertainty decomposition (total
entropy H, expected entropy, mutual information MI), selective prediction (AURC of each score), OOD detection
(AUROC and AUPR-Out of each score, the shifted data positive) and, on VADER, the Spearman correlation of each score
with the human raters' disagreement.

Shift pairs (``--pairs``):

    vader_sst2    VADER test words (human rater distributions)  vs 500 SST-2 dev sentences (seeded subset, seed 0)
    sst2_cola     SST-2 dev                                      vs CoLA out-of-domain dev sentences (raw file)
    cola_in_out   CoLA in-domain dev (trained on CoLA train)     vs CoLA out-of-domain dev (labels ignored)
    arc_obqa      ARC-Easy dev (SmolLM2 scoring the options)     vs OpenBookQA dev questions (labels ignored)

Methods (``--methods``; the same runner as ``benchmarks/tasks.py``): ``lora`` (peft LoRA r = 8, a point
estimate, as a reference), ``lora_xs`` (LoRA-XS MAP, ``delta``), ``mc_dropout`` (the MAP models predicted with
S dropout masks; where the backbone has no dropout layer, e.g. Llama, its own MAP runs with adapter dropout),
``ensemble`` (5 MAP models: the per-sample probabilities are the members' probabilities), ``blora_xs``
(``lowrank`` K = 2) and ``swag`` (SWAG, the paper's posterior). A point estimate has MI exactly 0, so its MI
scores are constant: AUROC 0.5 and no rank correlation ("–").

Sizes: ``tiny`` (tiny random models, for the test), ``small`` (real models, CPU-sized), ``full`` (the GPU
setting: the training budgets of ``benchmarks/tasks.py --size full``, VADER for 4 epochs). With two or more
seeds every cell is mean ± t(0.975, n-1)·sd/√n over seeds; with one seed, the value alone.

Outputs under ``--out``: ``table.md`` (one table: every pair x method), ``results.json`` (every score of every
seed, the curves and the configs), ``jobs.jsonl`` (one line per finished training run) and ``samples/*.npz``
(the per-sample probabilities of each run, written as it finishes); ``--summarize-only`` rebuilds the table from
those files, e.g. after a run that was cut short.

Example (GPU)::

    PYROLORA_DATA=/path/to/shared/data python benchmarks/ood.py --size full --seeds 1 --workers 8 \\
        --minilm /path/to/minilm --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/ood
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "src"), str(ROOT)):  # run from a checkout without installing; `benchmarks` importable
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmarks import tasks as grid  # noqa: E402  (after the path set-up)

PAIRS = {
    "vader_sst2": ("VADER test", "SST-2 dev sentences"),
    "sst2_cola": ("SST-2 dev", "CoLA out-of-domain dev"),
    "cola_in_out": ("CoLA in-domain dev", "CoLA out-of-domain dev"),
    "arc_obqa": ("ARC-Easy dev", "OpenBookQA dev"),
}
#: the task each pair trains on (as known to ``benchmarks/tasks.py``) and its in-distribution split
PAIR_TASK = {"vader_sst2": "sst2", "sst2_cola": "sst2", "cola_in_out": "cola", "arc_obqa": "arc_easy"}
IN_SPLIT = {"vader_sst2": "test", "sst2_cola": "test", "cola_in_out": "in_domain", "arc_obqa": "test"}
SHIFTED = "shifted"
RUN_FILE = "run.json"  # what --summarize-only needs of a run: size, seeds, configs, rows left out and why
METHODS = ("lora", "lora_xs", "mc_dropout", "ensemble", "blora_xs", "swag")
#: shifted examples per pair (None: the whole file); VADER's in-distribution rows at the smaller sizes
SHIFT_LIMIT = {"tiny": 24, "small": 100, "full": None}
VADER_ROWS = {"tiny": (40, 24), "small": (400, 200), "full": (None, None)}  # (train, test)
#: the table's columns: (JSON path in a report, header); H = total predictive entropy, MI = mutual information
COLUMNS = (
    (("accuracy",), "acc"),
    (("scores", "entropy", "aurc"), "AURC H ↓"),
    (("scores", "mutual_information", "aurc"), "AURC MI ↓"),
    (("scores", "entropy", "auroc"), "AUROC H ↑"),
    (("scores", "mutual_information", "auroc"), "AUROC MI ↑"),
    (("scores", "entropy", "aupr_out"), "AUPR-Out H ↑"),
    (("scores", "mutual_information", "aupr_out"), "AUPR-Out MI ↑"),
    (("scores", "entropy", "spearman_human_disagreement"), "ρ raters H ↑"),
    (("scores", "mutual_information", "spearman_human_disagreement"), "ρ raters MI ↑"),
    (("decomposition", "in", "total_entropy"), "H in"),
    (("decomposition", "out", "total_entropy"), "H shifted"),
    (("decomposition", "in", "mutual_information"), "MI in"),
    (("decomposition", "out", "mutual_information"), "MI shifted"),
)


def pair_config(pair: str, size: str, models: dict[str, str]) -> dict[str, Any]:
    """The run configuration of ``pair``: that of its task in ``benchmarks/tasks.py``, VADER's adapted."""
    config = grid.task_config(PAIR_TASK[pair], size, models)
    if pair != "vader_sst2":
        return config
    train_rows, test_rows = VADER_ROWS[size]
    return {
        **config,
        # VADER words are short; 64 tokens keep the shifted SST-2 sentences whole (tiny: 32, for speed)
        "model": {**config["model"], "max_length": 32 if size == "tiny" else 64},
        "task": {"name": "vader", "max_train": train_rows, "max_eval": test_rows},
        "train": {**config["train"], "epochs": {"tiny": 1, "small": 2, "full": 4}[size]},
    }


def _subsample(split: Any, size: int | None) -> Any:
    if size is None or size >= len(split):
        return split
    return split.subset(np.sort(np.random.default_rng(0).permutation(len(split))[:size]))


def pair_splits(pair: str, config: Any, size: str) -> dict[str, Any]:
    """``train``, ``validation``, the in-distribution split and the shifted split ``"shifted"`` of ``pair``.

    Only these are predicted. Shifted data carry no labels that are used (placeholders or ignored ones).
    """
    from pyrolora.data.mcqa import load_mcqa_jsonl
    from pyrolora.data.tasks import data_root
    from pyrolora.data.texts import load_texts, unlabelled_split
    from pyrolora.runs.build import load_task

    splits = load_task(config.task)
    limit = SHIFT_LIMIT[size]
    inside = IN_SPLIT[pair]
    if pair == "vader_sst2":  # the VADER loader has fixed splits: subsample them here at the smaller sizes
        splits["train"] = _subsample(splits["train"], config.task.max_train)
        splits[inside] = _subsample(splits[inside], config.task.max_eval)
    root = data_root(config.task.data_dir)
    names = splits[inside].label_names
    if pair == "vader_sst2":
        shifted = unlabelled_split(load_texts(root / "glue/sst2/dev.tsv", limit=limit or 500, seed=0)[0], names)
    elif pair == "sst2_cola":  # CoLA's raw files are headerless: source, label, original label, sentence
        shifted = unlabelled_split(
            load_texts(root / "glue/cola/raw/out_of_domain_dev.tsv", column=3, limit=limit)[0], names
        )
    elif pair == "cola_in_out":
        shifted = _subsample(splits["out_of_domain"], limit)
    else:  # OpenBookQA questions with as many option slots as ARC-Easy's (padded options get probability 0)
        shifted = _subsample(load_mcqa_jsonl(root / "mcqa/openbookqa/dev.jsonl"), limit)
        shifted = shifted.with_num_options(splits[inside].num_options)
    return {"train": splits["train"], "validation": splits["validation"], inside: splits[inside], SHIFTED: shifted}


def run_pair_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run of a pair (in a worker process): ``benchmarks/tasks.py``'s job on the pair's splits."""
    from pyrolora.runs.config import RunConfig

    return grid.run_job(job, splits=pair_splits(job["pair"], RunConfig.from_dict(job["config"]), job["size"]))


def make_jobs(args: argparse.Namespace, configs: dict[str, dict], with_mc: dict[str, bool]) -> list[dict[str, Any]]:
    """Every training run: per pair and seed, one per method; MAP runs serve LoRA-XS, MC dropout and ensembles."""
    jobs = []
    wants = set(args.methods)
    for pair in args.pairs:
        base = configs[pair]
        size = base["method"]["ensemble_size"]
        end = args.first_seed + args.seeds
        seeds = list(range(args.first_seed, end))
        map_seeds = seeds + (list(range(end, end + size - 1)) if "ensemble" in wants else [])
        plan: list[tuple[str, int, dict[str, Any]]] = []
        if "lora" in wants:
            plan += [("lora", s, {"method": {**base["method"], "name": "peft_lora"}}) for s in seeds]
        if wants & {"lora_xs", "mc_dropout", "ensemble"}:
            plan += [("delta", s, {"guide": {"name": "delta"}}) for s in map_seeds]
        if "mc_dropout" in wants and not with_mc[pair]:
            # no dropout in the backbone (Llama): MC dropout is its own MAP run, trained with adapter dropout
            change = {
                "guide": {"name": "delta"},
                "method": {**base["method"], "name": "mc_dropout"},
                "adapters": {**base["adapters"], "dropout": grid.QA_ADAPTER_DROPOUT},
            }
            plan += [("mc_dropout", s, change) for s in seeds]
        for method in ("blora_xs", "swag"):
            if method in wants:
                plan += [(grid.KINDS[method], s, {"guide": grid.guide_of(method, args.swag_frequency)}) for s in seeds]
        for kind, seed, change in plan:
            mc = kind == "delta" and with_mc[pair] and seed < end
            # (a MAP's own predictions take one draw, its MC-dropout passes S: the runner decides, draws_needed)
            config = {**base, **change, "train": {**base["train"], "seed": seed}}
            jobs.append(
                {"pair": pair, "task": pair, "kind": kind, "seed": seed, "config": config, "mc_dropout": mc,
                 "keep_samples": True, "size": args.size, "device": args.device, "threads": args.threads,
                 "autocast": args.autocast}
            )  # fmt: skip
    # round-major, as in benchmarks/tasks.py: a run cut short by --deadline keeps every method's first seeds
    members = configs[args.pairs[0]]["method"]["ensemble_size"] if "ensemble" in wants else 1
    rank = {"lora": 0, "delta": 1, "mc_dropout": 2, "lowrank": 3, "swag": 4}
    return sorted(
        jobs,
        key=lambda j: (
            max(0, j["seed"] - members + 1) if j["kind"] == "delta" else j["seed"],
            PAIR_TASK[j["pair"]] not in grid.QA_TASKS,  # the slowest runs first within a round: SmolLM2's,
            -rank.get(j["kind"], 4),  # then the Bayesian ones
            args.pairs.index(j["pair"]),
            j["seed"],
        ),
    )


def _sample_file(out: Path, result: dict[str, Any]) -> Path:
    return out / "samples" / f"{result['pair']}-{result['kind']}-{result['seed']}.npz"


def save_samples(out: Path, result: dict[str, Any]) -> None:
    """The per-sample probabilities of one finished run, as ``samples/<pair>-<kind>-<seed>.npz``."""
    arrays = {
        f"{key}/{split}": v for key in ("samples", "mc_dropout_samples") for split, v in result.get(key, {}).items()
    }
    path = _sample_file(out, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(path)


def load_results(out: Path) -> list[dict[str, Any]]:
    """The finished runs of ``out/jobs.jsonl`` with their per-sample probabilities from ``out/samples``."""
    results = []
    for line in (out / "jobs.jsonl").read_text(encoding="utf-8").splitlines():
        result = json.loads(line)
        if not _sample_file(out, result).is_file():  # stopped between the log line and the file: not finished
            continue
        with np.load(_sample_file(out, result)) as arrays:
            for name in arrays.files:
                key, split = name.split("/", 1)
                result.setdefault(key, {})[split] = arrays[name]
        results.append(result)
    return results


def method_samples(method: str, pair: str, seed: int, runs: dict, members: int) -> tuple | None:
    """(in-distribution, shifted) per-sample probabilities of ``method``'s model of ``seed``, or None if missing."""
    inside = IN_SPLIT[pair]
    if method == "ensemble":
        group = [runs.get(("delta", seed + i)) for i in range(members)]
        if any(g is None for g in group):
            return None
        return tuple(np.stack([np.asarray(g["samples"][s]).mean(0) for g in group]) for s in (inside, SHIFTED))
    own = method == "mc_dropout" and ("mc_dropout", seed) in runs  # trained with adapter dropout (Llama)
    kind = (
        "mc_dropout" if own else {"lora_xs": "delta", "mc_dropout": "delta"}.get(method, grid.KINDS.get(method, method))
    )
    run = runs.get((kind, seed))
    field = "mc_dropout_samples" if method == "mc_dropout" and not own else "samples"
    if run is None or field not in run:
        return None
    return np.asarray(run[field][inside]), np.asarray(run[field][SHIFTED])


def _get(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def summarize(
    args: argparse.Namespace, done: list[dict[str, Any]], evals: dict[str, dict[str, Any]], configs: dict
) -> dict[str, dict[str, Any]]:
    """Per pair and method: the uncertainty report of every seed, and each table column's mean and 95% interval."""
    from pyrolora.evaluation.uncertainty import uncertainty_report

    rows: dict[str, dict[str, Any]] = {}
    for pair in args.pairs:
        runs = {(d["kind"], d["seed"]): d for d in done if d["pair"] == pair}
        split = evals[pair]
        members = configs[pair]["method"]["ensemble_size"]
        for method in args.methods:
            reports = []
            for seed in range(args.first_seed + args.seeds):  # (after --merge: every seed below the largest)
                found = method_samples(method, pair, seed, runs, members)
                if found is not None:
                    reports.append(
                        uncertainty_report(found[0], split.labels, ood_probs=found[1], human_probs=split.human_probs)
                    )
            if not reports:
                continue
            cells = {}
            for path, header in COLUMNS:
                values = [v for v in (_get(r, path) for r in reports) if v is not None]
                if values:
                    mean, half = grid.interval(values)
                    cells[header] = {"mean": mean, "ci95": None if np.isnan(half) else half, "n": len(values)}
            rows[f"{pair}/{method}"] = {
                "pair": pair,
                "method": method,
                "num_seeds": len(reports),
                "cells": cells,
                "per_seed": reports,
            }
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per pair and method, every column mean ± 95% half-width over seeds ("–": undefined)."""

    def cell(c: dict[str, Any] | None, form: str) -> str:
        if c is None:
            return "–"
        return f"{c['mean']:{form}}" + ("" if c["ci95"] is None else f" ± {c['ci95']:{form}}")

    headers = [h for _, h in COLUMNS]
    lines = [
        "| pair (in vs shifted) | method | seeds | " + " | ".join(headers) + " |",
        "|---|---|---|" + "---:|" * len(headers),
    ]
    for row in rows.values():
        inside, shifted = PAIRS[row["pair"]]
        label = grid.METHOD_LABELS.get(row["method"], row["method"])
        values = " | ".join(cell(row["cells"].get(h), ".2e" if h.startswith("MI ") else ".3f") for h in headers)
        lines.append(f"| {inside} vs {shifted} | {label} | {row['num_seeds']} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="full")
    parser.add_argument("--pairs", default=",".join(PAIRS), type=lambda s: s.split(","))
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds FIRST .. FIRST+SEEDS-1 (add seeds to an earlier run, then --summarize-only --merge both)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ood"))
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the table from saved runs, no training")
    parser.add_argument(
        "--merge",
        type=lambda s: [Path(x) for x in s.split(",")],
        default=None,
        help="with --summarize-only: the --out folders of several runs (e.g. one per pair) to combine into --out",
    )
    grid.add_run_arguments(parser)
    args = parser.parse_args(argv)
    grid.resolve_autocast(args)
    bad = [p for p in args.pairs if p not in PAIRS] + [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"unknown pair(s) or method(s) {bad}; pairs {list(PAIRS)}, methods {list(METHODS)}")
    if args.seeds < 1 or args.first_seed < 0:
        parser.error(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and {args.first_seed}")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    from pyrolora.runs.config import RunConfig

    if args.summarize_only:  # configs, skipped rows and seeds as the runs saved them
        sources = args.merge or [args.out]
        saved = [json.loads((d / RUN_FILE).read_text(encoding="utf-8")) for d in sources]
        if {s["size"] for s in saved} != {args.size}:
            parser.error(f"the saved runs have size(s) {sorted({s['size'] for s in saved})}, not --size {args.size}")
        configs = {p: c for s in saved for p, c in s["configs"].items()}
        skipped = {k: v for s in saved for k, v in s["skipped"].items()}
        args.pairs = [p for p in args.pairs if p in configs]
        args.seeds, args.first_seed = max(s["seeds"] for s in saved), 0
    else:
        tasks = [PAIR_TASK[p] for p in args.pairs]
        models = grid.prepare_models(args.size, args.out / "_models", args.minilm, args.smollm2, tasks)
        configs = {p: pair_config(p, args.size, models) for p in args.pairs}
        skipped = {}
    evals, num_shifted, with_mc = {}, {}, {}
    for pair in args.pairs:
        splits = pair_splits(pair, RunConfig.from_dict(configs[pair]), args.size)
        evals[pair] = splits[IN_SPLIT[pair]]
        num_shifted[pair] = len(splits[SHIFTED])
        wants_mc = "mc_dropout" in args.methods and not args.summarize_only
        # as in benchmarks/tasks.py: the encoder (MiniLM) has dropout layers, so MC dropout is the MAP runs'
        # dropout passes; Llama (QA) has none, so MC dropout is its own MAP runs with adapter dropout. Decided
        # from the task, without building a model in this process: the two GPU runs in which this process had
        # built one before starting its workers hung (cause not found); without it the same jobs ran on an H200.
        qa = PAIR_TASK[pair] in grid.QA_TASKS
        with_mc[pair] = wants_mc and not qa
        if wants_mc and qa:
            print(f"{pair}: Llama has no dropout; MC dropout trains its own MAP runs with adapter dropout "
                  f"p = {grid.QA_ADAPTER_DROPOUT}", flush=True)  # fmt: skip
    failed: list[str] = []  # jobs that raised: the others go on, and the table uses what finished
    if args.summarize_only:
        done = [r for d in sources for r in load_results(d)]
        jobs = done
    else:
        # "seeds": one past the largest seed, the range a later --summarize-only reads
        info = {"size": args.size, "seeds": args.first_seed + args.seeds, "configs": configs, "skipped": skipped}
        (args.out / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        jobs = make_jobs(args, configs, with_mc)
        print(f"{len(jobs)} jobs, {args.workers or 1} at a time; models {models}", flush=True)
        done = grid.execute(
            jobs,
            args.workers,
            args.deadline,
            args.out / "jobs.jsonl",
            started,
            worker=run_pair_job,
            on_result=lambda result: save_samples(args.out, result),
            on_error=lambda job, err: failed.append(f"{job['pair']} {job['kind']} seed {job['seed']}: {err!r}"),
        )
        for line in failed:
            print(f"FAILED {line}", flush=True)
        if len(done) < len(jobs):
            print(f"deadline: {len(jobs) - len(done)} jobs not run; the table uses the runs that finished", flush=True)
    rows = summarize(args, done, evals, configs)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": grid._device_name(args.device),
        "size": args.size,
        "total_seconds": time.perf_counter() - started,
        "jobs_planned": len(jobs),
        "jobs_finished": len(done),
        "pairs": {
            p: {"in": PAIRS[p][0], "shifted": PAIRS[p][1], "num_in": len(evals[p]), "num_shifted": num_shifted[p]}
            for p in args.pairs
        },
        "skipped": skipped,
        "failed": failed,
        "seconds": {
            f"{d['pair']}/{d['kind']}/{d['seed']}": {k: d.get(k) for k in ("train_seconds", "predict_seconds")}
            for d in done
        },
        "configs": configs,
        "rows": rows,
    }
    markdown = table(rows)
    # compact: the per-seed accuracy-coverage curves of 24 rows x 3 seeds pass 1 MB when indented
    (args.out / "results.json").write_text(json.dumps(report, separators=(",", ":")) + "\n", encoding="utf-8")
    (args.out / "table.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    for key, why in skipped.items():
        print(f"\nleft out {key}: {why}")
    print(f"\n{report['device']}, {report['total_seconds']:.0f} s; wrote {args.out / 'table.md'} and results.json")
    return report


if __name__ == "__main__":
    main()
