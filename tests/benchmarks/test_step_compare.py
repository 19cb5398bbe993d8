"""The like-for-like step benchmark of issue 21 runs end to end at tiny sizes on the CPU, with the rows it promises."""

import json

import pytest
from benchmarks.common import SHAPES, build_backbone

from benchmarks import step_compare


def test_equal_budget_rank_matches_peft_parameters_over_the_same_modules():
    backbone = build_backbone(SHAPES["tiny-llama"], device="cpu")
    # q_proj (32 -> 32) and v_proj (32 -> 16, grouped-query) in 2 layers: peft r=2 has 2 * 2 * (64 + 48) = 448
    # parameters, so M r_b^2 = 4 r_b^2 ~ 448 gives r_b = round(sqrt(112)) = 11
    assert step_compare.equal_budget_rank(backbone, ("q_proj", "v_proj"), 2) == 11
    assert step_compare.equal_budget_rank(backbone, ("q_proj", "v_proj"), 64) == 16  # capped at min(in, out)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_step_compare_runs_tiny_on_cpu_and_reports_every_method(tmp_path):
    results = step_compare.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--precision",
            "float32",
            "--models",
            "tiny-bert",
            "--strict",
            "--out",
            str(tmp_path),
        ]
    )
    rows = results["step/tiny-bert/4x16"]
    methods = {(r["targets"], r["compare"], r["method"]) for r in rows}
    for targets in ("qv", "four"):
        assert {(targets, "equal rank", m) for m in ("peft-lora", "lora-xs-map", "b-lora-xs-svi")} <= methods
        assert {(targets, "equal budget", m) for m in ("lora-xs-map", "b-lora-xs-svi")} <= methods
    assert {("four", "equal rank", "b-lora-xs-svi-fit"), ("four", "equal rank", "b-lora-xs-svi-before")} <= methods
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] > 0
        assert len(r["step_times_ms"]) == 2  # the tiny plan's timed steps
    peft = {r["targets"]: r for r in rows if r["method"] == "peft-lora"}
    assert all(r["x_peft"] == 1.0 for r in peft.values())
    xs = {(r["targets"], r["method"], r["compare"]): r for r in rows}
    # equal rank: the LoRA-XS latents are r^2 per module against peft's r (in + out); 2 layers x 2 or 4 modules
    assert xs[("qv", "lora-xs-map", "equal rank")]["adapter_params"] == 4 * 16 * 16
    assert peft["qv"]["adapter_params"] == 4 * 16 * (32 + 32)
    # equal budget: the rank is capped at the width 32 of tiny-bert, so D = M 32^2 equals peft's 4 x 16 x 64
    assert xs[("qv", "lora-xs-map", "equal budget")]["adapter_params"] == peft["qv"]["adapter_params"]
    svi = xs[("qv", "b-lora-xs-svi", "equal rank")]
    assert svi["trainable"] - xs[("qv", "lora-xs-map", "equal rank")]["trainable"] == 3 * 4 * 16 * 16  # K + 2 = 4
    assert [p["method"] for p in results["profile"]] == [
        "peft-lora",
        "lora-xs-map",
        "b-lora-xs-svi",
        "b-lora-xs-svi-before",
    ]
    assert results["predict"][0]["samples_per_pass"] == 15 and results["predict"][0]["examples_per_s"] > 0
    assert results["skipped"] == []
    summary = (tmp_path / "summary.md").read_text()
    assert "| four | equal rank | b-lora-xs-svi |" in summary and "#### profile: b-lora-xs-svi," in summary
    assert json.loads((tmp_path / "all.json").read_text())["args"]["tiny"] is True
    assert not list(tmp_path.glob("*trace*"))  # no profiler traces unless --trace-dir is given
