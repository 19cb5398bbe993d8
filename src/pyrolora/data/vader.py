"""The embedded default task: polarity of VADER lexicon entries, with their human rating distributions.

The VADER lexicon (Hutto and Gilbert, 2014; MIT license; shipped by the ``vaderSentiment`` package) lists
7,520 words, slang terms and emoticons, each rated by 10 independent human raters on a scale from -4
(extremely negative) to +4 (extremely positive). That makes a small real task whose label uncertainty is
known item by item.

Task definition (binary, classes ``negative`` = 0 and ``positive`` = 1):

- The input text is the lexicon entry itself (e.g. ``"adorable"``, ``":-("``).
- The label is the sign of the mean rating. No entry has a mean of exactly 0.
- The human label distribution is the share of raters on each side, a rating of 0 counting half for each:
  ``p_human(positive) = (#ratings > 0 + 0.5 · #ratings = 0) / #ratings``. Its entropy measures rater
  disagreement.
- Near-neutral entries (small ``|mean|``) are **kept** by default: they are exactly the items on which raters
  disagree, which is what the task is for, and they carry the label their mean rating gives. Set
  ``neutral_margin`` to drop entries with ``|mean| < neutral_margin`` from every split instead.
- 14 entries appear twice with separate ratings (e.g. ``"d:"`` as a frowning emoticon and as a grin); their
  ratings are pooled into one item (20 ratings), so that no text occurs in two splits.
- Splits: a fixed seeded permutation, 70% train, 10% validation, 20% test.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from pyrolora.data.base import ClassificationSplit, split_indices
from pyrolora.errors import DataError

__all__ = ["LABEL_NAMES", "SPLIT_FRACTIONS", "SPLIT_SEED", "load_vader", "vader_splits"]

LABEL_NAMES = ("negative", "positive")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_SEED = 20250217


def _lexicon_path() -> Path:
    try:
        return Path(str(resources.files("vaderSentiment").joinpath("vader_lexicon.txt")))
    except ModuleNotFoundError as err:
        raise DataError(
            "the VADER lexicon ships with the 'vaderSentiment' package; install it with `pip install vaderSentiment`."
        ) from err


def load_vader(path: str | Path | None = None, neutral_margin: float = 0.0) -> ClassificationSplit:
    """All lexicon entries as one split (duplicates pooled), in file order of first appearance.

    Args:
        path: a lexicon file in VADER's format (token, mean, std, list of ratings, tab-separated); default
            the copy inside the ``vaderSentiment`` package.
        neutral_margin: drop entries whose mean rating has absolute value below this (0 keeps everything).
    """
    path = Path(path) if path is not None else _lexicon_path()
    ratings: dict[str, list[int]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read the VADER lexicon at {path}: {err}; give a readable UTF-8 text file in VADER's format."
        ) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(f"{path}:{number}: expected 4 tab-separated fields, got {len(parts)}: {line[:80]!r}")
        if not parts[0].strip():
            raise DataError(f"{path}:{number}: the entry (first field) is empty: {line[:80]!r}")
        try:
            values = json.loads(parts[3])
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}:{number}: the ratings {parts[3][:60]!r} are not a list: {err}") from err
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, int) and not isinstance(v, bool) and -4 <= v <= 4 for v in values)
        ):
            raise DataError(
                f"{path}:{number}: ratings must be a non-empty list of integers from -4 to 4, got {parts[3][:60]!r}"
            )
        ratings.setdefault(parts[0], []).extend(values)
    if not ratings:
        raise DataError(f"the VADER lexicon at {path} has no entries.")
    texts, labels, human = [], [], []
    for token, values in ratings.items():
        r = np.asarray(values, dtype=np.float64)
        mean = r.mean()
        if mean == 0 or abs(mean) < neutral_margin:
            continue
        p_pos = ((r > 0).sum() + 0.5 * (r == 0).sum()) / len(r)
        texts.append(token)
        labels.append(int(mean > 0))
        human.append((1.0 - p_pos, p_pos))
    return ClassificationSplit(
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        label_names=LABEL_NAMES,
        human_probs=np.asarray(human, dtype=np.float64),
        ids=tuple(texts),
    )


def vader_splits(
    seed: int = SPLIT_SEED, neutral_margin: float = 0.0, path: str | Path | None = None
) -> dict[str, ClassificationSplit]:
    """The fixed ``train`` / ``validation`` / ``test`` splits (70 / 10 / 20%) of :func:`load_vader`."""
    everything = load_vader(path, neutral_margin=neutral_margin)
    train, validation, test = split_indices(len(everything), SPLIT_FRACTIONS, seed)
    return {
        "train": everything.subset(train),
        "validation": everything.subset(validation),
        "test": everything.subset(test),
    }
