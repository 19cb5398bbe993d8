"""Named tasks (GLUE SST-2 / RTE / CoLA, ARC-Easy / ARC-Challenge / OpenBookQA) from a local folder or the hub.

Every task yields the same splits:

- ``train`` and ``validation``: the task's training file, shuffled with ``seed`` and (optionally) cut to
  ``max_train`` rows, then split ``1 - validation_fraction`` / ``validation_fraction``. Model selection uses
  ``validation``, never the evaluation split.
- ``test``: the task's **dev** file (GLUE's test labels are hidden, so dev is the evaluation split, as in the
  paper), optionally a seeded subset of ``max_eval`` rows.
- extra labelled evaluation splits where a task has them (CoLA: ``in_domain`` and ``out_of_domain`` dev).

Local files follow the ``$PYROLORA_DATA`` layout (``glue/<task>/{train,dev}.tsv``,
``mcqa/<task>/{train,dev}.jsonl``); hub ids go through ``datasets.load_dataset``, whose ``validation`` split
plays the role of dev.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pyrolora.data.base import ClassificationSplit, split_indices
from pyrolora.data.glue import (
    GLUE_TASKS,
    TsvSpec,
    load_table,
    read_table,
    records_to_split,
    resolve_spec,
    rows_to_split,
)
from pyrolora.data.mcqa import MultipleChoiceSplit, hub_records_to_mcqa, load_mcqa_jsonl
from pyrolora.errors import DataError

__all__ = ["TASKS", "TaskInfo", "data_root", "hub_splits", "is_multiple_choice", "load_splits"]

Split = ClassificationSplit | MultipleChoiceSplit


@dataclass(frozen=True)
class TaskInfo:
    """Where a named task lives: its local folder under the data root and its hub id, config and kind."""

    kind: Literal["tsv", "mcqa"]
    folder: str
    hub_id: str
    hub_config: str | None


TASKS: dict[str, TaskInfo] = {
    "sst2": TaskInfo("tsv", "glue/sst2", "nyu-mll/glue", "sst2"),
    "rte": TaskInfo("tsv", "glue/rte", "nyu-mll/glue", "rte"),
    "cola": TaskInfo("tsv", "glue/cola", "nyu-mll/glue", "cola"),
    "arc_easy": TaskInfo("mcqa", "mcqa/arc_easy", "allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": TaskInfo("mcqa", "mcqa/arc_challenge", "allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": TaskInfo("mcqa", "mcqa/openbookqa", "allenai/openbookqa", "main"),
}


def is_multiple_choice(name: str) -> bool:
    """Whether task ``name`` (a named task, ``"tsv"`` or ``"mcqa"``) is multiple-choice QA."""
    return name == "mcqa" or (name in TASKS and TASKS[name].kind == "mcqa")


def data_root(data_dir: str | None = None) -> Path:
    """The folder of the local task files: ``data_dir``, else ``$PYROLORA_DATA``."""
    root = data_dir or os.environ.get("PYROLORA_DATA")
    if not root:
        raise DataError(
            "no data folder: set task.data_dir or the PYROLORA_DATA environment variable to the folder that "
            "holds glue/ and mcqa/, or load the task from the hub (task.source = 'hub')."
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"the data folder {path} does not exist; fix task.data_dir or $PYROLORA_DATA.")
    return path


def _subsample(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split):
        return split
    return split.subset(np.sort(np.random.default_rng(seed).permutation(len(split))[:size]))


def _carve(full: Split, validation_fraction: float, max_train: int | None, seed: int) -> dict[str, Split]:
    if not 0 < validation_fraction < 1:
        raise DataError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}.")
    pool = _subsample(full, max_train, seed)
    if len(pool) < 2:
        raise DataError(f"the training file has {len(pool)} usable row(s); a validation split needs at least two.")
    train, validation = split_indices(len(pool), (1 - validation_fraction, validation_fraction), seed)
    if len(validation) == 0 or len(train) == 0:
        raise DataError(
            f"validation_fraction={validation_fraction} of {len(pool)} rows leaves an empty split; change either."
        )
    return {"train": pool.subset(train), "validation": pool.subset(validation)}


def hub_splits(hub_id: str, hub_config: str | None, names: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """Rows of the named splits of a dataset loaded with ``datasets.load_dataset`` (hub id or local folder)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("hub tasks need the 'datasets' package: `pip install datasets`.") from err
    args = (hub_id, hub_config) if hub_config else (hub_id,)
    try:
        loaded = datasets.load_dataset(*args)
    except Exception as err:  # datasets raises many types (connection, missing config, file not found)
        raise DataError(
            f"cannot load {hub_id!r} (config {hub_config!r}) with datasets.load_dataset: {err}. Check the id and "
            "config, the network, or use a local folder (task.source = 'local')."
        ) from err
    missing = [n for n in names if n not in loaded]
    if missing:
        raise DataError(f"{hub_id!r} has no split(s) {missing}; it has {sorted(loaded)}.")
    return {n: list(loaded[n]) for n in names}


def _local_table(
    name: str, path: Path, spec: TsvSpec, test_fraction: float, seed: int
) -> tuple[ClassificationSplit, dict[str, Split]]:
    """The training split and the evaluation splits of a table task at ``path`` (one file or a folder)."""
    train_file = path if path.is_file() else path / spec.train_file
    header, rows = read_table(train_file, spec)
    spec = resolve_spec(spec, header, rows)  # once, from the training file, so every split shares the classes
    full = rows_to_split(rows, spec, train_file)
    eval_file = None if path.is_file() else path / spec.eval_file
    if eval_file is not None and not eval_file.exists() and name == "tsv" and spec.eval_file == "dev.tsv":
        eval_file = None  # a folder of one's own data with no evaluation file (the default name absent)
    if eval_file is None:
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
        rest, test = split_indices(len(full), (1 - test_fraction, test_fraction), seed)
        if len(test) == 0 or len(rest) < 2:
            raise DataError(
                f"test_fraction={test_fraction} of the {len(full)} rows of {train_file} leaves an empty split; give "
                "more rows, another test_fraction, or an evaluation file (task.eval_file in a folder)."
            )
        return full.subset(rest), {"test": full.subset(test)}
    evals: dict[str, Split] = {"test": load_table(eval_file, spec)}
    for split_name, file in spec.extra_eval_files.items():
        evals[split_name] = load_table(path / file, spec)
    return full, evals


def load_splits(
    name: str,
    *,
    source: Literal["local", "hub"] = "local",
    data_dir: str | None = None,
    path: str | None = None,
    hub_config: str | None = None,
    tsv: TsvSpec | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> dict[str, Split]:
    """The ``train`` / ``validation`` / ``test`` (= dev) splits of a task, plus any extra evaluation splits.

    Args:
        name: a named task (``sst2``, ``rte``, ``cola``, ``arc_easy``, ``arc_challenge``, ``openbookqa``), or
            ``"tsv"`` (any GLUE-style task described by ``tsv``) or ``"mcqa"`` (any AI2-schema task) from ``path``.
        source: ``"local"`` files or ``"hub"`` (``datasets.load_dataset``).
        data_dir: root of the local layout (default ``$PYROLORA_DATA``) for named tasks.
        path: the task's folder (local) or dataset id (hub); overrides the named task's location. For a
            ``"tsv"`` task it may also be one ``.tsv``, ``.csv``, ``.json`` or ``.jsonl`` file.
        hub_config: the dataset configuration on the hub (default: the named task's).
        tsv: the column spec of a ``"tsv"`` task (named GLUE tasks have theirs built in).
        validation_fraction: share of the (subsampled) training file held out as ``validation``.
        test_fraction: for a ``"tsv"`` task without an evaluation file (``path`` is one file, or a folder without
            ``spec.eval_file``): the share of the file held out as ``test``, seeded by ``seed``, before
            ``validation`` is carved from the rest.
        max_train: keep a seeded random subset of this many training rows (before carving validation).
        max_eval: keep a seeded random subset of this many rows of every evaluation split.
        seed: seed of the subsets and of the train / validation partition.
    """
    info = TASKS.get(name)
    if info is None and name not in ("tsv", "mcqa"):
        raise DataError(f"unknown task {name!r}; choose one of {[*TASKS, 'tsv', 'mcqa']}.")
    kind = info.kind if info is not None else name
    spec = GLUE_TASKS.get(name) if kind == "tsv" else None
    spec = tsv if tsv is not None else spec
    if kind == "tsv" and spec is None:
        raise DataError("a 'tsv' task needs its columns: set task.text_columns, task.label_column and task.labels.")
    if info is None and not path:
        raise DataError(f"a {name!r} task needs task.path: the folder (or hub id) that holds its files.")
    evals: dict[str, Split]
    if source == "hub":
        hub_id = path or info.hub_id  # type: ignore[union-attr]
        config = hub_config if hub_config is not None else (info.hub_config if info is not None and not path else None)
        rows = hub_splits(hub_id, config, ("train", "validation"))
        where = f"{hub_id}[{config}]" if config else hub_id
        if kind == "tsv":
            train_rows = [(f"{where}:train[{i}]", row) for i, row in enumerate(rows["train"])]
            spec = resolve_spec(spec, list(rows["train"][0]) if rows["train"] else [], train_rows)  # type: ignore[arg-type]
            full = records_to_split(rows["train"], spec, f"{where}:train")  # type: ignore[arg-type]
            evals = {"test": records_to_split(rows["validation"], spec, f"{where}:validation")}  # type: ignore[arg-type]
        else:
            full = hub_records_to_mcqa(rows["train"], f"{where}:train")
            evals = {"test": hub_records_to_mcqa(rows["validation"], f"{where}:validation")}
    elif source == "local":
        folder = Path(path).expanduser() if path else data_root(data_dir) / info.folder  # type: ignore[union-attr]
        if kind == "tsv":
            assert spec is not None
            full, evals = _local_table(name, folder, spec, test_fraction, seed)
        else:
            full = load_mcqa_jsonl(folder / "train.jsonl")
            evals = {"test": load_mcqa_jsonl(folder / "dev.jsonl")}
    else:
        raise DataError(f"task.source must be 'local' or 'hub', got {source!r}.")
    if kind == "mcqa":  # every split of a multiple-choice task needs the same number of classes (full files)
        c = max(s.num_options for s in (full, *evals.values()))  # type: ignore[union-attr]
        full = full.with_num_options(c)  # type: ignore[union-attr]
        evals = {k: s.with_num_options(c) for k, s in evals.items()}  # type: ignore[union-attr]
    splits: dict[str, Split] = {**_carve(full, validation_fraction, max_train, seed)}
    splits.update({k: _subsample(v, max_eval, seed) for k, v in evals.items()})
    return splits
