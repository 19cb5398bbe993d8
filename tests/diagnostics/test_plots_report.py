"""Pictures are written and not empty; ``pyrolora diagnose`` works on a folder written by ``pyrolora train``."""

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from pyrolora.diagnostics import Spectrum, load_inference_data, to_inference_data
from pyrolora.diagnostics.plots import elbo_trace, forest, spectrum_plot, uncertainty_vs_disagreement
from pyrolora.errors import ConfigError
from tests.diagnostics.test_convert import _setup


def _inked(path) -> float:
    """Share of pixels that are not white: a blank figure has only its frame and labels (< 2%)."""
    image = matplotlib.image.imread(path)[..., :3]
    return float((image.mean(-1) < 0.95).mean())


def test_every_plot_writes_a_non_empty_picture(tmp_path):
    rng = np.random.default_rng(0)
    losses = 1.0 / np.arange(1, 201) + 0.05 * rng.random(200)
    assert _inked(elbo_trace(losses * 500, tmp_path / "elbo.png", dataset_size=500)) > 0.02
    spectra = {
        "lowrank K=2": Spectrum(torch.tensor([4.0, 2.0, *[0.1] * 14], dtype=torch.float64), "fitted"),
        "draws": Spectrum(torch.tensor([3.0, 1.0, 0.5, *[0.0] * 13], dtype=torch.float64), "empirical", 4),
    }
    assert _inked(spectrum_plot(spectra, tmp_path / "spectrum.png")) > 0.02
    probs = rng.dirichlet([1, 1], size=300)
    human = rng.dirichlet([2, 2], size=300)
    assert _inked(uncertainty_vs_disagreement(probs, human, tmp_path / "uncertainty.png")) > 0.02
    model, _ = _setup()
    draws = {s: torch.randn(2, 50, 2, 2) for s in model.site_names}
    idata = to_inference_data(model, draws=draws)
    assert _inked(forest(idata, tmp_path / "forest.png", max_entries=2)) > 0.02
    with pytest.raises(ConfigError, match="unknown sites"):
        forest(idata, tmp_path / "x.png", sites=["nope"])
    with pytest.raises(ConfigError, match="empty"):
        elbo_trace([], tmp_path / "x.png")


@pytest.mark.slow
def test_cli_diagnose_on_a_trained_run_folder(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[model]\nmax_length = 12\n[adapters]\nrank = 2\ntarget_modules = ["query"]\n'
        '[guide]\nname = "lowrank"\noptions = { rank = 2 }\n[train]\nepochs = 0.05\nbatch_size = 64\n'
        "[predict]\nnum_samples = 2\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    train = [sys.executable, "-m", "pyrolora", "train", "--config", str(config), "--out", str(run)]
    result = subprocess.run(train, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    diagnose = [sys.executable, "-m", "pyrolora", "diagnose", str(run), "--max-examples", "40", "--num-samples", "8"]
    result = subprocess.run(diagnose, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "bert.encoder.layer.0.attention.self.query" in result.stdout and "effective rank" in result.stdout
    out = run / "diagnostics"
    report = (out / "report.md").read_text()
    for picture in ("elbo", "reliability", "uncertainty", "forest", "spectrum"):
        assert f"({picture}.png)" in report
        assert _inked(out / f"{picture}.png") > 0.02, picture
    idata = load_inference_data(out / "posterior.nc")
    assert set(idata.groups()) == {"posterior", "log_likelihood", "posterior_predictive", "observed_data"}
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 8
    assert idata.log_likelihood["obs"].shape == (2, 8, 40)
    numbers = json.loads((out / "diagnostics.json").read_text())
    assert numbers["spectrum"]["source"] == "fitted" and numbers["spectrum"]["dimension"] == 6 * 4
    assert np.isfinite(numbers["loo"]["elpd_loo"]) and "skipped" in numbers["pareto_k"]

    bad = subprocess.run(
        [sys.executable, "-m", "pyrolora", "diagnose", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "not a pyrolora run folder" in bad.stderr
