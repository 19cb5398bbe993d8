"""GLUE-format TSV tasks described by a small spec: which columns hold the text, which the label, and its values.

A :class:`TsvSpec` is all a GLUE-style task needs, so a new task comes from a configuration alone::

    TsvSpec(text_columns=("sentence1", "sentence2"), label_column="label",
            labels=("entailment", "not_entailment"))                       # RTE, file with a header
    TsvSpec(text_columns=("sentence",), label_column="label", labels=("0", "1"),
            columns=("source", "label", "original_label", "sentence"))     # CoLA, file without a header

Files are read as UTF-8 with an optional byte-order mark, split on tabs with no quoting (GLUE's texts contain
bare quotes), and every row is checked: a row with the wrong number of fields, an unknown label or an empty
file raises :class:`~pyrolora.errors.DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrolora.data.base import ClassificationSplit, read_text
from pyrolora.errors import DataError

__all__ = ["GLUE_TASKS", "TsvSpec", "load_tsv", "records_to_split"]


@dataclass(frozen=True)
class TsvSpec:
    """How to read one GLUE-style TSV task.

    Args:
        text_columns: one column (single-sentence task) or two (sentence-pair task) holding the input texts.
        label_column: the column holding the label.
        labels: the raw label values as written in the file, in class-index order (class ``i`` is
            ``labels[i]``); e.g. ``("0", "1")`` or ``("entailment", "not_entailment")``.
        label_names: readable class names, same length as ``labels`` (default: ``labels``).
        columns: names of the columns of a file without a header row; empty when the file has a header.
        train_file: the training file, relative to the task folder.
        eval_file: the evaluation file (GLUE's dev split: its test split has no labels).
        extra_eval_files: further labelled evaluation files by split name (e.g. CoLA's out-of-domain dev).
    """

    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    train_file: str = "train.tsv"
    eval_file: str = "dev.tsv"
    extra_eval_files: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_columns) <= 2:
            raise DataError(
                f"text_columns must name one or two columns (a sentence or a sentence pair), got {self.text_columns!r}."
            )
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise DataError(f"labels must list at least two distinct raw label values, got {self.labels!r}.")
        if self.label_names and len(self.label_names) != len(self.labels):
            raise DataError(
                f"label_names {self.label_names!r} must have one name per label value {self.labels!r}, or be empty."
            )
        if self.columns:
            missing = [c for c in (*self.text_columns, self.label_column) if c not in self.columns]
            if missing:
                raise DataError(f"columns {missing} are not among the declared columns {list(self.columns)}.")

    @property
    def has_header(self) -> bool:
        """Whether the file starts with a header row (no ``columns`` declared)."""
        return not self.columns

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.label_names or self.labels


#: The GLUE tasks in the ``$PYROLORA_DATA/glue/<task>`` layout (see that folder's README).
GLUE_TASKS: dict[str, TsvSpec] = {
    "sst2": TsvSpec(("sentence",), "label", ("0", "1"), ("negative", "positive")),
    "rte": TsvSpec(("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "cola": TsvSpec(
        ("sentence",),
        "label",
        ("0", "1"),
        ("unacceptable", "acceptable"),
        columns=("source", "label", "original_label", "sentence"),
        extra_eval_files={"in_domain": "raw/in_domain_dev.tsv", "out_of_domain": "raw/out_of_domain_dev.tsv"},
    ),
}


def _read_rows(path: Path, spec: TsvSpec) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The column names and the (line number, fields) of every non-blank data row."""
    lines = read_text(path).split("\n")  # "\r" stays visible for rstrip below
    numbered = [(i, line.rstrip("\r")) for i, line in enumerate(lines, start=1)]
    numbered = [(i, line) for i, line in numbered if line.strip()]
    if spec.has_header:
        if not numbered:
            raise DataError(f"{path} is empty; a header row and at least one example row are needed.")
        header = numbered[0][1].split("\t")
        numbered = numbered[1:]
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise DataError(
                f"{path}: the header has no column(s) {missing}; it has {header}. Fix text_columns / "
                "label_column, or declare `columns` if the file has no header row."
            )
    else:
        header = list(spec.columns)
    if not numbered:
        raise DataError(f"{path} has no example rows; give a file with at least one labelled row.")
    rows = []
    for number, line in numbered:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{number}: expected {len(header)} tab-separated fields {header}, got {len(fields)}: "
                f"{line[:100]!r}. Fix the row (a stray tab or a missing field), or the column spec."
            )
        rows.append((number, fields))
    return header, rows


def load_tsv(path: str | Path, spec: TsvSpec) -> ClassificationSplit:
    """Read one labelled TSV file into a :class:`ClassificationSplit` (texts, class indices, class names).

    Raises:
        DataError: when the file is missing, unreadable or empty, lacks a named column, has a row with the
            wrong number of fields, or a label outside ``spec.labels``; the message names file and line.
    """
    path = Path(path)
    header, rows = _read_rows(path, spec)
    where = {name: header.index(name) for name in (*spec.text_columns, spec.label_column)}
    index = {raw: i for i, raw in enumerate(spec.labels)}
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    ids: list[str] = []
    for number, fields in rows:
        raw = fields[where[spec.label_column]].strip()
        if raw not in index:
            raise DataError(
                f"{path}:{number}: label {raw!r} is not one of the task's labels {list(spec.labels)}; add it to "
                "the task's `labels` or fix the row."
            )
        labels.append(index[raw])
        texts.append(fields[where[spec.text_columns[0]]])
        if len(spec.text_columns) == 2:
            pairs.append(fields[where[spec.text_columns[1]]])
        ids.append(f"{path.name}:{number}")
    return ClassificationSplit(
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        label_names=spec.class_names,
        text_pairs=tuple(pairs) if pairs else None,
        ids=tuple(ids),
    )


def records_to_split(records: Sequence[Mapping[str, Any]], spec: TsvSpec, source: str) -> ClassificationSplit:
    """Rows of a Hugging Face dataset (dicts) into a split; integer labels are class indices already.

    GLUE on the hub (``nyu-mll/glue``) stores labels as class indices in the same order as
    :data:`GLUE_TASKS` (and -1 for its unlabelled test split, which is rejected here).
    """
    if len(records) == 0:
        raise DataError(f"{source} has no rows; choose a labelled split.")
    first = records[0]
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in first]
    if missing:
        raise DataError(f"{source} has no column(s) {missing}; it has {sorted(first)}. Fix the task's column names.")
    index = {raw: i for i, raw in enumerate(spec.labels)}
    texts, pairs, labels = [], [], []
    for row_number, row in enumerate(records):
        raw = row[spec.label_column]
        if isinstance(raw, int) and not isinstance(raw, bool):
            if not 0 <= raw < len(spec.labels):
                raise DataError(
                    f"{source} row {row_number}: label {raw} is outside [0, {len(spec.labels)}) (an unlabelled "
                    "test split has -1); evaluate on a labelled split or fix the task's `labels`."
                )
            labels.append(raw)
        elif str(raw) in index:
            labels.append(index[str(raw)])
        else:
            raise DataError(
                f"{source} row {row_number}: label {raw!r} is not one of {list(spec.labels)}; fix the task's `labels`."
            )
        texts.append(str(row[spec.text_columns[0]]))
        if len(spec.text_columns) == 2:
            pairs.append(str(row[spec.text_columns[1]]))
    return ClassificationSplit(
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        label_names=spec.class_names,
        text_pairs=tuple(pairs) if pairs else None,
    )
