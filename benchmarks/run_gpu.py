"""The whole GPU measurement of issue 6 in one command (about 5-8 minutes on one H200).

Measures the bf16 matrix rate once, then for MiniLM-L6 (pretrained), a RoBERTa-large shape and a 1B-Llama shape
(random weights) runs :mod:`benchmarks.train_step` (peft LoRA r=8, LoRA-XS MAP, B-LoRA-XS SVI with the lean step
and through Pyro's Trace_ELBO) and :mod:`benchmarks.predict_throughput` (S=15 batched vs sequential). Writes one
JSON per benchmark and ``summary.md`` with every table into ``--out``.

    python -m benchmarks.run_gpu --minilm-path /path/to/all-MiniLM-L6-v2 --out runs/bench
    python -m benchmarks.run_gpu --device cpu --tiny --out /tmp/bench   # the CPU smoke version
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import predict_throughput, train_step
from benchmarks.common import environment, matmul_rate, write_json

#: model -> (train batch, train length, measured steps, prediction batch sizes); the last size fills the GPU
FULL = {
    "minilm": (32, 128, 20, [8, 256]),
    "roberta-large": (32, 128, 12, [8, 128]),
    "llama-1b": (8, 256, 8, [8, 64]),
}
TINY = {"tiny-bert": (4, 16, 2, [2, 8]), "tiny-llama": (4, 16, 2, [2])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minilm-path", default=None, help="folder of the pretrained MiniLM (else $PYROLORA_MINILM)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the models to run")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke test)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of train_step's methods (e.g. without peft)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "float32"
    plan = TINY if args.tiny else FULL
    models = args.models or list(plan)
    out = Path(args.out)
    start = time.perf_counter()
    rate = matmul_rate(device, 256 if args.tiny else 8192)
    print(f"measured bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s", flush=True)
    tables = [f"# issue 6 benchmarks\n\n{environment(device)}\n\nbf16 matmul rate: {rate / 1e12:.1f} TFLOP/s\n"]
    results: dict[str, Any] = {"matmul_flops_per_s": rate, "environment": environment(device)}
    for model in models:
        batch, length, steps, pred_batches = plan[model]
        common = ["--model", model, "--device", args.device, "--precision", precision]
        if args.minilm_path:
            common += ["--model-path", args.minilm_path]
        warmup = "1" if args.tiny else "3"
        train = train_step.main(
            [
                *common,
                "--batch",
                str(batch),
                "--length",
                str(length),
                "--steps",
                str(steps),
                "--warmup",
                warmup,
                "--matmul-tflops",
                str(rate / 1e12),
                *(["--methods", *args.methods] if args.methods else []),
                "--out",
                str(out / f"train_{model}.json"),
            ]
        )
        pred = predict_throughput.main(
            [
                *common,
                "--batch-sizes",
                *map(str, pred_batches),
                "--length",
                str(length if args.tiny else 128),
                "--batches",
                "2" if args.tiny else "3",
                "--repeats",
                "1" if args.tiny else "2",
                "--out",
                str(out / f"predict_{model}.json"),
            ]
        )
        tables += [train["table"], pred["table"]]
        results[model] = {"train": train["rows"], "predict": pred["rows"]}
        print(f"[{time.perf_counter() - start:.0f} s] {model} done", flush=True)
    results["seconds"] = time.perf_counter() - start
    write_json(out / "all.json", results)
    tmp = out / "summary.md.tmp"
    tmp.write_text("\n\n".join(tables) + "\n")
    tmp.replace(out / "summary.md")
    print(f"wrote {out}/summary.md and JSON files in {results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
