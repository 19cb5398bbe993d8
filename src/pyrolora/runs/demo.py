"""The embedded default job: MAP LoRA-XS versus B-LoRA-XS on the VADER task with all-MiniLM-L6-v2.

``make demo`` (or ``pyrolora demo --out DIR``) trains both on the VADER train split, evaluates them on its
test split and writes into the output folder::

    map/, blora/        the two run folders (config.json, state.safetensors, fit.json, metrics.json)
    metrics.json        both rows of the table below, plus settings and timing
    reliability.png     reliability diagrams with confidence histograms

and prints a table of accuracy, ECE, NLL, Brier, and the Spearman correlation between each model's predictive
entropy and the human raters' disagreement (entropy of their label distribution).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pyrolora._atomic import json_safe
from pyrolora.evaluation.plots import reliability_diagram
from pyrolora.runs.build import evaluate, load_task, save_run, train
from pyrolora.runs.config import RunConfig

__all__ = ["DEMO_CONFIG", "format_table", "run_demo"]

#: Adapters on query, value, attention-output and FFN-output projections of all 6 layers (24 modules),
#: rank 8: D = 24 · 64 = 1,536 latents.
DEMO_CONFIG = RunConfig.from_dict(
    {
        "model": {"max_length": 16},
        "adapters": {"rank": 8, "target_modules": ["query", "value", "output.dense"]},
        "prior": {"scale": 0.1},
        "guide": {"name": "lowrank", "options": {"rank": 2}},
        # a coarser temperature grid than the default (0 to 3 in 8 steps) keeps the demo within about 5 minutes
        # on 2 CPU cores: each candidate costs S passes over the 751 validation words
        "train": {"epochs": 6, "batch_size": 64, "lr": 1e-2, "head_lr": 3e-3, "seed": 0, "temperatures": [0, 1, 2, 3]},
        "predict": {"num_samples": 15},
    }
)

METHODS = {
    "LoRA-XS MAP (delta)": ("map", {"name": "delta"}),
    "B-LoRA-XS (lowrank K=2)": ("blora", {"name": "lowrank", "options": {"rank": 2}}),
}

COLUMNS = [
    ("accuracy", "acc"),
    ("ece", "ECE"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("spearman_human_disagreement", "Spearman vs human disagreement"),
]


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the demo metrics, one row per method."""
    header = "| method | " + " | ".join(label for _, label in COLUMNS) + " | train s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, m in rows.items():
        cells = " | ".join(f"{m[key]:.3f}" for key, _ in COLUMNS)
        lines.append(f"| {name} | {cells} | {m['train_seconds']:.0f} |")
    return "\n".join(lines)


def run_demo(
    out: str | Path, *, epochs: float | None = None, progress: bool = True, config: RunConfig | None = None
) -> dict:
    """Train and evaluate both methods; write runs, metrics and the reliability diagram into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = config if config is not None else DEMO_CONFIG
    if epochs is not None:
        base = base.replace(train={"epochs": epochs})
    splits = load_task(base.task)
    rows: dict[str, dict[str, Any]] = {}
    curves = {}
    started = time.perf_counter()
    for name, (folder, guide) in METHODS.items():
        print(f"== {name}", flush=True)
        run = train(base.replace(guide=guide), progress=progress, splits=splits)
        evaluation = evaluate(run, "test")
        run.metrics = {"test": evaluation.metrics}
        save_run(run, out / folder)
        assert run.fit_result is not None
        rows[name] = {**evaluation.metrics, "train_seconds": run.fit_result.seconds, "run": folder}
        curves[name] = (evaluation.prediction.mean, evaluation.labels)
    table = format_table(rows)
    reliability_diagram(curves, out / "reliability.png", n_bins=base.predict.n_bins, title="VADER test split")
    summary = {
        "task": "vader",
        "split": "test",
        "num_test_examples": len(splits["test"]),
        "config": base.to_dict(),
        "methods": rows,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "metrics.json").write_text(
        json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    print()
    print(table)
    folders = ", ".join(str(out / r["run"]) for r in rows.values())
    print(f"\nwrote {out / 'metrics.json'}, {out / 'reliability.png'} and the run folders {folders}")
    return summary
