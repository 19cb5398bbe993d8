"""The command line: ``pyrolora demo | train | evaluate | export | merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pyrolora.errors import PyroloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Bayesian LoRA-XS with Pyro.")


def _dumps(data, **options) -> str:
    """Valid JSON for the terminal: NaN or infinite numbers print as null."""
    from pyrolora._atomic import json_safe

    return json.dumps(json_safe(data), allow_nan=False, **options)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


_DEVICE_HELP = "Device: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N."


def _echo_device(device: str | None, default: str = "auto") -> str:
    """Resolve ``device`` (or ``default``), print it, and return its name."""
    from pyrolora.runs.device import resolve_device

    where = str(resolve_device(device if device is not None else default))
    typer.echo(f"device: {where}", err=True)
    return where


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder for runs, metrics.json and reliability.png.")] = Path(
        "runs/demo"
    ),
    epochs: Annotated[float | None, typer.Option(help="Override the number of training epochs.")] = None,
) -> None:
    """Train LoRA-XS MAP and B-LoRA-XS on the embedded VADER task with all-MiniLM-L6-v2 and compare them."""
    from pyrolora.runs.demo import DEMO_CONFIG, run_demo

    try:
        _echo_device(DEMO_CONFIG.train.device)
        run_demo(out, epochs=epochs)
    except PyroloraError as err:
        _fail(err)


@app.command("train")
def train_cmd(
    config: Annotated[
        list[Path],
        typer.Option(
            "--config",
            help="Run configuration (.toml or .json); repeat it to lay overlays over a base (later files win).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Optimizer steps between checkpoints in --out.")
    ] = 100,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP + " Default: [train] device.")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace what --out holds (a run or other files); the old contents stay until the new run is "
            "complete.",
        ),
    ] = False,
) -> None:
    """Train a run of any method from a configuration, evaluate it on its evaluation splits and save it.

    Training writes a checkpoint into --out every --checkpoint-every steps; after a crash or kill, the same
    command with --resume continues from it to the result an uninterrupted run gives. The checkpoint is removed
    once the run folder is completely saved.

    --out must be new or empty, or hold the unfinished run that --resume continues; anything else is refused
    unless --overwrite is given. The folder is locked while training: a second training into it is refused.
    """
    from pyrolora._outfolder import training_folder
    from pyrolora.inference.distributed import is_main_process
    from pyrolora.runs.config import load_config
    from pyrolora.runs.runner import run_method

    try:
        parsed = load_config(*config)
        where = _echo_device(device, parsed.train.device)
        # --out is checked and locked before anything is written; an overwrite trains beside it and swaps it in
        with training_folder(out, overwrite=overwrite, resume=resume) as target:
            result = run_method(parsed, out=target, device=where, checkpoint_every=checkpoint_every, resume=resume)
    except PyroloraError as err:
        _fail(err)
    if is_main_process():  # under torchrun every process holds the same metrics; one prints them
        typer.echo(_dumps(result["metrics"].get("test", result["metrics"]), indent=2))
        typer.echo(
            f"{result['method']} on {result['device']}: trained in {result['train_seconds']:.1f} s, predicted in "
            f"{result['predict_seconds']:.1f} s; {result['trainable_params']} trainable, {result['stored_params']} "
            "stored parameters"
        )
        typer.echo(f"saved to {out}")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train` (any method).")],
    split: Annotated[str, typer.Option(help="Split of the run's task to evaluate.")] = "test",
    ood: Annotated[
        Path | None,
        typer.Option(
            "--ood",
            help="Shifted data for OOD detection: .txt (one text a line), .tsv (header column 'sentence' or "
            "'text') or .jsonl; implies --uncertainty.",
        ),
    ] = None,
    ood_column: Annotated[int | None, typer.Option(help="0-based text column of an --ood TSV without header.")] = None,
    ood_limit: Annotated[int | None, typer.Option(help="Seeded random subset of at most this many OOD texts.")] = None,
    uncertainty: Annotated[
        bool,
        typer.Option(
            "--uncertainty",
            help="Also report the uncertainty decomposition, selective prediction (AURC), OOD detection "
            "(AUROC, AUPR) and agreement with raters; stores uncertainty.json and accuracy_coverage.png in RUN_DIR.",
        ),
    ] = False,
    task: Annotated[
        str | None, typer.Option(help="Evaluate on this other task's splits (distribution shift), e.g. openbookqa.")
    ] = None,
    ood_split: Annotated[
        str | None,
        typer.Option(
            "--ood-split",
            help="Shifted data from another split of the evaluated task, e.g. out_of_domain against --split "
            "in_domain (CoLA); implies --uncertainty.",
        ),
    ] = None,
    ood_task: Annotated[
        str | None,
        typer.Option(
            "--ood-task",
            help="Shifted data from another task's test split, e.g. openbookqa for an ARC-Easy run (same kind of "
            "task; labels unused); implies --uncertainty.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
) -> None:
    """Load a saved run of any method and evaluate it on one split of its task (or of another task with --task).

    Bayesian runs average S posterior draws, MC dropout runs S dropout masks, ensembles their members, peft LoRA
    is one point estimate.
    """
    from pyrolora.errors import ConfigError
    from pyrolora.runs.trained import load_trained, split_metrics

    try:
        if sum(x is not None for x in (ood, ood_split, ood_task)) > 1:
            raise ConfigError("give one source of shifted data: --ood FILE, --ood-split NAME or --ood-task NAME.")
        ood_texts = None
        if ood is not None:
            from pyrolora.data.texts import load_texts

            ood_texts = load_texts(ood, column=ood_column, limit=ood_limit)  # fail on a bad file before predicting
        trained = load_trained(run_dir, progress=True, device=_echo_device(device))
        if task is not None:
            trained.use_task(task)
        if split not in trained.splits:
            raise typer.BadParameter(f"unknown split {split!r}; the task has {sorted(trained.splits)}")
        data = trained.splits[split]
        probs = trained.probs(data)  # (S, N, C)
        result = split_metrics(probs.mean(0), data, trained.config.predict.n_bins)
    except PyroloraError as err:
        _fail(err)
    typer.echo(_dumps(result, indent=2))
    if uncertainty or ood_texts is not None or ood_split is not None or ood_task is not None:
        _report_uncertainty(
            trained,
            run_dir,
            split,
            probs,
            ood,
            ood_texts,
            ood_split,
            ood_task,
            ood_column=ood_column,
            ood_limit=ood_limit,
        )


def _report_uncertainty(trained, run_dir, split, probs, ood, ood_texts, ood_split, ood_task, **ood_options) -> None:
    """The uncertainty part of `evaluate`: predict on the shifted data, compute, print and store the report."""
    from pyrolora.data.texts import unlabelled_split
    from pyrolora.evaluation.uncertainty import format_uncertainty_table
    from pyrolora.runs.report import evaluate_uncertainty, save_uncertainty
    from pyrolora.runs.trained import shifted_data

    try:
        data = trained.splits[split]
        shifted, source = None, None
        if ood_texts is not None:
            shifted = unlabelled_split(ood_texts[0], data.label_names, ood_texts[1])
            source = {"kind": "file", "path": str(ood), **ood_options, "num_examples": len(shifted)}
        elif ood_split is not None or ood_task is not None:
            limit = ood_options["ood_limit"]
            shifted, source = shifted_data(trained, split, ood_split=ood_split, ood_task=ood_task, limit=limit)
        report = evaluate_uncertainty(trained.probs, data, shifted, probs=probs)
        method = trained.description
        described = None if source is None else (str(ood) if ood is not None else f"{source['task']}:{source['split']}")
        info = {"method": method, "task": trained.task, "split": split, "ood": described, "ood_source": source}
        if ood is not None:
            info.update(ood_options)
        json_path, plot_path = save_uncertainty(report, run_dir, title=method, info=info)
    except PyroloraError as err:
        _fail(err)
    parts = report["decomposition"]
    typer.echo("\nmean uncertainty (nats): " + _dumps(parts))
    typer.echo(format_uncertainty_table({method: report}))
    typer.echo(f"saved {json_path} and {plot_path}")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train`.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter folder (mean/median) or folder of draws (sample).")],
    which: Annotated[
        str, typer.Option(help="mean or median of the posterior (one adapter; median of delta = MAP), or sample.")
    ] = "median",
    num_samples: Annotated[int, typer.Option("--num-samples", help="Posterior draws S for --which sample.")] = 15,
    seed: Annotated[int, typer.Option(help="Seed of the posterior draws.")] = 0,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
) -> None:
    """Export a run's posterior as standard peft LoRA adapters (one point, or S named draws)."""
    from pyrolora.runs.export import export_run

    try:
        where = _echo_device(device)
        folders = export_run(run_dir, out, which=which, num_samples=num_samples, seed=seed, device=where)  # type: ignore[arg-type]
    except PyroloraError as err:
        _fail(err)
    typer.echo(f"wrote {len(folders)} peft LoRA adapter(s) to {out}")


@app.command("merge")
def merge_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train`.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the merged transformers model.")],
    which: Annotated[str, typer.Option(help="Posterior point to merge: mean or median.")] = "median",
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
) -> None:
    """Save a plain transformers model with the adapters folded in at one posterior point."""
    from pyrolora.runs.export import merge_run

    try:
        merge_run(run_dir, out, which=which, device=_echo_device(device))  # type: ignore[arg-type]
    except PyroloraError as err:
        _fail(err)
    typer.echo(f"saved the merged model to {out}")


@app.command("diagnose")
def diagnose_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default RUN_DIR/diagnostics).")] = None,
    split: Annotated[str, typer.Option(help="Split for calibration and log-likelihoods.")] = "test",
    max_examples: Annotated[int, typer.Option(help="First N examples of the split (0: all).")] = 500,
    num_samples: Annotated[int, typer.Option(help="Posterior draws per chain.")] = 50,
    num_chains: Annotated[int, typer.Option(help="Chains of guide draws.")] = 2,
    pareto_samples: Annotated[
        int, typer.Option(help="Draws for the guide's Pareto-k (0 skips; costs S passes over the train split).")
    ] = 0,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
) -> None:
    """Write a diagnostics report (Markdown with pictures) and the posterior as netCDF; print a summary."""
    from pyrolora.runs.diagnose import check_run_dir, diagnose

    try:
        check_run_dir(run_dir)
        result = diagnose(
            run_dir,
            out,
            split=split,
            max_examples=max_examples or None,
            num_samples=num_samples,
            num_chains=num_chains,
            pareto_samples=pareto_samples,
            device=_echo_device(device),
        )
    except PyroloraError as err:
        _fail(err)
    n = result.numbers
    typer.echo(result.table)
    typer.echo(
        f"\naccuracy {n['metrics']['accuracy']:.3f}  ECE {n['metrics']['ece']:.3f}  NLL {n['metrics']['nll']:.3f}  "
        f"elpd_loo {n['loo']['elpd_loo']:.2f}  effective rank {n['spectrum']['effective_rank']:.2f} "
        f"of {n['spectrum']['dimension']}"
    )
    typer.echo(f"wrote {result.report} and {result.netcdf}")


if __name__ == "__main__":
    app()
