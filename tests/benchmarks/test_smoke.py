"""The benchmark scripts run end to end at tiny sizes on the CPU, so that they do not rot between GPU runs."""

import json

import pytest

from benchmarks import run_gpu


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_the_gpu_entry_runs_at_tiny_sizes_on_cpu(tmp_path):
    results = run_gpu.main(["--device", "cpu", "--tiny", "--models", "tiny-bert", "--out", str(tmp_path)])
    train = {r["method"]: r for r in results["tiny-bert"]["train"]}
    assert set(train) == {"peft-lora-r8", "lora-xs-map", "b-lora-xs-svi", "b-lora-xs-svi-pyro"}
    for row in train.values():
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["flops_per_step"] > 0 and 0 < row["mfu"]
    assert train["lora-xs-map"]["ratio_to_map"] == 1.0 and train["peft-lora-r8"]["ratio_to_peft"] == 1.0
    # the lowrank guide stores D (K + 2) numbers with K = 2, the point mass D: SVI trains ~4x the latents of MAP
    head = train["lora-xs-map"]["trainable"] - 8 * 16 * 16  # 2 layers x 4 modules, r = 16
    assert train["b-lora-xs-svi"]["trainable"] == 4 * 8 * 16 * 16 + head
    predict = results["tiny-bert"]["predict"]
    assert [r["batch"] for r in predict] == [2, 8]
    assert all(r["samples_per_pass"] == 15 and r["speedup"] > 0 for r in predict)
    saved = json.loads((tmp_path / "train_tiny-bert.json").read_text())
    assert saved["rows"][0]["method"] == "peft-lora-r8"
    summary = (tmp_path / "summary.md").read_text()
    assert "| b-lora-xs-svi |" in summary and "| batch | samples_per_pass |" in summary
