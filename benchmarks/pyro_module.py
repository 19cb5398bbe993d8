"""Can ``BayesianLoraModel`` simply be the Pyro-module form? Step and prediction time of both forms (issue 22).

Three ways to train the same model with the same low-rank guide, through :func:`pyrolora.fit` on one random
batch (float32, AdamW, clipping), timed per step (median over the measured steps; each step ends with
``loss.item()``, which synchronises the device):

- ``bayesian-lean``: ``BayesianLoraModel`` with fit's default lean step (``inference/lean.py``);
- ``bayesian-pyro``: the same model through Pyro's ``Trace_ELBO`` (``lean=False``);
- ``pyro-module``: ``PyroLoraModel`` (``R = PyroSample(prior)`` per module), which always takes Pyro's path.

and Bayesian model averaging with S = 15 draws folded into one pass (``pyrolora.predict``) for both forms.

    python -m benchmarks.pyro_module --models tiny-bert deep-narrow-bert --device cpu --out runs/bench/pm_cpu.json
    python -m benchmarks.pyro_module --models minilm deep-narrow-bert --device cuda --out runs/bench/pm_gpu.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import (
    SHAPES,
    build_backbone,
    environment,
    median,
    print_table,
    random_batch,
    time_calls,
    write_json,
)
from pyrolora import BayesianLoraModel, LoraXSConfig, PyroLoraModel, fit, guides, inject_adapters, predict

FORMS = {
    "bayesian-lean": (BayesianLoraModel, True),
    "bayesian-pyro": (BayesianLoraModel, False),
    "pyro-module": (PyroLoraModel, True),  # lean=True is asked for, but no lean step exists for this form
}


def _model(name: str, form: type, device: torch.device, rank: int, batch: int) -> BayesianLoraModel:
    shape = SHAPES[name]
    backbone = build_backbone(shape, device)
    adapters = inject_adapters(backbone, LoraXSConfig(rank=rank, target_modules=shape.xs_targets))
    return form(backbone, adapters, dataset_size=max(1000, batch)).to(device)


def measure(name: str, device: torch.device, *, batch: int, length: int, rank: int, steps: int, warmup: int) -> list:
    shape = SHAPES[name]
    inputs, labels = random_batch(shape, batch, length, device)
    rows = []
    for method, (form, lean) in FORMS.items():
        model = _model(name, form, device, rank, batch)
        guide = guides.make("lowrank", model)
        stamps: list[float] = []
        stamp = stamps.append
        fit(
            model,
            guide,
            [(inputs, labels)],
            num_steps=warmup + steps,
            lean=lean,
            progress=False,
            seed=0,
            callback=lambda step, loss, stamp=stamp: stamp(time.perf_counter()),
        )
        step_ms = 1e3 * median([b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)])
        row: dict[str, Any] = {"model": name, "method": method, "sites": len(model.site_names), "step_ms": step_ms}
        if method != "bayesian-pyro":  # prediction does not depend on the loss; one row per form
            run = lambda model=model, guide=guide: predict(model, guide, [(inputs, labels)], num_samples=15)  # noqa: E731
            seconds = time_calls(run, device, repeats=5)
            row["predict_ms"] = 1e3 * seconds
        rows.append(row)
    lean_ms = rows[0]["step_ms"]
    for row in rows:
        row["ratio_to_lean"] = row["step_ms"] / lean_ms
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-bert", "deep-narrow-bert"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        rows += measure(
            name, device, batch=args.batch, length=args.length, rank=args.rank, steps=args.steps, warmup=args.warmup
        )
    columns = ["model", "method", "sites", "step_ms", "ratio_to_lean", "predict_ms"]
    title = f"fit step and predict (S = 15), {args.device}, batch {args.batch}x{args.length}, rank {args.rank}"
    table = print_table(rows, columns, title)
    payload = {"rows": rows, "table": table, "args": vars(args), "environment": environment(device)}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
