"""Labelled table files (TSV, CSV, JSON, JSONL) described by a small spec: text columns, label column, label values.

A :class:`TsvSpec` is all a GLUE-style task needs, so a new task comes from a configuration alone::

    TsvSpec(text_columns=("sentence1", "sentence2"), label_column="label",
            labels=("entailment", "not_entailment"))                       # RTE, file with a header
    TsvSpec(text_columns=("sentence",), label_column="label", labels=("0", "1"),
            columns=("source", "label", "original_label", "sentence"))     # CoLA, file without a header

Files are read as UTF-8 with an optional byte-order mark. The format follows the suffix: ``.tsv`` is split on
tabs with no quoting (GLUE's texts contain bare quotes), ``.csv`` goes through the standard ``csv`` module (RFC
4180 quoting, multi-line fields), ``.jsonl`` holds one object per line and ``.json`` a list of objects (or an
object of equal-length column lists). Every row is checked: a row with the wrong number of fields, an unknown
label or an empty file raises :class:`~pyrolora.errors.DataError` naming the file, the line and the fix.

Why not ``datasets.load_dataset("csv" | "json", ...)``: its builders parse through pandas / pyarrow, which infer a
type per column (a label column of ``"1"`` and ``"2"`` turns into integers, a text column of numbers into floats),
report a malformed row without the line of the file it came from, and copy every file into an Arrow cache.
The standard ``csv`` and ``json`` modules keep the raw strings and the line numbers that the errors name.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pyrolora.data.base import ClassificationSplit, read_text
from pyrolora.errors import DataError

__all__ = ["GLUE_TASKS", "TABLE_SUFFIXES", "TsvSpec", "load_table", "load_tsv", "read_table", "records_to_split"]
__all__ += ["dataset_to_split", "resolve_spec", "rows_to_split"]

#: The file formats a table task may come in, by suffix.
TABLE_SUFFIXES = (".tsv", ".csv", ".json", ".jsonl")


@dataclass(frozen=True)
class TsvSpec:
    """How to read one GLUE-style TSV task.

    Args:
        text_columns: one column (single-sentence task) or two (sentence-pair task) holding the input texts;
            empty: the file's ``text`` or ``sentence`` column (see :func:`resolve_spec`).
        label_column: the column holding the label.
        labels: the raw label values as written in the file, in class-index order (class ``i`` is
            ``labels[i]``); e.g. ``("0", "1")`` or ``("entailment", "not_entailment")``. Empty: the distinct
            values of the training file's label column, sorted (numerically when they are all integers).
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
        if len(self.text_columns) > 2:
            raise DataError(
                f"text_columns must name one or two columns (a sentence or a sentence pair), got {self.text_columns!r}."
            )
        if self.labels and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise DataError(f"labels must list at least two distinct raw label values, got {self.labels!r}.")
        if self.label_names and self.labels and len(self.label_names) != len(self.labels):
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


Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "file[record i]", the row's values by column name)


def _tsv_rows(path: Path, text: str, spec: TsvSpec) -> tuple[list[str], list[Row]]:
    lines = text.split("\n")  # "\r" stays visible for rstrip below
    numbered = [(i, line.rstrip("\r")) for i, line in enumerate(lines, start=1)]
    numbered = [(i, line) for i, line in numbered if line.strip()]
    return _split_rows(path, [(i, line.split("\t")) for i, line in numbered], spec, "tab-separated")


def _csv_rows(path: Path, text: str, spec: TsvSpec) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    numbered, first_line = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                numbered.append((first_line, fields))
            first_line = reader.line_num + 1  # a quoted field may span lines: the next row starts after them
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err}). Fix the quoting of that row.") from None
    return _split_rows(path, numbered, spec, "comma-separated")


def _split_rows(
    path: Path, numbered: list[tuple[int, list[str]]], spec: TsvSpec, kind: str
) -> tuple[list[str], list[Row]]:
    """The header (first row, or the declared ``columns``) and every data row as a dict."""
    if spec.has_header:
        if not numbered:
            raise DataError(f"{path} is empty; a header row and at least one example row are needed.")
        header = [h.strip() for h in numbered[0][1]]
        numbered = numbered[1:]
    else:
        header = list(spec.columns)
    rows = []
    for number, fields in numbered:
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{number}: expected {len(header)} {kind} fields {header}, got {len(fields)}: "
                f"{fields!r:.100}. Fix the row (a stray separator or a missing field), or the column spec."
            )
        rows.append((f"{path}:{number}", dict(zip(header, fields, strict=True))))
    return header, rows


def _json_rows(path: Path, text: str, jsonl: bool) -> tuple[list[str], list[Row]]:
    records: list[tuple[str, Any]] = []
    if jsonl:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({err.msg}): {line[:100]!r}. Fix the line."
                    ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). Fix the file there.") from None
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {k: len(v) for k, v in data.items()}
            if len(set(lengths.values())) != 1:
                raise DataError(f"{path}: the column lists have different lengths {lengths}; make them equal.")
            data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a list of objects (one per example) or an object of column lists, got "
                f"{type(data).__name__}."
            )
        records = [(f"{path}[record {i}]", record) for i, record in enumerate(data)]
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with named fields, got {record!r:.100}.")
    header = list(records[0][1]) if records else []
    return header, records


def read_table(path: str | Path, spec: TsvSpec) -> tuple[list[str], list[Row]]:
    """The column names and the ``(where, row)`` of every non-blank data row of a ``.tsv``/``.csv``/``.json(l)``.

    Raises:
        DataError: for a missing, unreadable or empty file, an unknown suffix, a row with the wrong number of
            fields or invalid JSON, or named columns the file lacks; the message names file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; use one of {list(TABLE_SUFFIXES)}."
        )
    text = read_text(path)
    if suffix == ".tsv":
        header, rows = _tsv_rows(path, text, spec)
    elif suffix == ".csv":
        header, rows = _csv_rows(path, text, spec)
    else:
        header, rows = _json_rows(path, text, jsonl=suffix == ".jsonl")
    if not rows:
        raise DataError(f"{path} has no example rows; give a file with at least one labelled row.")
    wanted = (*spec.text_columns, spec.label_column)
    if suffix in (".json", ".jsonl"):  # every record names its own fields
        for where, row in rows:
            missing = [c for c in wanted if c not in row]
            if missing:
                raise DataError(
                    f"{where}: the record has no field(s) {missing}; it has {sorted(row)}. Fix the record, or "
                    "text_columns / label_column."
                )
    else:
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(
                f"{path}: the header has no column(s) {missing}; it has {header}. Fix text_columns / "
                "label_column, or declare `columns` if the file has no header row."
            )
    return header, rows


def _raw_label(value: Any) -> str:
    return str(value).strip()


def resolve_spec(spec: TsvSpec, header: Sequence[str], rows: Sequence[Row]) -> TsvSpec:
    """``spec`` with its defaults filled in from the training file: the text column and the label values.

    - ``text_columns`` empty: ``("text",)`` if the file has a ``text`` column, else ``("sentence",)``.
    - ``labels`` empty: the distinct raw values of ``label_column``, sorted numerically when all are integers,
      else as strings; class ``i`` is the ``i``-th of them (recorded in the run's metrics as label names).
    """
    if not spec.text_columns:
        found = next((c for c in ("text", "sentence") if c in header), None)
        if found is None:
            raise DataError(
                f"no text column given and the data has neither 'text' nor 'sentence' among {list(header)}; set "
                "task.text_columns, e.g. text_columns = ['review']."
            )
        spec = replace(spec, text_columns=(found,))
    if not spec.labels:
        if spec.label_column not in header:
            raise DataError(
                f"the data has no label column {spec.label_column!r} among {list(header)}; set task.label_column."
            )
        values = {_raw_label(row.get(spec.label_column, "")) for _, row in rows}
        numeric = all(v.lstrip("-").isdigit() for v in values)
        labels = tuple(sorted(values, key=int) if numeric else sorted(values))
        if len(labels) < 2:
            raise DataError(
                f"the label column {spec.label_column!r} holds only {list(labels)}; a classifier needs at least two "
                "classes (or list them in task.labels)."
            )
        spec = replace(spec, labels=labels)
    return spec


def rows_to_split(rows: Sequence[Row], spec: TsvSpec, path: Path) -> ClassificationSplit:
    index = {raw: i for i, raw in enumerate(spec.labels)}
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    ids: list[str] = []
    for where, row in rows:
        raw = _raw_label(row[spec.label_column])
        if raw not in index:
            raise DataError(
                f"{where}: label {raw!r} is not one of the task's labels {list(spec.labels)}; add it to "
                "the task's `labels` or fix the row."
            )
        labels.append(index[raw])
        for column, out in zip(spec.text_columns, (texts, pairs), strict=False):
            value = row[column]
            if not isinstance(value, str):
                raise DataError(f"{where}: the text in column {column!r} must be a string, got {value!r:.100}.")
            out.append(value)
        ids.append(path.name + where[len(str(path)) :])  # "train.csv:12" or "data.json[record 3]"
    return ClassificationSplit(
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        label_names=spec.class_names,
        text_pairs=tuple(pairs) if pairs else None,
        ids=tuple(ids),
    )


def load_table(path: str | Path, spec: TsvSpec) -> ClassificationSplit:
    """Read one labelled ``.tsv``, ``.csv``, ``.json`` or ``.jsonl`` file into a :class:`ClassificationSplit`.

    Defaults left empty in ``spec`` (text column, label values) are filled in from this file
    (:func:`resolve_spec`); to read several files of one task consistently, resolve once from the training file.

    Raises:
        DataError: when the file is missing, unreadable or empty, lacks a named column, has a row with the
            wrong number of fields, or a label outside ``spec.labels``; the message names file and line.
    """
    path = Path(path)
    header, rows = read_table(path, spec)
    return rows_to_split(rows, resolve_spec(spec, header, rows), path)


#: The former name of :func:`load_table`, from when only TSV files were read.
load_tsv = load_table


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


def dataset_to_split(
    dataset: Any, *, text_columns: Sequence[str] = (), label_column: str | None = None
) -> ClassificationSplit:
    """A Hugging Face ``datasets.Dataset`` of texts and labels as a :class:`ClassificationSplit`.

    Args:
        dataset: a ``datasets.Dataset`` (one split, not a ``DatasetDict``) with one or two text columns and a
            label column; untokenized (the loader tokenizes with the model's tokenizer).
        text_columns: the text column(s); default the ``text`` or ``sentence`` column.
        label_column: default ``label``, else ``labels``. A ``ClassLabel`` feature gives the class names and its
            integers are the classes; other values are mapped like a file's (sorted distinct values).

    Raises:
        DataError: for a ``DatasetDict``, a missing column, a non-string text or fewer than two classes.
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    if isinstance(getattr(dataset, "column_names", None), dict):
        raise DataError(
            f"got a DatasetDict with splits {sorted(dataset.column_names)}; pass one split, e.g. dataset['train']."
        )
    if not columns:
        raise DataError(f"expected a datasets.Dataset with named columns, got {type(dataset).__name__}.")
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in columns), "label")
    if not text_columns:
        found = next((c for c in ("text", "sentence") if c in columns), None)
        if found is None:
            raise DataError(f"the dataset has neither 'text' nor 'sentence' among {columns}; pass text_columns=...")
        text_columns = (found,)
    spec = TsvSpec(tuple(text_columns), label_column, ())
    missing = [c for c in (*text_columns, label_column) if c not in columns]
    if missing:
        raise DataError(f"the dataset has no column(s) {missing} among {columns}; pass text_columns / label_column.")
    feature = getattr(dataset, "features", {}).get(label_column)
    names = getattr(feature, "names", None)
    values = {c: dataset[c] for c in (*text_columns, label_column)}
    rows = [(f"dataset row {i}", {c: v[i] for c, v in values.items()}) for i in range(len(dataset))]
    if names:  # ClassLabel: integers are class indices, the feature knows the names
        spec = replace(spec, labels=tuple(str(i) for i in range(len(names))), label_names=tuple(names))
    return rows_to_split(rows, resolve_spec(spec, columns, rows), Path("dataset"))
