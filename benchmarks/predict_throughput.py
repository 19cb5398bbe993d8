"""Prediction throughput of Bayesian model averaging: S draws folded into the batch vs the sequential loop.

For each batch size B, on ``--batches`` random batches of B x ``--length`` tokens, times :func:`pyrolora.predict`
with S = ``--samples`` draws folded into the batch (the default, chunked to its token budget), the sequential
loop (``samples_per_pass=1``: S forward passes per batch) and a single draw (one forward pass per batch). Reports
``speedup = sequential / batched`` (target at least 3 at B = 8 on the GPU) and
``ratio_to_S_single = batched / (S x single)`` (target at most 1.25 at a batch that fills the GPU).

    python -m benchmarks.predict_throughput --model minilm --device cuda --batch-sizes 8 256
    python -m benchmarks.predict_throughput --model tiny-bert --device cpu --precision float32   # smoke
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from benchmarks.common import (
    SHAPES,
    build_backbone,
    environment,
    fast_svd,
    print_table,
    random_batch,
    time_calls,
    write_json,
)

COLUMNS = [
    "batch",
    "samples_per_pass",
    "batched_ms",
    "sequential_ms",
    "single_ms",
    "speedup",
    "ratio_to_S_single",
    "examples_per_s",
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pyrolora import BayesianLoraModel, LoraXSConfig, guides, inject_adapters, predict
    from pyrolora.inference.guides import setup
    from pyrolora.inference.predict import samples_per_pass_for

    device = torch.device(args.device)
    shape = SHAPES[args.model]
    backbone = build_backbone(shape, device, args.model_path)
    with fast_svd(args.fast_svd and shape.config is not None):
        adapters = inject_adapters(backbone, LoraXSConfig(rank=args.xs_rank, target_modules=shape.xs_targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=10_000).to(
        device
    )  # the prior's and likelihood's buffers too
    guide = setup(guides.make("lowrank", model, rank=2), model).to(device)
    S = args.samples
    rows = []
    for batch in args.batch_sizes:
        data = [random_batch(shape, batch, args.length, device, seed=i)[0] for i in range(args.batches)]

        def timed(data: list, **options: Any) -> float:
            def call() -> None:
                predict(model, guide, data, precision=args.precision, seed=0, **options)

            return time_calls(call, device, args.repeats)

        batched = timed(data, num_samples=S)
        sequential = timed(data, num_samples=S, samples_per_pass=1)
        single = timed(data, num_samples=1)
        rows.append(
            {
                "batch": batch,
                "samples_per_pass": samples_per_pass_for(S, batch * args.length, 65_536),
                "batched_ms": 1e3 * batched,
                "sequential_ms": 1e3 * sequential,
                "single_ms": 1e3 * single,
                "speedup": sequential / batched,
                "ratio_to_S_single": batched / (S * single),
                "examples_per_s": batch * args.batches / batched,
            }
        )
        del data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    title = (
        f"prediction: {args.model}, S={S}, {args.batches} batches x {args.length} tokens, {args.precision}, "
        f"{device}, LoRA-XS r={args.xs_rank}, lowrank guide"
    )
    table = print_table(rows, COLUMNS, title)
    payload = {
        "benchmark": "predict_throughput",
        "args": vars(args),
        "environment": environment(device),
        "rows": rows,
        "table": table,
    }
    if args.out:
        write_json(args.out, payload)
    return payload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    p.add_argument("--model-path", default=None, help="folder of the pretrained MiniLM (else $PYROLORA_MINILM)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["float32", "bf16"], default=None, help="default: bf16 on cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 128])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--xs-rank", type=int, default=16)
    p.add_argument("--fast-svd", action="store_true", help="randomised SVD for random-weight shapes (faster set-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file to write")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "float32"
    return run(args)


if __name__ == "__main__":
    main()
