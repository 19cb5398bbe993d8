"""The OOD / uncertainty benchmark: every shift pair and method in one run, at tiny size on the CPU."""

import csv
import json

import numpy as np
import pytest

from benchmarks import ood


def test_ensemble_and_mc_dropout_probabilities_come_from_the_right_runs():
    rng = np.random.default_rng(0)

    def probs(s, n=4, c=3):
        p = rng.random((s, n, c)) + 0.1
        return p / p.sum(-1, keepdims=True)

    runs = {
        ("delta", seed): {"samples": {"test": probs(1), "shifted": probs(1)}} for seed in range(4)
    }  # MAP runs with S = 1
    runs[("delta", 0)]["mc_dropout_samples"] = {"test": probs(5), "shifted": probs(5)}
    inside, shifted = ood.method_samples("ensemble", "sst2_cola", 1, runs, members=3)
    # ensemble of seed 1 = MAP seeds 1, 2, 3 stacked as its samples (M = 3), in that order
    assert inside.shape == (3, 4, 3) and shifted.shape == (3, 4, 3)
    np.testing.assert_array_equal(inside[2], runs[("delta", 3)]["samples"]["test"][0])
    assert ood.method_samples("ensemble", "sst2_cola", 2, runs, members=3) is None  # seed 4 has not run
    mc = ood.method_samples("mc_dropout", "sst2_cola", 0, runs, members=3)
    np.testing.assert_array_equal(mc[1], runs[("delta", 0)]["mc_dropout_samples"]["shifted"])
    assert ood.method_samples("mc_dropout", "sst2_cola", 1, runs, members=3) is None  # no dropout passes there
    assert ood.method_samples("swag", "sst2_cola", 0, runs, members=3) is None


def test_first_seed_adds_later_seeds_and_the_ensemble_members_they_need():
    import argparse

    models = {"minilm": "minilm", "smollm2": "smollm2"}  # only the plan is built, nothing is loaded
    configs = {p: ood.pair_config(p, "full", models) for p in ("sst2_cola", "arc_obqa")}
    args = argparse.Namespace(
        pairs=list(configs), methods=list(ood.METHODS), seeds=2, first_seed=1, swag_frequency=None,
        size="full", device=None, threads=1, autocast=False,
    )  # fmt: skip
    jobs = ood.make_jobs(args, configs, {"sst2_cola": True, "arc_obqa": False})
    seeds = {(j["pair"], j["kind"]): sorted(x["seed"] for x in jobs if (x["pair"], x["kind"]) == (j["pair"], j["kind"]))
             for j in jobs}  # fmt: skip
    members = configs["sst2_cola"]["method"]["ensemble_size"]
    # seeds 1 and 2 of every method; the MAP runs also complete the ensembles of seeds 1 and 2 (seeds 1 .. 2 + M - 1)
    assert (
        seeds[("sst2_cola", "lora")] == seeds[("sst2_cola", "lowrank")] == seeds[("arc_obqa", "mc_dropout")] == [1, 2]
    )
    assert seeds[("sst2_cola", "delta")] == list(range(1, 2 + members))
    # the encoder's MC-dropout passes ride on the MAP runs of the table's seeds only
    assert sorted(j["seed"] for j in jobs if j["mc_dropout"]) == [1, 2]
    assert all(not j["mc_dropout"] for j in jobs if j["pair"] == "arc_obqa")


def test_the_shifted_cola_sentences_are_the_fourth_column_of_the_raw_file(data_dir, monkeypatch):
    from pyrolora.runs.config import RunConfig

    monkeypatch.setenv("PYROLORA_DATA", str(data_dir))
    models = {"minilm": "minilm"}  # only the task part of the configuration is used here
    splits = ood.pair_splits("sst2_cola", RunConfig.from_dict(ood.pair_config("sst2_cola", "full", models)), "full")
    with (data_dir / "glue/cola/raw/out_of_domain_dev.tsv").open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    assert splits["shifted"].texts == tuple(r[3].strip() for r in rows)  # headerless: every row is a sentence
    assert set(splits) == {"train", "validation", "test", "shifted"}  # only in-distribution and shifted predicted


@pytest.mark.slow
# the tiny size caps inputs at 32 tokens; truncating the few longer shifted sentences is intended there
@pytest.mark.filterwarnings("ignore::pyrolora.errors.TruncationWarning")
def test_every_pair_and_method_at_tiny_size_and_runs_merged_into_one_table(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PYROLORA_DATA", str(data_dir))
    tiny = ["--size", "tiny", "--seeds", "2"]
    # one run with three pairs (MiniLM-style and Llama-style backbones together), one with the fourth, then merged
    one = ood.main([*tiny, "--pairs", "vader_sst2,sst2_cola,arc_obqa", "--device", "cpu", "--out", str(tmp_path / "a")])
    assert {r["pair"] for r in one["rows"].values()} == {"vader_sst2", "sst2_cola", "arc_obqa"}
    second = ood.main([*tiny, "--pairs", "cola_in_out", "--device", "cpu", "--out", str(tmp_path / "b")])
    merge = ",".join(str(tmp_path / d) for d in ("a", "b"))
    report = ood.main([*tiny, "--summarize-only", "--merge", merge, "--out", str(tmp_path / "all")])
    rows = report["rows"]
    # the merged table holds exactly the rows the two runs computed
    assert {k: r["cells"] for k, r in rows.items()} == {
        k: r["cells"] for run in (one, second) for k, r in run["rows"].items()
    }
    # every pair has every method: the tiny Llama has no dropout layer, so its MC dropout row comes from MAP runs
    # trained with adapter dropout (its own jobs) instead of the MAP runs' dropout passes
    assert report["skipped"] == {}
    assert set(rows) == {f"{p}/{m}" for p in ood.PAIRS for m in ood.METHODS}
    kinds = [(r["pair"], r["kind"]) for r in ood.load_results(tmp_path / "a")]
    assert kinds.count(("arc_obqa", "mc_dropout")) == 2 and ("sst2_cola", "mc_dropout") not in kinds
    # samples per model: peft LoRA and the MAP are point estimates (one draw, also where the MAP's run makes the
    # MC-dropout passes), the tiny ensemble has 2 members, and MC dropout, B-LoRA-XS and SWAG draw the tiny S = 3
    expected_s = {"lora": 1, "lora_xs": 1, "ensemble": 2, "mc_dropout": 3, "blora_xs": 3, "swag": 3}
    for key, row in rows.items():
        assert row["num_seeds"] == 2 and len(row["per_seed"]) == 2
        seed0 = row["per_seed"][0]
        assert seed0["num_samples"] == expected_s[row["method"]], key
        assert seed0["num_examples"] == 24 and seed0["num_ood_examples"] == 24  # the tiny size's limits
        assert row["cells"]["acc"]["ci95"] is not None  # two seeds: a t-interval
        assert 0 <= row["cells"]["AUROC H ↑"]["mean"] <= 1
        if row["method"] in ("lora", "lora_xs"):
            # a point estimate has no epistemic part: MI exactly 0, a constant score, so AUROC exactly 0.5
            assert seed0["decomposition"]["in"]["mutual_information"] == 0.0
            assert seed0["scores"]["mutual_information"]["auroc"] == 0.5
        # rater disagreement exists only on VADER
        has_raters = "spearman_human_disagreement" in seed0["scores"]["entropy"]
        assert has_raters == (row["pair"] == "vader_sst2"), key
    table = (tmp_path / "all" / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and " ± " in table  # header, separator, one line per row
    saved = json.loads((tmp_path / "all" / "results.json").read_text())
    assert saved["jobs_finished"] == 38  # 4 pairs x (2 LoRA, 3 MAP, 2 lowrank, 2 SWAG) + 2 adapter-dropout MAPs
    assert one["jobs_finished"] == one["jobs_planned"] == 29 and second["jobs_finished"] == 9


def test_the_committed_ood_table_is_what_the_committed_runs_give(tmp_path, data_dir, monkeypatch):
    # the README's table: rebuilt from the per-run samples under benchmarks/results/ood/raw with the command that
    # results.json records (no model is needed); a changed metric, sample file or merge order changes a cell
    import shlex
    from pathlib import Path

    results = Path(__file__).parents[2] / "benchmarks/results/ood"
    monkeypatch.setenv("PYROLORA_DATA", str(data_dir))
    monkeypatch.chdir(results.parents[2])
    argv = shlex.split(json.loads((results / "results.json").read_text(encoding="utf-8"))["command"])[2:]
    argv[argv.index("--out") + 1] = str(tmp_path)
    ood.main(argv)
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == (results / "table.md").read_text(encoding="utf-8")
