"""The diagnose report on a variational run: no unlabelled R-hat / ESS, ArviZ's sample-size Pareto-k threshold."""

import json
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.diagnostics.summaries import pareto_k_threshold
from pyrolora.runs.diagnose import guide_label, report_columns


def arviz_threshold(num_draws: int) -> float:
    """ArviZ's own sample-size-dependent k threshold, read off a PSIS-LOO of ``num_draws`` draws."""
    rng = np.random.default_rng(0)
    idata = az.from_dict(
        posterior={"x": rng.normal(size=(1, num_draws))},
        log_likelihood={"obs": rng.normal(size=(1, num_draws, 5))},
    )
    with warnings.catch_warnings():  # random log-likelihoods give high pointwise k, which ArviZ warns about
        warnings.simplefilter("ignore", UserWarning)
        return float(az.loo(idata).good_k)


@pytest.mark.parametrize("num_draws", [20, 40, 100, 10_000])
def test_the_guide_pareto_k_threshold_is_arviz_own(num_draws):
    # the same formula in both: equal to float rounding
    assert pareto_k_threshold(num_draws) == pytest.approx(arviz_threshold(num_draws), abs=1e-12)


def test_chain_columns_are_kept_only_for_mcmc_and_empty_columns_are_hidden():
    frame = pd.DataFrame(
        {"entries": [4], "mean_abs_mean": [0.1], "mean_sd": [0.2], "min_ess_bulk": [30.0], "min_ess_tail": [25.0],
         "max_r_hat": [1.1]},
        index=["site"],
    )  # fmt: skip
    vi, note = report_columns(frame, mcmc=False)
    assert list(vi.columns) == ["entries", "mean abs E[R]", "mean sd"] and "not shown" in note
    chains, note = report_columns(frame, mcmc=True)
    assert "max R-hat" in chains.columns and "MCMC convergence" in note
    point = frame.assign(mean_sd=0.0, min_ess_bulk=np.nan, min_ess_tail=np.nan, max_r_hat=np.nan)
    assert list(report_columns(point, mcmc=True)[0].columns) == ["entries", "mean abs E[R]"]
    assert guide_label("lowrank", {"rank": 2, "init_scale": 0.05}) == "lowrank (init_scale=0.05, rank=2)"


@pytest.mark.slow
def test_diagnose_on_a_lowrank_run_labels_chain_statistics_and_uses_the_sample_size_threshold(tmp_path, tiny_model_dir):
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{words[i % 6]} film {i},{i % 6 < 3}\n" for i in range(60)))
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = {{ name = "tsv", path = "{data}" }}\n[model]\nname = "{tiny_model_dir}"\nmax_length = 12\n'
        '[adapters]\nrank = 2\n[guide]\nname = "lowrank"\noptions = { rank = 2 }\n'
        "[train]\nepochs = 1\nbatch_size = 16\n[predict]\nnum_samples = 2\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    # S = 2 chains x 20 draws = 40 (ArviZ's threshold ~0.38 there, not 0.7); Pareto-k of the guide from 40 draws
    args = ["diagnose", str(run), "--num-samples", "20", "--num-chains", "2", "--pareto-samples", "40"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = run / "diagnostics"
    report = (out / "report.md").read_text()
    numbers = json.loads((out / "diagnostics.json").read_text())
    expected = arviz_threshold(40)
    assert expected < 0.5  # the point: far below the fixed 0.7
    assert numbers["loo"]["k_threshold"] == pytest.approx(expected, abs=1e-12)
    assert numbers["pareto_k"]["threshold"] == pytest.approx(expected, abs=1e-12)
    assert f"k above {expected:.2f}" in report and "0.7:" not in report
    # R-hat and ESS appear only in the sentence that says why they are not shown, in the report and on stdout
    for text in (report, result.output):
        for line in text.splitlines():
            if "R-hat" in line or "ESS" in line:
                assert "not shown" in line or "importance-sampling ESS" in line, line
    assert "| site | entries | mean abs E[R] | mean sd |" in report
    # no dict reprs in titles or text, and no column for human disagreement on a task without rater labels
    assert "{'" not in report and "lowrank (rank=2)" in report and "Spearman" not in report
