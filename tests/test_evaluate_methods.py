"""`pyrolora evaluate RUN_DIR` for the run folder of every method `pyrolora train` writes, and shifted data from
another split (--ood-split) or another task (--ood-task), on tiny saved models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.data import ClassificationSplit
from pyrolora.data.mcqa import MultipleChoiceSplit
from pyrolora.errors import RunFolderError
from pyrolora.evaluation.uncertainty import uncertainty_report
from pyrolora.runs.report import UNCERTAINTY_FILE, evaluate_uncertainty
from pyrolora.runs.trained import load_trained, shifted_data
from tests.conftest import write_mcqa_folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A 2-layer BERT (hidden dropout 0.1, so MC dropout has masks) and a 2-layer Llama causal LM (no dropout),
    both with the real all-MiniLM-L6-v2 tokenizer, saved as model folders."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from pyrolora.models.backbones import resolve_model

    folder = tmp_path_factory.mktemp("evaluate-models")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    v = len(tokenizer)
    builds = {
        "bert": lambda: BertModel(
            BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
        ),
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=v, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
            )
        ),
    }  # fmt: skip
    models = {}
    for key, build in builds.items():
        torch.manual_seed(0)
        build().save_pretrained(folder / key)
        tokenizer.save_pretrained(folder / key)
        models[key] = str(folder / key)
    return models


def _tsv_task(folder: Path) -> Path:
    folder.mkdir()
    rows = [f"{['good', 'bad'][i % 2]} film number {i}\t{i % 2}\n" for i in range(48)]
    (folder / "train.tsv").write_text("text\tlabel\n" + "".join(rows), encoding="utf-8")
    (folder / "dev.tsv").write_text("text\tlabel\n" + "".join(rows[:12]), encoding="utf-8")
    return folder


METHODS = {  # method -> (guide, S of the per-sample probabilities evaluate uses)
    "bayesian": ("lowrank", 3),
    "mc_dropout": ("delta", 3),
    "ensemble": ("delta", 2),  # 2 members, each its own (point-mass) BMA mean
    "peft_lora": ("delta", 1),  # one point estimate
}


def _write_config(path: Path, model: str, data: Path, method: str, guide: str) -> Path:
    path.write_text(
        f'[model]\nname = "{model}"\nmax_length = 16\n'
        f'[task]\nname = "tsv"\npath = "{data}"\ntext_columns = ["text"]\nlabel_column = "label"\nlabels = ["0", "1"]\n'
        f'[adapters]\nrank = 2\n[guide]\nname = "{guide}"\n[train]\nepochs = 1\nbatch_size = 16\n'
        f'[predict]\nnum_samples = 3\n[method]\nname = "{method}"\nensemble_size = 2\nlora_rank = 2\n'
        'lora_targets = ["query"]\n',
        encoding="utf-8",
    )
    return path


def _printed_metrics(output: str) -> dict:
    return json.loads(output[output.index("{") : output.index("}") + 1])


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluate_reproduces_the_training_metrics_of_every_method(tmp_path, tiny_models, method):
    guide, num_samples = METHODS[method]
    data = _tsv_task(tmp_path / "data")
    config = _write_config(tmp_path / "run.toml", tiny_models["bert"], data, method, guide)
    out = tmp_path / "run"
    runner = CliRunner()
    trained_cli = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert trained_cli.exit_code == 0, trained_cli.output
    expected = json.loads((out / "result.json").read_text())["metrics"]["test"] if method != "bayesian" else None
    if expected is None:
        expected = json.loads((out / "metrics.json").read_text())["test"]
    result = runner.invoke(app, ["evaluate", str(out), "--uncertainty"])
    assert result.exit_code == 0, result.output
    printed = _printed_metrics(result.output)
    for key in ("accuracy", "ece", "nll", "brier"):
        # the same S draws / masks / members (seed 0) on the same batches: equal up to float32 summation order
        assert printed[key] == pytest.approx(expected[key], abs=1e-5), key
    saved = json.loads((out / UNCERTAINTY_FILE).read_text())
    assert saved["num_samples"] == num_samples and saved["num_examples"] == 12 and saved["ood_source"] is None
    assert saved["method"].startswith(f"run ({method}")
    probs = load_trained(out).probs("test")
    assert probs.shape == (num_samples, 12, 2)
    if method == "mc_dropout":  # dropout is on at prediction: the 3 masks give 3 different predictions
        assert (probs.std(0) > 1e-4).any()
    if method == "ensemble":  # two members trained with different seeds disagree somewhere
        assert (probs[0] - probs[1]).abs().max() > 1e-4


def test_incomplete_or_foreign_folders_fail_with_a_clear_message(tmp_path, tiny_models):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunFolderError, match=r"no config\.json"):
        load_trained(empty)
    assert "not a folder" in runner.invoke(app, ["evaluate", str(tmp_path / "nowhere")]).output
    interrupted = tmp_path / "interrupted"  # `pyrolora train` writes config.json first, the manifest last
    interrupted.mkdir()
    (interrupted / "config.json").write_text(json.dumps({"method": {"name": "mc_dropout"}}), encoding="utf-8")
    with pytest.raises(RunFolderError, match="not saved completely"):
        load_trained(interrupted)
    data = _tsv_task(tmp_path / "data")
    for method in ("ensemble", "peft_lora"):
        config = _write_config(tmp_path / f"{method}.toml", tiny_models["bert"], data, method, "delta")
        out = tmp_path / method
        assert runner.invoke(app, ["train", "--config", str(config), "--out", str(out)]).exit_code == 0
    (tmp_path / "ensemble" / "member-1" / "manifest.json").unlink()
    broken = runner.invoke(app, ["evaluate", str(tmp_path / "ensemble")])
    assert broken.exit_code == 2 and "member-1 is missing or incomplete" in broken.output
    from safetensors.torch import load_file, save_file

    state_file = tmp_path / "peft_lora" / "peft_lora.safetensors"
    state = load_file(str(state_file))
    save_file({k: v for k, v in state.items() if "classifier" not in k}, str(state_file))  # the head is missing
    with pytest.raises(RunFolderError, match=r"peft_lora\.safetensors is (truncated|altered|corrupt)"):
        load_trained(tmp_path / "peft_lora")  # the manifest's checksum catches it before the model is built
    state_file.unlink()
    with pytest.raises(RunFolderError, match=r"peft_lora\.safetensors is listed in the manifest but missing"):
        load_trained(tmp_path / "peft_lora")
    both = runner.invoke(app, ["evaluate", str(tmp_path / "ensemble"), "--ood-split", "x", "--ood-task", "cola"])
    assert both.exit_code == 2 and "one source of shifted data" in both.output


def test_peft_lora_state_holds_the_head_and_reloads_to_the_same_predictions(tmp_path, tiny_models):
    from pyrolora.runs.build import load_task
    from pyrolora.runs.config import RunConfig
    from pyrolora.runs.folder import PEFT_LORA_FILE
    from pyrolora.runs.runner import fit_and_predict

    data = _tsv_task(tmp_path / "data")
    config = RunConfig.from_dict(
        {
            "model": {"name": tiny_models["bert"], "max_length": 16},
            "task": {"name": "tsv", "path": str(data), "text_columns": ["text"], "labels": ["0", "1"]},
            "adapters": {"rank": 2},
            "guide": {"name": "delta"},
            "train": {"epochs": 1, "batch_size": 16, "head_lr": 0.1},
            "method": {"name": "peft_lora", "lora_rank": 2, "lora_targets": ["query"]},
        }
    )
    out = fit_and_predict(config, load_task(config.task), device="cpu", progress=False, out=tmp_path / "run")
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "run" / PEFT_LORA_FILE)))
    assert any(n.startswith("classifier.") for n in names) and any("lora_A" in n for n in names)
    again = load_trained(tmp_path / "run").probs("test")
    # the same weights on the same batches: equal up to nothing (float32, identical computation)
    torch.testing.assert_close(again[0], out["probs"]["test"], rtol=0, atol=1e-6)


def test_evaluate_uncertainty_pads_multiple_choice_options_that_one_side_lacks():
    split = MultipleChoiceSplit(
        questions=("q1", "q2"), choices=(("a", "b", "c"), ("a", "b", "c")), labels=np.array([0, 1]), num_options=3
    )
    shifted = MultipleChoiceSplit(
        questions=("o",), choices=(("a", "b", "c", "d"),), labels=np.array([0]), num_options=4
    )

    def probs_fn(data):
        c = data.num_options
        return torch.full((2, len(data), c), 1.0 / c)  # uniform over each question's options

    report = evaluate_uncertainty(probs_fn, split, shifted)
    # total entropy of a uniform distribution over k options is log k; a zero-probability padded option adds 0
    assert report["decomposition"]["in"]["total_entropy"] == pytest.approx(np.log(3), abs=1e-6)
    assert report["decomposition"]["out"]["total_entropy"] == pytest.approx(np.log(4), abs=1e-6)
    assert report["scores"]["entropy"]["auroc"] == 1.0  # the 4-option question is the more uncertain one


def test_ood_split_of_the_same_task_is_stored_and_equals_the_library_report(tmp_path, tiny_models):
    data = _tsv_task(tmp_path / "data")
    config = _write_config(tmp_path / "run.toml", tiny_models["bert"], data, "bayesian", "diagonal")
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--config", str(config), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["evaluate", str(out), "--split", "test", "--ood-split", "validation"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / UNCERTAINTY_FILE).read_text())
    assert saved["ood_source"] == {
        "kind": "split",
        "task": "tsv",
        "split": "validation",
        "num_examples": 5,
        "limit": None,
    }
    assert saved["num_ood_examples"] == 5  # 10% of 48 training rows carved off as validation, rounded
    trained = load_trained(out)
    expected = uncertainty_report(
        trained.probs("test"), trained.splits["test"].labels, ood_probs=trained.probs("validation")
    )
    for score, values in expected["scores"].items():
        # the same 3 posterior draws (seed 0) on the same batches: equal up to float32 summation order
        assert saved["scores"][score]["auroc"] == pytest.approx(values["auroc"], abs=1e-6)
    same = runner.invoke(app, ["evaluate", str(out), "--split", "test", "--ood-split", "test"])
    assert same.exit_code == 2 and "must be another split" in same.output
    qa = runner.invoke(app, ["evaluate", str(out), "--ood-task", "arc_easy"])
    assert qa.exit_code == 2 and "different kind of task" in qa.output


def test_cola_in_domain_against_out_of_domain_dev(tmp_path, tiny_models, data_dir):
    config = tmp_path / "cola.toml"
    config.write_text(
        f'[model]\nname = "{tiny_models["bert"]}"\nmax_length = 64\n'
        f'[task]\nname = "cola"\ndata_dir = "{data_dir}"\nmax_train = 48\nmax_eval = 20\n'
        '[adapters]\nrank = 2\n[guide]\nname = "delta"\n[train]\nepochs = 1\nbatch_size = 16\n'
        '[predict]\nnum_samples = 2\n[method]\nname = "mc_dropout"\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    runner = CliRunner()
    trained_cli = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert trained_cli.exit_code == 0, trained_cli.output
    args = ["evaluate", str(out), "--split", "in_domain", "--ood-split", "out_of_domain", "--ood-limit", "15"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / UNCERTAINTY_FILE).read_text())
    assert saved["split"] == "in_domain" and saved["ood"] == "cola:out_of_domain"
    assert saved["ood_source"]["kind"] == "split" and saved["ood_source"]["limit"] == 15
    assert saved["num_examples"] == 20 and saved["num_ood_examples"] == 15 and saved["num_samples"] == 2
    assert 0 <= saved["scores"]["mutual_information"]["auroc"] <= 1


def test_mc_dropout_on_llama_qa_through_adapter_dropout_and_ood_task(tmp_path, tiny_models, data_dir):
    folder = write_mcqa_folder(tmp_path / "qa")
    base = (
        f'[model]\nname = "{tiny_models["llama"]}"\nmax_length = 48\n'
        f'[task]\nname = "mcqa"\npath = "{folder}"\ndata_dir = "{data_dir}"\nmax_eval = 10\n'
        '[guide]\nname = "delta"\n[train]\nepochs = 1\nbatch_size = 8\n[predict]\nnum_samples = 3\nbatch_size = 8\n'
        '[method]\nname = "mc_dropout"\n'
    )
    runner = CliRunner()
    refused = tmp_path / "refused.toml"
    refused.write_text(base + '[adapters]\nrank = 2\ntarget_modules = ["q_proj", "v_proj"]\n', encoding="utf-8")
    no_dropout = runner.invoke(app, ["train", "--config", str(refused), "--out", str(tmp_path / "refused")])
    # Llama has no dropout of its own: refused before any training, with the fix in the message
    assert no_dropout.exit_code == 2 and "[adapters] dropout = 0.1" in no_dropout.output
    assert not (tmp_path / "refused" / "result.json").exists()
    config = tmp_path / "qa.toml"
    config.write_text(
        base + '[adapters]\nrank = 2\ntarget_modules = ["q_proj", "v_proj"]\ndropout = 0.1\n', encoding="utf-8"
    )
    out = tmp_path / "run"
    trained_cli = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert trained_cli.exit_code == 0, trained_cli.output
    trained = load_trained(out)
    probs = trained.probs("test")  # (3, 6, 4): three adapter-dropout masks
    assert probs.shape == (3, 6, 4) and (probs.std(0) > 1e-5).any()
    result = runner.invoke(app, ["evaluate", str(out), "--ood-task", "openbookqa"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / UNCERTAINTY_FILE).read_text())
    assert saved["ood_source"] == {
        "kind": "task",
        "task": "openbookqa",
        "split": "test",
        "num_examples": 10,
        "limit": None,
    }
    assert saved["num_ood_examples"] == 10 and saved["num_samples"] == 3  # max_eval = 10 of the run's config
    ood, _ = shifted_data(trained, "test", ood_task="openbookqa")
    assert isinstance(ood, MultipleChoiceSplit) and ood.num_options == 4
    expected = uncertainty_report(probs, trained.splits["test"].labels, ood_probs=trained.probs(ood))
    # the same 3 masks (seed 0) on the same batches: equal up to float32 summation order
    assert saved["scores"]["mutual_information"]["auroc"] == pytest.approx(
        expected["scores"]["mutual_information"]["auroc"], abs=1e-6
    )


def test_shifted_data_from_another_classification_task_keeps_only_its_texts(monkeypatch):
    """--ood-task on a classification run: the other task's test texts, relabelled as placeholders."""
    import pyrolora.runs.trained as module
    from pyrolora.runs.config import RunConfig

    other = ClassificationSplit(texts=("x", "y", "z"), labels=np.array([2, 1, 0]), label_names=("a", "b", "c"))
    monkeypatch.setattr(module, "load_task", lambda spec: {"test": other})
    own = ClassificationSplit(texts=("t",), labels=np.array([1]), label_names=("neg", "pos"))

    from types import SimpleNamespace

    stub = SimpleNamespace(config=RunConfig.from_dict({"task": {"name": "sst2"}}), splits={"test": own}, task="sst2")
    data, source = shifted_data(stub, "test", ood_task="cola", limit=2)
    assert source == {"kind": "task", "task": "cola", "split": "test", "num_examples": 2, "limit": 2}
    assert data.label_names == ("neg", "pos") and set(data.texts) <= {"x", "y", "z"} and len(data) == 2
    assert (data.labels == 0).all()  # placeholders: OOD labels are never scored


# max_length 16 keeps the run tiny; truncating the longer SST-2 and CoLA sentences is intended here
@pytest.mark.filterwarnings("ignore::pyrolora.errors.TruncationWarning")
@pytest.mark.parametrize("method", ["ensemble", "peft_lora"])
def test_another_task_and_another_tasks_texts_as_shifted_data(tmp_path, tiny_models, data_dir, method):
    data = _tsv_task(tmp_path / "data")
    config = _write_config(tmp_path / "run.toml", tiny_models["bert"], data, method, "delta")
    out = tmp_path / "run"
    runner = CliRunner()
    env = {"PYROLORA_DATA": str(data_dir)}
    assert runner.invoke(app, ["train", "--config", str(config), "--out", str(out)]).exit_code == 0
    args = ["evaluate", str(out), "--task", "sst2", "--ood-task", "cola", "--ood-limit", "30"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    printed = _printed_metrics(result.output)
    saved = json.loads((out / UNCERTAINTY_FILE).read_text())
    assert printed["num_examples"] == saved["num_examples"] == 872  # the whole SST-2 dev file
    assert saved["task"] == "sst2" and saved["ood"] == "cola:test" and saved["num_ood_examples"] == 30
    assert saved["ood_source"] == {"kind": "task", "task": "cola", "split": "test", "num_examples": 30, "limit": 30}
    trained = load_trained(out)
    trained.use_task("sst2")
    probs = trained.probs("test")
    assert probs.shape == (2 if method == "ensemble" else 1, 872, 2)
    # the CLI's numbers are those of the loader's probabilities: same batches, same computation (float32 rounding)
    assert printed["nll"] == pytest.approx(
        -torch.log(probs.mean(0)[torch.arange(872), trained.splits["test"].labels]).mean().item(), abs=1e-5
    )
