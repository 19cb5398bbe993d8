"""Task data in memory (batching it for a tokenizer: :mod:`pyrolora.data.loader`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyrolora.errors import DataError

__all__ = ["ClassificationSplit", "read_text", "split_indices"]


@dataclass(frozen=True)
class ClassificationSplit:
    """One split of a text classification task.

    Attributes:
        texts: the input texts, length N.
        labels: class indices, shape (N,).
        label_names: name of each class, length C.
        text_pairs: optional second texts (sentence-pair tasks), length N.
        human_probs: optional human label distribution per example, shape (N, C) (rows sum to 1).
        ids: optional identifier per example, length N.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None
    human_probs: np.ndarray | None = None
    ids: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if n == 0:
            raise DataError("a data split has no examples.")
        for name, seq in (("text", self.texts), ("second text", self.text_pairs or ())):
            bad = next((i for i, t in enumerate(seq) if not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(f"example {bad}: the {name} must be a string, got {seq[bad]!r}.")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype.kind not in "iu":
            raise DataError(
                f"labels must be a NumPy array of integer class indices, got {type(self.labels).__name__} of "
                f"{getattr(self.labels, 'dtype', '?')}; map label names to indices first."
            )
        if self.labels.shape != (n,):
            raise DataError(f"{n} texts but labels of shape {self.labels.shape}.")
        c = len(self.label_names)
        if c < 2:
            raise DataError(f"a classification task needs at least two classes, got {list(self.label_names)}.")
        if self.labels.min() < 0 or self.labels.max() >= c:
            raise DataError(f"labels must lie in [0, {c}), got values in [{self.labels.min()}, {self.labels.max()}].")
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise DataError(f"{n} texts but {len(self.text_pairs)} second texts.")
        if self.human_probs is not None and self.human_probs.shape != (n, c):
            raise DataError(f"human_probs must have shape ({n}, {c}), got {self.human_probs.shape}.")
        if self.human_probs is not None and not (np.isfinite(self.human_probs).all() and (self.human_probs >= 0).all()):
            raise DataError("human_probs must be finite and non-negative (a distribution over the classes per row).")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, index: Sequence[int] | np.ndarray) -> ClassificationSplit:
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)

        def pick(seq: tuple | None) -> tuple | None:
            return None if seq is None else tuple(seq[i] for i in index)

        return ClassificationSplit(
            texts=pick(self.texts),
            labels=self.labels[index],
            label_names=self.label_names,
            text_pairs=pick(self.text_pairs),
            human_probs=None if self.human_probs is None else self.human_probs[index],
            ids=pick(self.ids),
        )


def read_text(path: Path) -> str:
    """The whole text of a data file, line ends untouched ("\r" stays visible), a byte-order mark dropped.

    Raises:
        DataError: when the file is missing (naming where data are looked for and the hub alternative) or is
            not UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist; point the task's data folder (task.data_dir or $PYROLORA_DATA) at the "
            "folder that holds it, or load the task from the hub (task.source = 'hub')."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from err


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions (the last takes the rest)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f <= 0 for f in fractions):
        raise DataError(f"split fractions must be positive and sum to 1, got {list(fractions)}.")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([round(f * n) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(order, bounds)]
