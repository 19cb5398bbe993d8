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

    if _train_other_method(config, out):  # baselines (MC dropout, ensemble, peft LoRA) go through the runner
        return
    try:
        run = train(load_config(config))
        evaluation = evaluate(run, "test", progress=True)
        run.metrics = {"test": evaluation.metrics}
        save_run(run, out)
    except PyroloraError as err:
        _fail(err)
    typer.echo(json.dumps(evaluation.metrics, indent=2))
    typer.echo(f"saved to {out}")


def _train_other_method(config: Path, out: Path) -> bool:
    """Run a non-``bayesian`` method of ``[method]`` with :func:`pyrolora.runner.run_method`; False otherwise."""
    from pyrolora.config import load_config

    try:
        parsed = load_config(config)
        if parsed.method.name == "bayesian":
            return False
        from pyrolora.runner import run_method

        result = run_method(parsed, out=out)
    except PyroloraError as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2))
    typer.echo(f"saved to {out}")
    return True


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pyrolora train`.")],
    split: Annotated[str, typer.Option(help="Split of the run's task to evaluate.")] = "test",
    task: Annotated[
        str | None, typer.Option(help="Evaluate on this other task's splits (distribution shift), e.g. openbookqa.")
    ] = None,
) -> None:
    """Load a saved run and evaluate it on one split of its task (or of another task with --task)."""
    from pyrolora.experiment import evaluate, load_run

    try:
        run = load_run(run_dir)
        if task is not None:
            _use_other_task(run, task)
        if split not in run.splits:
            raise typer.BadParameter(f"unknown split {split!r}; the task has {sorted(run.splits)}")
        evaluation = evaluate(run, split, progress=True)
    except PyroloraError as err:
        _fail(err)
    typer.echo(json.dumps(evaluation.metrics, indent=2))


def _use_other_task(run, task: str) -> None:
    """Swap a loaded run's splits for those of another task with the same kind of output (distribution shift)."""
    from pyrolora.errors import ConfigError
    from pyrolora.experiment import load_task

    spec = run.config.replace(task={"name": task, "path": None, "hub_config": None}).task
    if spec.multiple_choice != run.config.task.multiple_choice:
        raise ConfigError(f"the run was trained on {run.config.task.name!r}; {task!r} is a different kind of task.")
    splits = load_task(spec)
    if splits["test"].num_classes != run.splits["train"].num_classes and not spec.multiple_choice:
        raise ConfigError(f"{task!r} has {splits['test'].num_classes} classes, the run's head has a different number.")
    run.splits = splits


if __name__ == "__main__":
    app()
