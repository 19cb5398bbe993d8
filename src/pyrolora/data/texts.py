"""Unlabelled text for out-of-distribution evaluation: one small file format that any run can read.

``pyrolora evaluate RUN_DIR --ood PATH`` predicts on the texts of PATH with the run's own tokenizer. PATH is

- ``*.txt``: one text per line (blank lines skipped);
- ``*.tsv``: tab-separated with a header row naming a ``sentence`` or ``text`` column (GLUE's SST-2 layout),
  or ``sentence1`` and ``sentence2`` for sentence pairs; a file without such a header (CoLA's raw files) needs
  ``column``, the 0-based index of the text column;
- ``*.jsonl``: one JSON object per line with a ``sentence`` or ``text`` field.

Labels, if the file has any, are ignored: OOD detection asks only how uncertain the model is.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pyrolora.data.base import ClassificationSplit
from pyrolora.errors import DataError

__all__ = ["TEXT_COLUMNS", "load_texts", "unlabelled_split"]

#: Header names taken as the text column, in order of preference.
TEXT_COLUMNS = ("sentence", "text")


def load_texts(
    path: str | Path, *, column: int | None = None, limit: int | None = None, seed: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """Read texts (and second texts for sentence pairs) from a ``.txt``, ``.tsv`` or ``.jsonl`` file.

    Args:
        path: the file.
        column: 0-based index of the text column of a TSV without a header row.
        limit: keep a seeded random subset of at most this many texts (in file order).
        seed: seed of that subset.

    Returns:
        ``(texts, second_texts)``; ``second_texts`` is None unless the TSV has ``sentence1``/``sentence2``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"OOD data file {path} does not exist.")
    suffix = path.suffix.lower()
    pairs: list[str] | None = None
    try:
        if suffix == ".txt":
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".tsv":
            texts, pairs = _read_tsv(path, column)
        elif suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            raise DataError(f"OOD data {path} must be a .txt, .tsv or .jsonl file (see pyrolora.data.texts).")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read OOD data {path}: {err}") from err
    if not texts:
        raise DataError(f"OOD data {path} holds no texts.")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be positive, got {limit}.")
        if limit < len(texts):
            keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
            texts = [texts[i] for i in keep]
            pairs = None if pairs is None else [pairs[i] for i in keep]
    return tuple(texts), None if pairs is None else tuple(pairs)


def _read_tsv(path: Path, column: int | None) -> tuple[list[str], list[str] | None]:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        return [], None
    if column is not None:
        if any(len(row) <= column for row in rows):
            raise DataError(f"{path}: some rows have no column {column} (0-based).")
        return [row[column].strip() for row in rows], None
    header = [h.strip().lower() for h in rows[0]]
    if "sentence1" in header and "sentence2" in header:
        i, j = header.index("sentence1"), header.index("sentence2")
        return [r[i].strip() for r in rows[1:]], [r[j].strip() for r in rows[1:]]
    for name in TEXT_COLUMNS:
        if name in header:
            i = header.index(name)
            return [r[i].strip() for r in rows[1:] if len(r) > i], None
    raise DataError(
        f"{path} has no header column named {' or '.join(TEXT_COLUMNS)} (first row: {rows[0][:4]}); "
        "pass the 0-based text column (--ood-column) for a TSV without a header."
    )


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON: {err}") from err
        name = next((k for k in TEXT_COLUMNS if isinstance(record, dict) and k in record), None)
        if name is None:
            raise DataError(f"{path}:{number} has no {' or '.join(TEXT_COLUMNS)} field.")
        texts.append(str(record[name]))
    return texts


def unlabelled_split(
    texts: Sequence[str], label_names: Sequence[str], text_pairs: Sequence[str] | None = None
) -> ClassificationSplit:
    """Texts as a :class:`ClassificationSplit` for prediction; the labels are placeholders (all 0), never scored."""
    return ClassificationSplit(
        texts=tuple(texts),
        labels=np.zeros(len(texts), dtype=np.int64),
        label_names=tuple(label_names),
        text_pairs=None if text_pairs is None else tuple(text_pairs),
    )
