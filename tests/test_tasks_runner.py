"""Every method through one runner and the CLI: a GLUE-style task from a config alone, the benchmark grid."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.runs.config import load_config
from tests.conftest import write_mcqa_folder

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module():
    spec = importlib.util.spec_from_file_location("bench_tasks", ROOT / "benchmarks" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_config_is_valid():
    files = sorted((ROOT / "configs").glob("*.toml"))
    # 6 tasks x 6 methods (the sixth: SWAG); on the QA tasks MC dropout uses adapter dropout (Llama has none)
    assert len(files) == 36
    methods = {load_config(f).method.name for f in files}
    assert methods == {"bayesian", "mc_dropout", "ensemble", "peft_lora"}
    assert {load_config(f).guide.name for f in files if f.stem.endswith("-swag")} == {"swag"}
    qa_mc = [load_config(f) for f in files if f.stem.endswith("-mc-dropout") and "smollm2" in load_config(f).model.name]
    assert len(qa_mc) == 3 and all(c.adapters.dropout == 0.1 and c.method.name == "mc_dropout" for c in qa_mc)


@pytest.mark.slow
def test_cli_trains_an_ensemble_on_a_tsv_task_described_only_by_its_config(tmp_path):
    models = benchmark_module().prepare_models("tiny", tmp_path / "models", None, None, [])
    data = tmp_path / "data"
    data.mkdir()
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [f"{words[i % 6]} movie {i}\t{'pos' if i % 6 < 3 else 'neg'}\n" for i in range(60)]
    (data / "train.tsv").write_text("text\tstars\n" + "".join(rows), encoding="utf-8")
    (data / "dev.tsv").write_text("text\tstars\n" + "".join(rows[:12]), encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
[model]
name = "{models["bert"]}"
max_length = 16
[task]
name = "tsv"
path = "{data}"
text_columns = ["text"]
label_column = "stars"
labels = ["neg", "pos"]
[adapters]
rank = 2
[guide]
name = "delta"
[train]
epochs = 2
batch_size = 16
[predict]
num_samples = 2
[method]
name = "ensemble"
ensemble_size = 2
""",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    members = [json.loads((out / f"member-{i}" / "metrics.json").read_text())["test"] for i in range(2)]
    assert summary["metrics"]["test"]["num_examples"] == 12
    # -log is convex: the NLL of averaged probabilities is at most the members' mean NLL (Jensen), up to rounding
    assert summary["metrics"]["test"]["nll"] <= np.mean([m["nll"] for m in members]) + 1e-6
    single = json.loads((out / "member-0" / "config.json").read_text())
    # 2 members x (D = 2 layers x 2 sites (query, value) x r² with r = 2, plus the head 16 x 2 + 2)
    assert summary["stored_params"] == 2 * (2 * 2 * 2**2 + 16 * 2 + 2)
    assert single["method"]["name"] == "bayesian"


def test_confidence_intervals_match_their_textbook_values():
    bench = benchmark_module()
    mean, half = bench.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)  # t(0.975, 2) = 4.303
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.full((400, 2), 0.5)
    probs[np.arange(400), labels] = np.where(rng.random(400) < 0.5, 0.6, 0.4)  # 50% accurate
    probs[np.arange(400), 1 - labels] = 1 - probs[np.arange(400), labels]  # rows of probabilities sum to 1
    half = bench.bootstrap(probs, labels, "accuracy", 15, reps=400)
    # normal approximation 1.96·sqrt(0.25/400) = 0.049; bootstrap noise with 400 resamples is about ±0.005
    assert half == pytest.approx(0.049, abs=0.008)


@pytest.mark.slow
# the tiny size caps inputs at 32 tokens; truncating the few longer SST-2 sentences is intended there
@pytest.mark.filterwarnings("ignore::pyrolora.errors.TruncationWarning")
def test_benchmark_grid_runs_end_to_end_at_tiny_size(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PYROLORA_DATA", str(data_dir))  # the grid's workers find the data through the variable
    bench = benchmark_module()
    args = ["--size", "tiny", "--tasks", "sst2,arc_easy", "--seeds", "2", "--device", "cpu", "--out", str(tmp_path)]
    report = bench.main([*args, "--methods", ",".join(bench.METHOD_LABELS)])  # every method, SWAG included
    rows = report["rows"]
    # every method on both tasks: on QA (tiny Llama, no dropout layers) MC dropout trains with adapter dropout
    assert set(rows) == {f"{t}/{m}" for t in ("sst2", "arc_easy") for m in bench.METHOD_LABELS}
    for row in rows.values():
        assert row["num_seeds"] == 2 and np.isfinite(row["test"]["nll"]["ci95"])
        assert 0 <= row["test"]["accuracy"]["mean"] <= 1
    for task in ("sst2", "arc_easy"):
        delta = rows[f"{task}/lora_xs"]["stored_params"]
        assert rows[f"{task}/ensemble"]["stored_params"] == 2 * delta  # tiny ensembles have 2 members
        assert rows[f"{task}/mc_dropout"]["stored_params"] == delta  # the same MAP numbers, dropout adds none
        # MiniLM-style: the MAP runs' extra dropout passes (no training); QA: its own MAP runs with adapter dropout
        assert (rows[f"{task}/mc_dropout"]["train_seconds"] == 0) == (task == "sst2")
        assert rows[f"{task}/blora_xs"]["stored_params"] > delta  # lowrank stores μ, L (K = 2) and d
        assert rows[f"{task}/swag"]["stored_params"] > delta  # SWAG stores the mean, second moment and deviations
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and " ± " in table  # header, separator, one line per row
    assert json.loads((tmp_path / "results.json").read_text())["size"] == "tiny"


@pytest.mark.slow
def test_cli_trains_multiple_choice_and_evaluates_on_another_task(tmp_path, data_dir):
    models = benchmark_module().prepare_models("tiny", tmp_path / "models", None, None, [])
    folder = write_mcqa_folder(tmp_path / "qa", n_train=30)
    config = tmp_path / "qa.toml"
    config.write_text(
        f'[model]\nname = "{models["llama"]}"\nmax_length = 48\n'
        f'[task]\nname = "mcqa"\npath = "{folder}"\nmax_eval = 20\n'
        '[adapters]\nrank = 2\ntarget_modules = ["q_proj", "v_proj"]\n'
        '[guide]\nname = "lowrank"\n[train]\nepochs = 1\nbatch_size = 8\n[predict]\nnum_samples = 2\nbatch_size = 8\n',
        encoding="utf-8",
    )
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["test"]["num_examples"] == 6
    shifted = runner.invoke(app, ["evaluate", str(out), "--task", "arc_easy"], env={"PYROLORA_DATA": str(data_dir)})
    assert shifted.exit_code == 0, shifted.output
    metrics = json.loads(shifted.output[shifted.output.index("{") :])
    assert metrics["num_examples"] == 20 and 0 <= metrics["accuracy"] <= 1  # max_eval of the run's config
    wrong = runner.invoke(app, ["evaluate", str(out), "--task", "sst2"], env={"PYROLORA_DATA": str(data_dir)})
    assert wrong.exit_code == 2 and "different kind of task" in wrong.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,guide", [("bayesian", "lowrank"), ("bayesian", "delta"), ("mc_dropout", "delta"), ("peft_lora", "delta")]
)
def test_fit_and_predict_keeps_the_per_sample_probabilities_of_every_split_including_unlabelled_ones(
    tmp_path, method, guide
):
    from pyrolora.data.texts import unlabelled_split
    from pyrolora.runs.build import load_task
    from pyrolora.runs.config import RunConfig
    from pyrolora.runs.runner import fit_and_predict

    models = benchmark_module().prepare_models("tiny", tmp_path / "models", None, None, [])
    data = tmp_path / "data"
    data.mkdir()
    rows = [f"{['good', 'bad'][i % 2]} film {i}\t{i % 2}\n" for i in range(40)]
    (data / "train.tsv").write_text("text\tlabel\n" + "".join(rows), encoding="utf-8")
    (data / "dev.tsv").write_text("text\tlabel\n" + "".join(rows[:10]), encoding="utf-8")
    config = RunConfig.from_dict(
        {
            "model": {"name": models["bert"], "max_length": 16},
            "task": {
                "name": "tsv",
                "path": str(data),
                "text_columns": ["text"],
                "label_column": "label",
                "labels": ["0", "1"],
            },
            "adapters": {"rank": 2},
            "guide": {"name": guide},
            "train": {"epochs": 1, "batch_size": 16},
            "predict": {"num_samples": 3},
            "method": {"name": method, "lora_rank": 2, "lora_targets": ["query"]},
        }
    )
    splits = load_task(config.task)
    splits["shifted"] = unlabelled_split(["an unrelated sentence", "words"], splits["test"].label_names)
    out = fit_and_predict(config, splits, device="cpu", progress=False, also_mc_dropout=method == "bayesian")
    # peft LoRA and the MAP are point estimates: one draw (S copies of one model would only add float noise)
    expected_s = 1 if method == "peft_lora" or (method, guide) == ("bayesian", "delta") else 3
    for name, n in (("test", 10), ("shifted", 2)):
        assert out["samples"][name].shape == (expected_s, n, 2)
        # the mean over S is what the metrics use; the same tensor, so only float rounding may differ
        torch.testing.assert_close(out["probs"][name], out["samples"][name].mean(0), rtol=0, atol=1e-7)
    if method == "mc_dropout":  # different dropout masks give different predictions (the tiny BERT has p = 0.1)
        assert (out["samples"]["test"].std(0) > 0).any()
    if method == "bayesian":  # the same model's MC-dropout passes still take S masks, the MAP's included
        assert out["mc_dropout_samples"]["shifted"].shape == (3, 2, 2)


def test_the_long_size_is_the_full_sst2_setting_with_the_papers_rows_and_epochs():
    bench = benchmark_module()
    models = {"minilm": "m", "smollm2": "s"}
    full, long = bench.task_config("sst2", "full", models), bench.task_config("sst2", "long", models)
    assert long["task"]["max_train"] == 4000 and long["train"]["epochs"] == 20  # the paper's long-training regime
    changed = {k for k in full if full[k] != long[k]}
    assert changed == {"task", "train"}  # model, adapters, prior, predict and baselines as at full size
    assert {k for k in full["train"] if full["train"][k] != long["train"][k]} == {"epochs"}
    with pytest.raises(ValueError, match="sst2 only"):
        bench.task_config("rte", "long", models)


def test_swag_frequency_override_leaves_the_shipped_guide_options_alone():
    bench = benchmark_module()
    assert bench.guide_of("swag", 7)["options"] == {"rank": 20, "start": 0.5, "frequency": 7}
    assert bench.guide_of("swag") == {"name": "swag", "options": {"rank": 20, "start": 0.5}}  # the guide's default
    assert bench.guide_of("blora_xs", 7) == {"name": "lowrank", "options": {"rank": 2}}  # only SWAG has a frequency


def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path):
    bench = benchmark_module()
    jobs = [{"task": "t", "kind": "k", "seed": s} for s in range(3)]

    def worker(job):
        if job["seed"] == 1:
            raise RuntimeError("out of memory")
        return {**job, "wall_seconds": 0.0, "probs": [0.5]}

    errors = []
    done = bench.execute(
        jobs, 0, None, tmp_path / "jobs.jsonl", 0.0, worker, on_error=lambda j, e: errors.append((j, e))
    )
    assert [d["seed"] for d in done] == [0, 2]
    assert errors[0][0]["seed"] == 1 and "out of memory" in str(errors[0][1])
    lines = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert [line["seed"] for line in lines] == [0, 2] and "probs" not in lines[0]  # the log leaves probabilities out
    with pytest.raises(RuntimeError, match="out of memory"):  # without on_error a failure stops the run
        bench.execute(jobs, 0, None, tmp_path / "jobs.jsonl", 0.0, worker)


def test_svi_probe_methods_change_only_their_own_settings():
    from argparse import Namespace

    bench = benchmark_module()
    models = {"minilm": "m", "smollm2": "s", "bert": "b", "llama": "l"}
    args = Namespace(
        tasks=["sst2"], size="full", seeds=1, methods=["blora_xs", "blora_xs_init", "blora_xs_anneal"],
        swag_frequency=None, device="cpu", threads=1, autocast=False,
    )  # fmt: skip
    jobs = {j["kind"]: j["config"] for j in bench.make_jobs(args, models)}
    base = jobs["lowrank"]
    assert jobs["lowrank_init"]["guide"]["options"] == {"rank": 2, "init_scale": 0.005}
    assert jobs["lowrank_anneal"]["train"] == {**base["train"], "kl_warmup": 0.5}
    # everything else is the task's setting, so a difference in the table is the probe's alone
    for kind in ("lowrank_init", "lowrank_anneal"):
        assert {k: v for k, v in jobs[kind].items() if k not in ("guide", "train")} == {
            k: v for k, v in base.items() if k not in ("guide", "train")
        }
