"""Interoperability on the real all-MiniLM-L6-v2 weights: a trained run folder out to peft, merged, and back.

A run is trained for a few steps with CSV and TensorBoard logs on, its posterior location is then moved away
from the origin (a few steps barely move R, and an export test at R ≈ 0 could not fail), and it is saved.
The command line exports that run folder, the API merges it; peft and transformers must reproduce pyrolora's logits.
"""

import copy
import csv
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from pyrolora import guides, predict
from pyrolora.adapters.peft_format import unwrapped_copy
from pyrolora.cli import app
from pyrolora.inference.interop import export_peft, import_peft, merge_to_pretrained, point_latents
from pyrolora.models.backbones import DEFAULT_MODEL, load_sequence_classifier
from pyrolora.runs.build import load_task, save_run, train
from pyrolora.runs.config import RunConfig
from pyrolora.runs.tracking import CSV_NAME, TENSORBOARD_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# float32 through six BERT layers: peft's lora_B(lora_A(x)) against pyrolora's B((s R)(A x)), or one merged
# matmul against three small ones; the logits differ by float32 reassociation only (measured 4e-8).
ATOL = 1e-5

CONFIG = RunConfig().replace(
    model={"max_length": 16},
    adapters={"rank": 4, "target_modules": ["query", "value", "attention.output.dense", "output.dense"]},
    train={"epochs": 0.03, "batch_size": 32},  # 5 steps
    log={"csv": True, "tensorboard": True},
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, real_model_threads):
    folder = tmp_path_factory.mktemp("minilm") / "run"
    splits = load_task(CONFIG.task)
    splits["validation"] = splits["validation"].subset(range(128))  # a short validation at the last step
    run = train(CONFIG, progress=False, splits=splits, log_dir=folder)
    torch.manual_seed(1)
    with torch.no_grad():
        run.guide.loc.add_(0.2 * torch.randn_like(run.guide.loc))  # away from R ≈ 0 (see the module docstring)
    save_run(run, folder)
    test = run.splits["test"].subset(range(48))
    inputs, _ = next(iter(run.loader(test)))
    values = point_latents(run.model, run.guide, "median")
    with torch.no_grad():
        expected = run.model.outputs(inputs, values)
        at_zero = run.model.outputs(inputs, run.model.adapters.zeros())
    assert (expected - at_zero).abs().max() > 100 * ATOL  # the adapters matter at this point
    return folder, run, inputs, expected


def _cli(*args):
    """The command line, in process (a subprocess would import torch and transformers again)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_training_logs_are_in_the_run_folder(saved):
    folder, run, _, _ = saved
    with open(folder / CSV_NAME, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, run.fit_result.num_steps + 1))
    assert [float(r["loss"]) for r in rows] == run.fit_result.losses
    assert [float(r["lr"]) for r in rows] == run.fit_result.learning_rates
    assert 0.0 <= float(rows[-1]["val_accuracy"]) <= 1.0 and float(rows[-1]["val_nll"]) > 0
    assert all(r["val_accuracy"] == "" for r in rows[:-1])  # validation_every = 0: only after the last step
    assert any(p.name.startswith("events.out.tfevents") for p in (folder / TENSORBOARD_DIR).iterdir())


def test_cli_export_of_the_median_reloads_in_peft(saved, tmp_path):
    folder, _, inputs, expected = saved
    _cli("export", folder, "--out", tmp_path / "adapter", "--which", "median")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == config["lora_alpha"] == 4
    base = load_sequence_classifier(DEFAULT_MODEL, 2, seed=123)  # another fresh head: the adapter brings its own
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "adapter")(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_exported_draws_reproduce_the_bayesian_model_average(saved, tmp_path):
    _, run, inputs, _ = saved
    prediction = predict(run.model, run.guide, [(inputs, None)], num_samples=3, seed=5)
    folders = export_peft(run.model, run.guide, tmp_path / "draws", which="sample", num_samples=3, seed=5)
    base = unwrapped_copy(run.model.backbone)  # the pretrained weights, without loading them from disk again
    server = PeftModel.from_pretrained(base, folders[0], adapter_name="d0")
    probs = []
    with torch.no_grad():
        for i, folder in enumerate(folders):
            if i:
                server.load_adapter(folder, adapter_name=f"d{i}")
            server.set_adapter(f"d{i}")
            probs.append(server(**inputs).logits.softmax(-1))
    torch.testing.assert_close(torch.stack(probs), prediction.probs, atol=ATOL, rtol=0)


def test_merged_model_reloads_as_a_plain_transformers_model(saved, tmp_path):
    _, run, inputs, expected = saved
    # the API behind `pyrolora merge` (which only adds load_run, exercised by the export test above)
    merge_to_pretrained(run.model, run.guide, tmp_path / "merged", tokenizer=run.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id  # the tokenizer travels with the model


def test_import_into_a_fresh_model_reproduces_the_exported_point(saved, tmp_path):
    _, run, inputs, expected = saved
    export_peft(run.model, run.guide, tmp_path / "adapter")
    model = copy.deepcopy(run.model)
    with torch.no_grad():
        for p in model.head_parameters():
            p.normal_(0.0, 0.02)  # a fresh head: the adapter brings the trained one
    guide = guides.make("delta", model)  # another guide family
    report = import_peft(model, guide, tmp_path / "adapter")
    assert report.exact() and report.head_loaded, report
    with torch.no_grad():
        got = model.outputs(inputs, point_latents(model, guide, "median"))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
