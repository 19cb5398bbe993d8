"""Write the run folders and metrics that ``test_methods_registry.py`` checks the current code against.

Run once with the code of an older version (here: before the application layer moved into ``pyrolora.runs``)::

    PYTHONPATH=src python -m tests.runs.make_old_folders

It trains every method for one epoch on a 48-row TSV task with a tiny 2-layer BERT (see
``tests.conftest.save_tiny_model``: rebuilt bit-identically from its seed, so it is not stored), saves each run
folder under ``tests/runs/old_folders/<name>`` and records the test metrics of training (``trained``) and of
loading the folder again (``loaded``) in ``tests/runs/old_folders/metrics.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).parent / "old_folders"
#: relative to the repository root, so the folders load on any checkout (tests chdir there)
DATA = "tests/runs/old_folders/data"

METHODS = {
    # the guide's initial scale before the SVI recipe changed its default (0.05 -> 0.001)
    "bayesian-lowrank": {
        "method": {"name": "bayesian"},
        "guide": {"name": "lowrank", "options": {"rank": 2, "init_scale": 0.05}},
    },
    "bayesian-delta": {"method": {"name": "bayesian"}, "guide": {"name": "delta"}},
    "mc_dropout": {"method": {"name": "mc_dropout"}, "guide": {"name": "delta"}},
    "ensemble": {"method": {"name": "ensemble", "ensemble_size": 2}, "guide": {"name": "delta"}},
    "peft_lora": {
        "method": {"name": "peft_lora", "lora_rank": 2, "lora_targets": ["query"]},
        "guide": {"name": "delta"},
    },
}


def write_task(folder: Path) -> None:
    """48 training rows and 12 test rows of a two-class toy task ('good' / 'bad' film ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{['good', 'bad'][i % 2]} film number {i}\t{i % 2}\n" for i in range(48)]
    (folder / "train.tsv").write_text("text\tlabel\n" + "".join(rows), encoding="utf-8")
    (folder / "dev.tsv").write_text("text\tlabel\n" + "".join(rows[:12]), encoding="utf-8")


def config_dict(model: str, name: str) -> dict:
    return {
        "model": {"name": model, "max_length": 16},
        "task": {"name": "tsv", "path": DATA, "text_columns": ["text"], "labels": ["0", "1"]},
        "adapters": {"rank": 2},
        # The training defaults of the code that recorded metrics.json (before issue 17's recipe: the plain ELBO,
        # clipping at 1.0, no posterior temperature), so that the comparison stays one of the move alone.
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "head_lr": 0.05,
            "kl_weight": 1.0,
            "clip_norm": 1.0,
            "temperatures": [1.0],
        },
        "predict": {"num_samples": 3},
        **METHODS[name],
    }


def main() -> None:
    from pyrolora.runs.config import RunConfig
    from pyrolora.runs.runner import run_method
    from pyrolora.runs.trained import load_trained, split_metrics
    from tests.conftest import save_tiny_model

    write_task(HERE / "data")
    model = Path(tempfile.mkdtemp()) / "tiny"
    save_tiny_model(model)
    recorded = {}
    for name in METHODS:
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        config = RunConfig.from_dict(config_dict(str(model), name))
        result = run_method(config, out=out, device="cpu", progress=False)
        trained = load_trained(out, model_name=str(model))
        loaded = split_metrics(trained.probs("test").mean(0), trained.splits["test"], config.predict.n_bins)
        recorded[name] = {"trained": result["metrics"]["test"], "loaded": loaded}
        print(name, recorded[name])
    (HERE / "metrics.json").write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
