"""``pyrolora diagnose RUN_DIR``: every diagnostic of a saved run, as a Markdown report with its pictures.

Writes into ``RUN_DIR/diagnostics`` (or the folder given)::

    report.md          the report: tables and the pictures below
    posterior.nc       the InferenceData (posterior, log_likelihood, posterior_predictive, observed_data)
    diagnostics.json   the numbers of the report
    elbo.png reliability.png forest.png spectrum.png uncertainty.png (the last for tasks with human labels)
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrolora._atomic import json_safe
from pyrolora.errors import ConfigError, RunFolderError
from pyrolora.runs.folder import CONFIG_FILE

__all__ = ["DiagnoseResult", "diagnose", "format_site_table", "guide_label", "report_columns"]


@dataclass
class DiagnoseResult:
    """What :func:`diagnose` wrote and measured."""

    out: Path
    report: Path
    netcdf: Path
    numbers: dict[str, Any]
    table: str
    images: dict[str, Path] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def format_site_table(frame: Any, max_rows: int = 12) -> str:
    """A Markdown table of :func:`~pyrolora.diagnostics.summaries.site_summary` (first ``max_rows`` sites)."""
    columns = list(frame.columns)
    lines = ["| site | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for site, row in frame.head(max_rows).iterrows():
        lines.append(f"| {site} | " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    if len(frame) > max_rows:
        lines.append(f"| ... {len(frame) - max_rows} more sites | " + " | ".join("" for _ in columns) + " |")
    return "\n".join(lines)


#: readable headers of :func:`~pyrolora.diagnostics.summaries.site_summary`'s columns
_HEADERS = {
    "entries": "entries",
    "mean_abs_mean": "mean abs E[R]",
    "mean_sd": "mean sd",
    "min_ess_bulk": "min bulk ESS",
    "min_ess_tail": "min tail ESS",
    "max_r_hat": "max R-hat",
}
_CHAIN_COLUMNS = ("min_ess_bulk", "min_ess_tail", "max_r_hat")


def guide_label(name: str, options: dict[str, Any] | None) -> str:
    """A readable name of a guide for titles and legends: ``lowrank (rank=2)``, never a dict repr."""
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


def report_columns(frame: Any, *, mcmc: bool) -> tuple[Any, str]:
    """The site table as the report shows it, and the sentence that says what its columns mean.

    For a variational guide (or SWAG, Laplace: anything whose draws are independent draws from a fitted
    distribution) R-hat and ESS are left out: they would only check that independent draws look independent
    (R-hat ≈ 1 and ESS ≈ the number of draws by construction, up to Monte Carlo noise), not that the fit
    converged. For MCMC chains they are the convergence diagnostics of Vehtari et al. (2021) and stay.
    Columns that do not apply (all NaN, or a standard deviation of 0 for a point mass) are hidden too.
    """
    keep = [c for c in frame.columns if mcmc or c not in _CHAIN_COLUMNS]
    keep = [c for c in keep if not frame[c].isna().all()]
    point_mass = "mean_sd" in keep and bool((frame["mean_sd"] == 0).all())
    if point_mass:
        keep.remove("mean_sd")
    shown = frame[keep].rename(columns=_HEADERS)
    if mcmc:
        note = (
            "Mean abs E[R] and mean sd over the r x r entries; the smallest bulk and tail ESS and the largest "
            "R-hat over them, from the sampler's own chains (MCMC convergence checks: R-hat near 1, ESS in the "
            "hundreds)."
        )
    else:
        note = (
            "Mean abs E[R] over the r x r entries"
            + ("" if point_mass else " and their mean posterior sd")
            + ". R-hat and ESS are not shown: the draws are independent draws from the fitted guide, so they "
            "would be near 1 and near the number of draws by construction and say nothing about whether the "
            "fit converged; for that see the ELBO trace, and the Pareto-k below for how well the guide matches "
            "the posterior."
        )
    return shown, note


def _write_text(path: Path, text: str) -> None:
    """Write text atomically: a temporary file beside ``path``, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def diagnose(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    split: str = "test",
    max_examples: int | None = 500,
    num_samples: int = 50,
    num_chains: int = 2,
    pareto_samples: int = 0,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> DiagnoseResult:
    """Load a run folder, compute every diagnostic and write the report, the pictures and the netCDF file.

    Args:
        run_dir: a folder written by ``pyrolora train`` (:func:`pyrolora.runs.build.save_run`).
        out: output folder; default ``run_dir/diagnostics``.
        split: the split of the run's task for calibration, log-likelihoods and predictive checks.
        max_examples: use the first ``max_examples`` examples of ``split`` (``None``: all). The
            log-likelihood costs ``num_chains · num_samples`` forward passes per example.
        num_samples: draws per chain for the InferenceData.
        num_chains: chains (independent guide draws split into chains; R-hat near 1 is expected).
        pareto_samples: S for the Pareto-k check of the guide (0 skips it). It costs S forward passes over the
            **whole training split** (see :mod:`pyrolora.diagnostics.summaries`).
        seed: seed of every draw.
        progress: progress bars.
        device: where the run is loaded and predicts (``"auto"``: CUDA when present); default the CPU.
    """
    import arviz as az

    from pyrolora.diagnostics import plots
    from pyrolora.diagnostics.convert import save_inference_data, to_inference_data
    from pyrolora.diagnostics.spectrum import covariance_spectrum
    from pyrolora.diagnostics.summaries import pareto_k, site_summary
    from pyrolora.evaluation.plots import reliability_diagram
    from pyrolora.runs.build import evaluate, load_run

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "diagnostics"
    started = time.perf_counter()
    run = load_run(run_dir, device=device)
    if split not in run.splits:
        raise ConfigError(f"unknown split {split!r}; the run's task has {sorted(run.splits)}.")
    data = run.splits[split]
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}.")
        data = data.subset(np.arange(min(max_examples, len(data))))
    out.mkdir(parents=True, exist_ok=True)
    guide_name = run.config.guide.name
    label = guide_label(guide_name, run.config.guide.options)
    images: dict[str, Path] = {}
    notes: list[str] = []

    evaluation = evaluate(run, data, seed=seed, progress=progress)
    images["reliability"] = reliability_diagram(
        {label: (evaluation.prediction.mean, evaluation.labels)},
        out / "reliability.png",
        n_bins=run.config.predict.n_bins,
        title=f"{split} split, first {len(data)} examples",
    )
    if run.fit_result is not None and run.fit_result.losses:
        images["elbo"] = plots.elbo_trace(
            run.fit_result.losses, out / "elbo.png", dataset_size=run.fit_result.dataset_size, title=f"ELBO: {label}"
        )
    else:
        notes.append("No ELBO trace: the run folder has no fit.json.")
    if data.human_probs is not None:
        images["uncertainty"] = plots.uncertainty_vs_disagreement(
            evaluation.prediction.mean, data.human_probs, out / "uncertainty.png"
        )

    idata = to_inference_data(
        run.model,
        run.guide,
        run.loader(data),
        num_samples=num_samples,
        num_chains=num_chains,
        seed=seed,
        progress=progress,
        attrs={"pyrolora_run": str(run_dir), "pyrolora_split": split},
    )
    netcdf = save_inference_data(idata, out / "posterior.nc")
    mcmc = callable(getattr(run.guide, "chain_samples", None))  # the sampler's own chains (NUTS)
    sites, site_note = report_columns(site_summary(idata), mcmc=mcmc)
    images["forest"] = plots.forest(idata, out / "forest.png")
    spectrum = covariance_spectrum(run.guide, run.model, seed=seed)
    images["spectrum"] = plots.spectrum_plot({label: spectrum}, out / "spectrum.png", title=f"posterior of {label}")

    numbers: dict[str, Any] = {
        "run": str(run_dir),
        "guide": guide_name,
        "guide_options": run.config.guide.options,
        "split": split,
        "num_examples": len(data),
        "num_chains": num_chains,
        "num_draws": num_samples,
        "num_latents": run.model.num_latents,
        "draws_are": "mcmc chains" if mcmc else "independent draws from the fitted guide",
        "metrics": evaluation.metrics,
        "spectrum": spectrum.to_dict(),
    }
    with warnings.catch_warnings(record=True) as caught:  # ArviZ warns on high pointwise k; we report k instead
        warnings.simplefilter("always")
        loo = az.loo(idata, pointwise=True)
        waic = az.waic(idata)
    pointwise_k = np.asarray(loo.pareto_k)
    k_threshold = float(loo.good_k)  # ArviZ's sample-size threshold min(1 - 1 / log10(S), 0.7) for S draws
    numbers["loo"] = {
        "elpd_loo": float(loo.elpd_loo),
        "se": float(loo.se),
        "p_loo": float(loo.p_loo),
        "k_threshold": k_threshold,
        "share_pointwise_k_above_threshold": float((pointwise_k > k_threshold).mean()),
    }
    numbers["waic"] = {"elpd_waic": float(waic.elpd_waic), "se": float(waic.se), "p_waic": float(waic.p_waic)}
    for w in caught:
        notes.append(f"ArviZ: {w.message}")
    if pareto_samples:
        try:
            numbers["pareto_k"] = pareto_k(
                run.model, run.guide, run.loader("train"), num_samples=pareto_samples, seed=seed, progress=progress
            ).to_dict()
        except ConfigError as err:
            numbers["pareto_k"] = {"skipped": str(err)}
    else:
        numbers["pareto_k"] = {"skipped": "pareto_samples=0 (it costs S forward passes over the training split)"}
    numbers["seconds"] = time.perf_counter() - started

    table = format_site_table(sites)
    report = out / "report.md"
    _write_text(report, _markdown(numbers, table, site_note, images, notes, len(sites)))
    _write_text(out / "diagnostics.json", json.dumps(json_safe(numbers), indent=2, default=str, allow_nan=False) + "\n")
    return DiagnoseResult(out=out, report=report, netcdf=netcdf, numbers=numbers, table=table, images=images)


def _markdown(
    numbers: dict[str, Any], table: str, site_note: str, images: dict[str, Path], notes: list[str], num_sites: int
) -> str:
    m, s, loo, pk = numbers["metrics"], numbers["spectrum"], numbers["loo"], numbers["pareto_k"]
    shares = ", ".join(f"top {k.split('_')[-1]}: {v:.3f}" for k, v in s.items() if k.startswith("share_top_"))
    columns = [("accuracy", "accuracy"), ("ECE", "ece"), ("NLL", "nll"), ("Brier", "brier")]
    rho = m.get("spearman_human_disagreement")
    if rho is not None and not (isinstance(rho, float) and math.isnan(rho)):  # only tasks with rater labels
        columns.append(("Spearman vs human disagreement", "spearman_human_disagreement"))
    draws = "MCMC draws" if numbers["draws_are"] == "mcmc chains" else "independent draws from the guide"
    lines = [
        f"# Diagnostics of `{numbers['run']}`",
        "",
        f"Guide `{guide_label(numbers['guide'], numbers['guide_options'])}` over D = {numbers['num_latents']} latents "
        f"({num_sites} adapter sites). Split `{numbers['split']}`, first {numbers['num_examples']} examples; "
        f"{numbers['num_chains'] * numbers['num_draws']} {draws}.",
        "",
        "## Predictive performance",
        "",
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|---" * len(columns) + "|",
        "| " + " | ".join(f"{m[key]:.3f}" for _, key in columns) + " |",
        "",
        f"PSIS-LOO: elpd {loo['elpd_loo']:.2f} (SE {loo['se']:.2f}), p_loo {loo['p_loo']:.2f}; share of examples "
        f"with pointwise k above {loo['k_threshold']:.2f} (ArviZ's threshold for "
        f"{numbers['num_chains'] * numbers['num_draws']} draws, min(1 - 1/log10 S, 0.7)): "
        f"{loo['share_pointwise_k_above_threshold']:.3f}. WAIC: elpd "
        f"{numbers['waic']['elpd_waic']:.2f} (SE {numbers['waic']['se']:.2f}).",
        "",
    ]
    if "elbo" in images:
        lines += ["## ELBO trace", "", "![ELBO trace](elbo.png)", ""]
    lines += ["## Calibration", "", "![reliability diagram](reliability.png)", ""]
    if "uncertainty" in images:
        lines += ["## Uncertainty against human rater disagreement", "", "![uncertainty](uncertainty.png)", ""]
    lines += [
        "## Posterior summary per site",
        "",
        site_note,
        "",
        table,
        "",
        "![forest plot](forest.png)",
        "",
        "## Covariance spectrum",
        "",
        f"Source: {s['source']} covariance. Total variance {s['total_variance']:.4g}; effective rank "
        f"{s['effective_rank']:.2f} (participation ratio {s['participation_ratio']:.2f}) out of "
        f"{s['dimension']}. Share of variance in the {shares}.",
        "",
        "![covariance spectrum](spectrum.png)",
        "",
        "## Pareto-k of the guide (Yao et al. 2018)",
        "",
    ]
    if "k" in pk:
        lines.append(
            f"k = {pk['k']:.3f} from {pk['num_samples']} draws (threshold {pk['threshold']:.2f}): **{pk['verdict']}**; "
            f"importance-sampling ESS {pk['ess']:.1f}. k < 0.5: the guide is close to the posterior; up to the "
            "threshold: usable; above: the guide's moments are not reliable posterior estimates."
        )
    else:
        lines.append(f"Skipped: {pk['skipped']}. Run `pyrolora diagnose RUN_DIR --pareto-samples 100` to compute it.")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def check_run_dir(run_dir: str | Path) -> Path:
    """Raise :class:`RunFolderError` early when ``run_dir`` is not a run folder."""
    path = Path(run_dir)
    if not (path / CONFIG_FILE).is_file():
        raise RunFolderError(f"{path} is not a pyrolora run folder (no {CONFIG_FILE}); make one with `pyrolora train`.")
    return path
