"""Time per training step, peak memory, tokens/s and MFU: peft LoRA vs LoRA-XS MAP vs B-LoRA-XS SVI.

Every method trains the same backbone on the same random batch with AdamW, gradient clipping and bf16 autocast
(``--precision bf16``, the GPU default); the LoRA-XS methods run through :func:`pyrolora.fit` itself, peft LoRA
through the equivalent hand-written loop. The step time is the median over the measured steps (each step ends
with ``loss.item()``, which synchronises the device). Peak memory is measured over the measured steps, after
warm-up (optimizer state included). MFU = counted FLOPs of one forward and backward pass / step time / the
measured bf16 matrix rate (``--matmul-tflops``, else measured here).

    python -m benchmarks.train_step --model minilm --device cuda --out runs/bench/train_minilm.json
    python -m benchmarks.train_step --model tiny-bert --device cpu --precision float32 --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    SHAPES,
    build_backbone,
    count_flops,
    environment,
    matmul_rate,
    median,
    peak,
    print_table,
    random_batch,
    reset_peak,
    write_json,
)

METHODS = ("peft-lora-r8", "lora-xs-map", "b-lora-xs-svi", "b-lora-xs-svi-pyro")
COLUMNS = [
    "method",
    "trainable",
    "step_ms",
    "ratio_to_map",
    "ratio_to_peft",
    "tokens_per_s",
    "peak_mib",
    "peak_ratio_to_map",
    "mfu",
]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peft_run(backbone, shape, inputs, labels, args, device) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(shape.lora_targets), task_type="SEQ_CLS"
    )
    model = get_peft_model(backbone, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def forward_backward() -> torch.Tensor:
        with _autocast(device, args.precision):
            logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss

    times, base = [], 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            base = reset_peak(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss.item()
        times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    flops = count_flops(forward_backward)
    return {
        "times": times[args.warmup :],
        "peak": peak(device),
        "base": base,
        "flops": flops,
        "trainable": sum(p.numel() for p in params),
    }


def _pyrolora_run(backbone, shape, inputs, labels, args, device, method) -> dict[str, Any]:
    from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters
    from pyrolora.inference.guides import setup

    adapters = inject_adapters(backbone, LoraXSConfig(rank=args.xs_rank, target_modules=shape.xs_targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=10_000).to(
        device
    )  # the prior's and likelihood's buffers too
    guide = guides.make("delta", model) if method == "lora-xs-map" else guides.make("lowrank", model, rank=2)
    setup(guide, model)
    guide.to(device)
    stamps: list[float] = []
    base = [0]

    def callback(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        if step == args.warmup - 1:
            base[0] = reset_peak(device)

    if args.warmup == 0:
        base[0] = reset_peak(device)
    start = time.perf_counter()
    fit(
        model,
        guide,
        [(inputs, labels)],
        num_steps=args.warmup + args.steps,
        lr=1e-2,
        warmup=0,
        progress=False,
        callback=callback,
        precision=args.precision,
        lean=method != "b-lora-xs-svi-pyro",
        compile=bool(args.compile),
    )
    edges = [start, *stamps]
    times = [b - a for a, b in itertools.pairwise(edges)][args.warmup :]
    values = {k: torch.zeros(s, device=device, requires_grad=True) for k, s in adapters.shapes.items()}

    def forward_backward() -> None:
        with _autocast(device, args.precision):
            out = model.outputs(inputs, values)
        F.cross_entropy(out.float(), labels).backward()

    flops = count_flops(forward_backward)
    trainable = sum(p.numel() for p in guide.parameters()) + sum(p.numel() for p in model.head_parameters())
    return {"times": times, "peak": peak(device), "base": base[0], "flops": flops, "trainable": trainable}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shape = SHAPES[args.model]
    rate = args.matmul_tflops * 1e12 if args.matmul_tflops else matmul_rate(device, args.matmul_size)
    inputs, labels = random_batch(shape, args.batch, args.length, device)
    tokens = args.batch * args.length
    rows = []
    for method in args.methods:
        backbone = build_backbone(shape, device, args.model_path)
        backbone.train()
        if method == "peft-lora-r8":
            result = _peft_run(backbone, shape, inputs, labels, args, device)
        else:
            result = _pyrolora_run(backbone, shape, inputs, labels, args, device, method)
        step = median(result["times"])
        rows.append(
            {
                "method": method,
                "trainable": result["trainable"],
                "step_ms": 1e3 * step,
                "tokens_per_s": tokens / step,
                "peak_mib": result["peak"] / 2**20 if device.type == "cuda" else None,
                "peak_above_start_mib": (result["peak"] - result["base"]) / 2**20 if device.type == "cuda" else None,
                "flops_per_step": result["flops"],
                "mfu": result["flops"] / step / rate,
                "step_times_ms": [1e3 * t for t in result["times"]],
            }
        )
        del backbone, result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {r["method"]: r for r in rows}
    for r in rows:
        if "lora-xs-map" in by:
            r["ratio_to_map"] = r["step_ms"] / by["lora-xs-map"]["step_ms"]
            if r["peak_mib"] is not None:
                r["peak_ratio_to_map"] = r["peak_mib"] / by["lora-xs-map"]["peak_mib"]
        if "peft-lora-r8" in by:
            r["ratio_to_peft"] = r["step_ms"] / by["peft-lora-r8"]["step_ms"]
    title = (
        f"train step: {args.model}, batch {args.batch} x {args.length}, {args.precision}, {device}, "
        f"LoRA-XS r={args.xs_rank} on {'+'.join(shape.xs_targets)}; peft r=8 on {'+'.join(shape.lora_targets)}"
    )
    table = print_table(rows, COLUMNS, title)
    payload = {
        "benchmark": "train_step",
        "args": vars(args),
        "environment": environment(device),
        "matmul_flops_per_s": rate,
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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--xs-rank", type=int, default=16)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone in the LoRA-XS methods")
    p.add_argument("--matmul-tflops", type=float, default=None, help="measured bf16 rate; measured here if absent")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file to write")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "float32"
    if args.warmup < 1 or args.steps < 1 or not math.isfinite(args.batch):
        raise SystemExit("--warmup and --steps must be at least 1")
    return run(args)


if __name__ == "__main__":
    main()
