"""The command line: ``pyrolora demo | train | evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pyrolora.errors import PyroloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Bayesian LoRA-XS with Pyro.")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder for runs, metrics.json and reliability.png.")] = Path(
        "runs/demo"
    ),
    epochs: Annotated[float | None, typer.Option(help="Override the number of training epochs.")] = None,
) -> None:
    """Train LoRA-XS MAP and B-LoRA-XS on the embedded VADER task with all-MiniLM-L6-v2 and compare them."""
    from pyrolora.demo import run_demo

    try:
        run_demo(out, epochs=epochs)
    except PyroloraError as err:
        _fail(err)


@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Option("--config", help="Run configuration (.toml or .json).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
) -> None:
    """Train a run from a configuration file, evaluate it on the test split and save it."""
    from pyrolora.config import load_config
    from pyrolora.experiment import evaluate, save_run, train

    try:
        run = train(load_config(config))
        evaluation = evaluate(run, "test", progress=True)
        run.metrics = {"test": evaluation.metrics}
        save_run(run, out)
    except PyroloraError as err:
        _fail(err)
    from pyrolora.inference.distributed import is_main_process

    if is_main_process():  # under torchrun every process holds the same metrics; one prints them
        typer.echo(json.dumps(evaluation.metrics, indent=2))
        typer.echo(f"saved to {out}")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train`.")],
    split: Annotated[str, typer.Option(help="Split of the run's task to evaluate.")] = "test",
) -> None:
    """Load a saved run and evaluate it on one split of its task."""
    from pyrolora.experiment import evaluate, load_run

    try:
        run = load_run(run_dir)
        if split not in run.splits:
            raise typer.BadParameter(f"unknown split {split!r}; the task has {sorted(run.splits)}")
        evaluation = evaluate(run, split, progress=True)
    except PyroloraError as err:
        _fail(err)
    typer.echo(json.dumps(evaluation.metrics, indent=2))


if __name__ == "__main__":
    app()
