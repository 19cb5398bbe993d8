"""A like-for-like training step: peft LoRA vs LoRA-XS MAP vs B-LoRA-XS SVI on the same modules (issue 21).

For every (model, batch) of the plan and every target set (query + value, and the four-module set: query, value,
attention-output dense, FFN-output dense; on Llama q_proj, v_proj, o_proj, down_proj) it times

- ``peft-lora``: peft LoRA at rank r (``--rank``, default 16), the reference of every ratio;
- ``lora-xs-map`` and ``b-lora-xs-svi`` at the same rank r (**equal rank**), and again at the rank whose latent
  count D = M r_b² matches peft's adapter parameters Σ r (in + out) over the same M modules (**equal budget**);
- on the four-module set at equal rank also ``b-lora-xs-svi-fit`` (the same step through :func:`pyrolora.fit`,
  with its checks and callbacks; first batch of each model only) and ``b-lora-xs-svi-before`` (the LoRA-XS
  layer's forward as it was before issue 21: R folded into B under a gradient, a separate addition, one cast per
  layer and core).

Every method runs the same loop: ``zero_grad``, forward under bf16 autocast, loss, backward, gradient clipping,
AdamW step, ``loss.item()``. The LoRA-XS methods compute the loss with the lean step
(:class:`pyrolora.inference.lean.LeanELBO`; MAP: ``delta`` guide, SVI: ``lowrank`` guide with K = 2). A step
time is the median of ``steps`` timed steps after ``warmup``, each bracketed by ``torch.cuda.synchronize``; peak
memory is ``max_memory_allocated`` over the timed steps; MFU = FLOPs of one step's forward and backward (torch's
FLOP counter) / step time / the bf16 matrix rate measured here (a large bf16 ``mm``).

Then a ``torch.profiler`` run of one step per method on one shape prints the top kernels by self device time
(traces are written only with ``--trace-dir``; keep them out of the repository), the S = 15 batched prediction
against 15 single passes (:mod:`benchmarks.predict_throughput`) on the 1B Llama shape, and, last, the same
step with ``torch.compile`` on one shape. Parts that would overrun ``--budget-s`` are skipped and listed.

    python -m benchmarks.step_compare --model-path MINILM_DIR --out /tmp/step_compare   # GPU, about 6-8 minutes
    python -m benchmarks.step_compare --tiny --device cpu --out /tmp/sc       # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import predict_throughput
from benchmarks.common import (
    SHAPES,
    Shape,
    build_backbone,
    count_flops,
    environment,
    fast_svd,
    matmul_rate,
    median,
    peak,
    print_table,
    random_batch,
    reset_peak,
    sync,
    write_json,
)

#: target sets per family: name -> module names (peft's suffix matching, as pyrolora's)
TARGETS = {
    "bert": {"qv": ("query", "value"), "four": ("query", "value", "attention.output.dense", "output.dense")},
    "llama": {"qv": ("q_proj", "v_proj"), "four": ("q_proj", "v_proj", "o_proj", "down_proj")},
}
TARGETS["roberta"] = TARGETS["bert"]

#: (model, batch, length, timed steps); the second batch of each model fills an 80 GB GPU in this step
FULL_PLAN = [
    ("minilm", 32, 128, 10),
    ("minilm", 256, 128, 6),
    ("roberta-large", 32, 128, 8),
    ("roberta-large", 256, 128, 4),
    ("llama-1b", 32, 128, 6),
    ("llama-1b", 128, 128, 4),
]
TINY_PLAN = [("tiny-bert", 4, 16, 2), ("tiny-bert", 8, 16, 2), ("tiny-llama", 4, 16, 2)]

COLUMNS = [
    "targets",
    "compare",
    "method",
    "rank",
    "adapter_params",
    "trainable",
    "step_ms",
    "x_peft",
    "x_map",
    "tokens_per_s",
    "peak_mib",
    "peak_x_peft",
    "peak_x_map",
    "mfu",
]


# ---------------------------------------------------------------------------------------------------- helpers
def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def equal_budget_rank(backbone: nn.Module, targets: tuple[str, ...], peft_rank: int) -> int:
    """The LoRA-XS rank r_b with M r_b² closest to peft's Σ_l r (in_l + out_l) over the same M modules.

    Capped at the smallest min(in, out) among the modules (LoRA-XS cannot exceed it).
    """
    dims = [
        (m.in_features, m.out_features)
        for n, m in backbone.named_modules()
        if isinstance(m, nn.Linear) and _matches(n, targets)
    ]
    if not dims:
        raise SystemExit(f"no nn.Linear matches {targets}")
    budget = sum(peft_rank * (i + o) for i, o in dims)
    rank = round(math.sqrt(budget / len(dims)))
    return max(1, min(rank, *(min(i, o) for i, o in dims)))


def _legacy_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The LoRA-XS forward before issue 21 (commit 2c0000d), kept here only to measure before against after."""
    out = self.base(x)
    value = self.value
    if value is None or self._merged_delta is not None:
        return out
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.A.dtype
    a, b = self.compute_factors(dtype)
    h = F.linear(x, a)
    if value.dim() == 2:
        return out + F.linear(h, torch.mm(b, value.to(dtype)))
    samples = value.shape[0]
    b_s = torch.matmul(b, value.to(dtype))
    update = torch.bmm(h.reshape(samples, -1, self.rank), b_s.transpose(1, 2))
    return out + update.reshape(*h.shape[:-1], self.out_features)


@contextlib.contextmanager
def _before_issue_21():
    from pyrolora.adapters.injection import AdapterSet
    from pyrolora.adapters.layer import LoraXSLinear

    with (
        mock.patch.object(LoraXSLinear, "forward", _legacy_forward),
        mock.patch.object(AdapterSet, "compute_values", lambda self, values, flat=None: dict(values)),
    ):
        yield


def _autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Method:
    """One configured method: ``step()`` runs one training step, ``loss()`` the forward pass for FLOP counting."""

    def __init__(self, name: str, rank: int, adapter_params: int, trainable: int, step, loss, context=None):
        self.name, self.rank, self.adapter_params, self.trainable = name, rank, adapter_params, trainable
        self.step, self.loss = step, loss
        self.context = context or contextlib.nullcontext


def _loop(params: list[torch.Tensor], optimizer, loss_fn) -> Callable[[], float]:
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return step


def peft_method(backbone, targets, rank, inputs, labels, autocast, compile) -> Method:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        backbone, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), task_type="SEQ_CLS")
    )
    model.train()
    forward = model if compile is False else torch.compile(model, **compile)  # False, or torch.compile options
    params = [p for p in model.parameters() if p.requires_grad]
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)

    def loss() -> torch.Tensor:
        with autocast():
            logits = forward(**inputs).logits
        return F.cross_entropy(logits.float(), labels)

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return Method("peft-lora", rank, lora, sum(p.numel() for p in params), _loop(params, optimizer, loss), loss)


def xs_model(backbone, targets, rank):
    from pyrolora import BayesianLoraModel, LoraXSConfig, inject_adapters

    adapters = inject_adapters(backbone, LoraXSConfig(rank=rank, target_modules=targets))
    model = BayesianLoraModel(backbone, adapters, dataset_size=100_000).to(next(backbone.parameters()).device)
    model.train()
    return model


def xs_method(model, name, rank, inputs, labels, autocast, compile, precision) -> Method:
    import pyro

    from pyrolora import fit, guides
    from pyrolora.inference.guides import setup
    from pyrolora.inference.lean import LeanELBO
    from pyrolora.inference.precision import compiled_outputs

    kind = "delta" if name == "lora-xs-map" else "lowrank"
    model.train()
    with pyro.settings.context(module_local_params=True):
        guide = guides.make(kind, model, **({} if kind == "delta" else {"rank": 2}))
        setup(guide, model)
        guide.to(model.device)
    params = [p for p in guide.parameters() if p.requires_grad] + model.head_parameters()
    trainable = sum(p.numel() for p in params)
    context = _before_issue_21 if name.endswith("-before") else contextlib.nullcontext
    if name.endswith("-fit"):  # the same step through pyrolora.fit: step(n, callback) runs n steps in one call

        def fit_steps(n: int, callback: Callable[[int, float], None]) -> None:
            fit(
                model,
                guide,
                [(inputs, labels)],
                num_steps=n,
                lr=1e-2,
                warmup=0,
                progress=False,
                seed=None,
                precision=precision,
                compile=compile,
                callback=callback,
            )

        lean = LeanELBO(model, guide, autocast=autocast)
        loss = lambda: lean.differentiable_loss(inputs, labels)  # noqa: E731
        return Method(name, rank, model.num_latents, trainable, fit_steps, loss)
    lean = LeanELBO(model, guide, autocast=autocast, outputs=compiled_outputs(model, compile))
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    def loss() -> torch.Tensor:
        return lean.differentiable_loss(inputs, labels)

    return Method(name, rank, model.num_latents, trainable, _loop(params, optimizer, loss), loss, context)


def measure(method: Method, device: torch.device, warmup: int, steps: int, flops: bool = True) -> dict[str, Any]:
    """Median step time (s), peak memory over the timed steps (bytes) and FLOPs of one forward and backward
    (``None`` with ``flops=False``: torch's FLOP counter does not see inside a compiled graph)."""
    with method.context():
        if method.name.endswith("-fit"):  # one fit call; a step's time is the gap between callbacks
            stamps: list[float] = []
            base_box = [0]

            def callback(step: int, loss: float) -> None:
                sync(device)
                stamps.append(time.perf_counter())
                if step == warmup - 1:
                    base_box[0] = reset_peak(device)

            method.step(warmup + steps, callback)
            times = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
            base = base_box[0]
        else:
            for _ in range(warmup):
                method.step()
            base = reset_peak(device)
            times = []
            for _ in range(steps):
                sync(device)
                start = time.perf_counter()
                method.step()
                sync(device)
                times.append(time.perf_counter() - start)
        top = peak(device)
        flops = count_flops(lambda: method.loss().backward()) if flops else None
    return {"seconds": median(times), "times": times, "peak": top, "base": base, "flops": flops}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(
    method: Method, result: dict[str, Any] | None, targets: str, compare: str, tokens: int, rate: float, error=None
):
    row = {"targets": targets, "compare": compare, "method": method if isinstance(method, str) else method.name}
    if isinstance(method, Method):
        row.update(rank=method.rank, adapter_params=method.adapter_params, trainable=method.trainable)
    if result is None:
        row["error"] = error
        row["step_ms"] = None
        return row
    step = result["seconds"]
    row.update(
        step_ms=1e3 * step,
        tokens_per_s=tokens / step,
        peak_mib=result["peak"] / 2**20 if result["peak"] else None,
        flops_per_step=result["flops"],
        mfu=result["flops"] / step / rate if result["flops"] else None,
        step_times_ms=[1e3 * t for t in result["times"]],
    )
    return row


def _ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("step_ms") is None:
            continue
        same = [x for x in rows if x["targets"] == r["targets"] and x.get("step_ms") is not None]
        peft = next((x for x in same if x["method"].startswith("peft-lora")), None)
        xs_map = next(
            (x for x in same if x["method"].startswith("lora-xs-map") and x.get("rank") == r.get("rank")), None
        )
        for ref, tag in ((peft, "peft"), (xs_map, "map")):
            if ref is None:
                continue
            r[f"x_{tag}"] = r["step_ms"] / ref["step_ms"]
            if r.get("peak_mib") and ref.get("peak_mib"):
                r[f"peak_x_{tag}"] = r["peak_mib"] / ref["peak_mib"]


# ---------------------------------------------------------------------------------------------------- parts
def compare_step(
    args, device, rate, model_name, batch, length, steps, compile=False, only=None, with_fit=True
) -> dict[str, Any]:
    """Every method and target set on one (model, batch); returns rows and the printed table.

    ``with_fit``: also time the step through :func:`pyrolora.fit` (a fixed per-step overhead, so the plan measures
    it at the first batch of each model only).
    """
    shape: Shape = SHAPES[model_name]
    autocast = _autocast(device, args.precision)
    inputs, labels = random_batch(shape, batch, length, device)
    tokens = batch * length
    rows = []
    sets = TARGETS[shape.family]
    for set_name in only or list(sets):
        targets = sets[set_name]
        plan: list[tuple[str, int | None, str]] = [("peft-lora", args.rank, "equal rank")]
        plan += [(m, args.rank, "equal rank") for m in ("lora-xs-map", "b-lora-xs-svi")]
        if set_name == "four" and not compile:
            extras = ("b-lora-xs-svi-fit", "b-lora-xs-svi-before") if with_fit else ("b-lora-xs-svi-before",)
            plan += [(m, args.rank, "equal rank") for m in extras]
        if not compile:
            plan += [(m, None, "equal budget") for m in ("lora-xs-map", "b-lora-xs-svi")]  # rank from peft's run
        models: dict[int, Any] = {}
        budget_rank = None
        options = ({"backend": args.compile_backend} if args.compile_backend else {}) if compile else False
        for name, rank, compare in plan:
            label = name + (" +compile" if compile else "")
            rank = budget_rank if rank is None else rank
            try:
                if rank is None:
                    raise RuntimeError("the equal-budget rank comes from the peft run, which did not run")
                if name == "peft-lora":
                    backbone = build_backbone(shape, device, args.model_path)
                    backbone.train()
                    budget_rank = equal_budget_rank(backbone, targets, args.rank)  # before peft wraps the layers
                    method = peft_method(backbone, targets, rank, inputs, labels, autocast, options)
                else:
                    if rank not in models:  # MAP and SVI at one rank share the backbone and its adapters
                        models.clear()
                        _free(device)
                        backbone = build_backbone(shape, device, args.model_path)
                        with fast_svd(shape.config is not None and not args.exact_svd):
                            models[rank] = xs_model(backbone, targets, rank)
                    method = xs_method(models[rank], name, rank, inputs, labels, autocast, options, args.precision)
                method.name = label
                result = measure(method, device, args.warmup, steps, flops=not compile)
                rows.append(_row(method, result, set_name, compare, tokens, rate))
            except Exception as err:  # one failed run (OOM, a compile error) must not end a one-shot GPU run
                if args.strict:
                    raise
                traceback.print_exc()
                rows.append(_row(label, None, set_name, compare, tokens, rate, error=str(err)[:100]) | {"rank": rank})
            finally:
                method = backbone = None
                _free(device)
            print(f"  {model_name} {batch}x{length} {set_name} {label} r={rank}: {rows[-1].get('step_ms')}", flush=True)
        models.clear()
        _free(device)
    _ratios(rows)
    mode = " torch.compile" if compile else ""
    title = (
        f"step: {model_name}, batch {batch} x {length}, {args.precision}{mode}, {device}; peft r={args.rank}; "
        f"targets qv = {'+'.join(sets['qv'])}, four = {'+'.join(sets['four'])}"
    )
    columns = COLUMNS + (["error"] if any(r.get("error") for r in rows) else [])
    return {"rows": rows, "table": print_table(rows, columns, title)}


def profile_step(args, device, model_name, batch, length) -> dict[str, Any]:
    """One profiled step per method (four-module set, equal rank): the top kernels by self device time."""
    from torch.profiler import ProfilerActivity, profile

    shape = SHAPES[model_name]
    autocast = _autocast(device, args.precision)
    inputs, labels = random_batch(shape, batch, length, device)
    targets = TARGETS[shape.family]["four"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = []
    summary = []
    for name in ("peft-lora", "lora-xs-map", "b-lora-xs-svi", "b-lora-xs-svi-before"):
        backbone = build_backbone(shape, device, args.model_path)
        backbone.train()
        if name == "peft-lora":
            method = peft_method(backbone, targets, args.rank, inputs, labels, autocast, False)
        else:
            with fast_svd(shape.config is not None and not args.exact_svd):
                model = xs_model(backbone, targets, args.rank)
            method = xs_method(model, name, args.rank, inputs, labels, autocast, False, args.precision)
        with method.context():
            for _ in range(2):
                method.step()
            sync(device)
            with profile(activities=activities) as prof:
                method.step()
                sync(device)
        events = prof.key_averages()
        table = events.table(sort_by=sort, row_limit=args.profile_rows)
        kernels, device_ms = _kernel_totals(prof, device)
        summary.append({"method": name, "kernels": kernels, "kernel_ms": device_ms})
        header = f"#### profile: {name}, {model_name} {batch} x {length}, four modules, r={args.rank}"
        text = f"{header}\n\n```\n{table}\n```"
        print(text, flush=True)
        tables.append(text)
        if args.trace_dir:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace_dir) / f"{model_name}-{name}.json"))
        method = model = backbone = prof = None
        _free(device)
    counts = print_table(
        summary, ["method", "kernels", "kernel_ms"], f"kernels per step: {model_name} {batch}x{length}"
    )
    return {"summary": summary, "table": "\n\n".join([counts, *tables])}


def _kernel_totals(prof, device: torch.device) -> tuple[int | None, float | None]:
    """Device kernels launched in the profiled step and their summed time (ms); ``None`` where not available."""
    if device.type != "cuda":
        return None, None
    try:
        kernels = [e for e in prof.events() if getattr(e.device_type, "name", "") == "CUDA"]
        total = sum(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0) for e in kernels)
        return len(kernels), total / 1e3
    except Exception as err:  # the profiler's event API changes between torch versions; the table still prints
        print(f"kernel totals unavailable: {err!r}", flush=True)
        return None, None


# ---------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU smoke test)")
    p.add_argument("--model-path", default=None, help="folder of the pretrained MiniLM (else $PYROLORA_MINILM)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the plan's models")
    p.add_argument("--precision", choices=["float32", "bf16"], default="bf16")
    p.add_argument("--rank", type=int, default=16, help="peft's rank and LoRA-XS's equal rank")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2, tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: the plan's)")
    p.add_argument("--exact-svd", action="store_true", help="exact SVD for random-weight shapes too (slower set-up)")
    p.add_argument("--profile", default=None, help="MODEL:BATCH:LENGTH profiled (default roberta-large:32:128)")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--trace-dir", default=None, help="write chrome traces here (never commit them)")
    p.add_argument("--predict", default=None, help="MODEL for S=15 prediction (default llama-1b)")
    p.add_argument("--predict-batches", type=int, nargs="+", default=None, help="default 8 64 (tiny: 4)")
    p.add_argument("--compile", default=None, help="MODEL:BATCH:LENGTH also run with torch.compile ('' for none)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "profile", "predict", "compile"])
    p.add_argument("--strict", action="store_true", help="stop at the first failed run (tests) instead of a row")
    p.add_argument("--budget-s", type=float, default=330.0, help="parts that would start after this are skipped")
    p.add_argument("--matmul-tflops", type=float, default=None, help="bf16 rate; measured here if absent")
    p.add_argument("--out", required=True, help="folder for summary.md and all.json")
    return p


def _guarded(args, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or (unless ``--strict``) a table that says it failed, so the parts after it still run."""
    try:
        return fn()
    except Exception as err:
        if args.strict:
            raise
        traceback.print_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"table": f"### {what}: failed\n\n{type(err).__name__}: {str(err)[:300]}"}


def _spec(text: str, n: int) -> list[Any]:
    parts = text.split(":")
    if len(parts) != n or parts[0] not in SHAPES:
        raise SystemExit(f"expected MODEL{':INT' * (n - 1)} with MODEL in {sorted(SHAPES)}, got {text!r}")
    return [parts[0], *map(int, parts[1:])]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    plan = TINY_PLAN if args.tiny else FULL_PLAN
    if args.models:
        plan = [p for p in plan if p[0] in args.models]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    profile_spec = args.profile or ("tiny-bert:4:16" if args.tiny else "roberta-large:32:128")
    predict_model = args.predict or ("tiny-llama" if args.tiny else "llama-1b")
    predict_batches = args.predict_batches or ([4] if args.tiny else [8, 64])
    compile_spec = args.compile if args.compile is not None else ("" if args.tiny else "minilm:32:128")
    rate = args.matmul_tflops * 1e12 if args.matmul_tflops else matmul_rate(device, 256 if args.tiny else 8192)
    print(f"measured bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s", flush=True)
    env = environment(device)
    out = Path(args.out)
    results: dict[str, Any] = {"environment": env, "matmul_flops_per_s": rate, "args": vars(args), "skipped": []}
    tables = [f"# issue 21: like-for-like step\n\n{env}\n\nbf16 matmul rate: {rate / 1e12:.1f} TFLOP/s"]

    def in_budget(what: str) -> bool:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results["skipped"].append(what)
            print(f"[{elapsed:.0f} s] skipped {what}: past --budget-s {args.budget_s:g}", flush=True)
            return False
        return True

    def save() -> None:
        results["seconds"] = time.perf_counter() - start
        write_json(out / "all.json", results)
        skipped = f"\n\nskipped (time budget): {results['skipped']}" if results["skipped"] else ""
        (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("\n\n".join(tables) + skipped + "\n")

    if "step" not in args.skip:
        for model_name, batch, length, steps in plan:
            if not in_budget(f"step {model_name} {batch}x{length}"):
                continue
            first = next(p for p in plan if p[0] == model_name) == (model_name, batch, length, steps)
            part = compare_step(args, device, rate, model_name, batch, length, args.steps or steps, with_fit=first)
            results[f"step/{model_name}/{batch}x{length}"] = part["rows"]
            tables.append(part["table"])
            save()
            print(f"[{time.perf_counter() - start:.0f} s] {model_name} {batch}x{length} done", flush=True)
    if "profile" not in args.skip and in_budget("profile"):
        model_name, batch, length = _spec(profile_spec, 3)
        part = _guarded(args, "profile", lambda: profile_step(args, device, model_name, batch, length))
        results["profile"] = part.get("summary")
        tables.append(part["table"])
        save()
    if "predict" not in args.skip and in_budget("predict"):
        (model_name,) = _spec(predict_model, 1)
        options = ["--model", model_name, "--device", args.device, "--precision", args.precision]
        options += [
            "--batch-sizes",
            *map(str, predict_batches),
            "--length",
            "16" if args.tiny else "128",
            "--samples",
            "15",
        ]
        options += ["--batches", "1" if args.tiny else "2", "--repeats", "1" if args.tiny else "2"]
        if args.model_path:
            options += ["--model-path", args.model_path]
        if not args.exact_svd:
            options += ["--fast-svd"]
        part = _guarded(args, "predict", lambda: predict_throughput.main(options))
        results["predict"] = part.get("rows")
        tables.append(part["table"])
        save()
    if "compile" not in args.skip and compile_spec and in_budget("compile"):
        model_name, batch, length = _spec(compile_spec, 3)
        steps = args.steps or 6
        part = compare_step(args, device, rate, model_name, batch, length, steps, compile=True, only=["four"])
        results[f"compile/{model_name}/{batch}x{length}"] = part["rows"]
        tables.append(part["table"])
    save()
    print(f"wrote {out}/summary.md and all.json in {results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
