"""Multiple-choice question answering in the AI2 schema (ARC-Easy, ARC-Challenge, OpenBookQA), and its batching.

One JSON object per line::

    {"id": "...", "question": {"stem": "...", "choices": [{"text": "...", "label": "A"}, ...]}, "answerKey": "B"}

Choice labels are ``A``-``E`` or ``1``-``5`` (ARC mixes both); the class of an example is the *position* of
``answerKey`` among its choices, so the labels themselves never reach the model. Questions have 3 to 5
choices: a task's number of classes C is the largest count over its splits, and missing options are masked
(their probability is exactly 0).

Two ways to score the options with a causal LM (see :mod:`pyrolora.models.multiple_choice`), chosen by
``scoring``:

- ``"loglik"`` (default): one row per option, ``"Question: {stem}\\nAnswer: {option}"``; the option's score is
  the mean log-probability of its tokens given the question.
- ``"letters"``: one row per question listing every option after a letter; the score of option k is the LM's
  logit of the k-th letter as the next token after ``"Answer:"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pyrolora.data.base import read_text
from pyrolora.errors import DataError

__all__ = [
    "LETTERS",
    "MultipleChoiceLoader",
    "MultipleChoiceSplit",
    "Scoring",
    "hub_records_to_mcqa",
    "load_mcqa_jsonl",
]

Scoring = Literal["loglik", "letters"]
#: Letters shown before the options in the ``letters`` prompt, whatever labels the file uses.
LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")


@dataclass(frozen=True)
class MultipleChoiceSplit:
    """One split of a multiple-choice task.

    Attributes:
        questions: the question stems, length N.
        choices: the option texts of each question (2 or more each), length N.
        labels: index of the correct option, shape (N,).
        num_options: C, the number of classes (at least the longest choice list).
        ids: optional identifier per question.
    """

    questions: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...]
    labels: np.ndarray
    num_options: int
    ids: tuple[str, ...] | None = None

    #: no human label distributions for these tasks (kept for the evaluation code that looks for them)
    human_probs = None

    def __post_init__(self) -> None:
        n = len(self.questions)
        if n == 0:
            raise DataError("a multiple-choice split has no questions.")
        if len(self.choices) != n or self.labels.shape != (n,):
            raise DataError(f"{n} questions but {len(self.choices)} choice lists and labels of {self.labels.shape}.")
        longest = max(len(c) for c in self.choices)
        if self.num_options < longest:
            raise DataError(f"num_options={self.num_options} is below the longest choice list ({longest}).")
        bad = [i for i, (c, y) in enumerate(zip(self.choices, self.labels, strict=True)) if not 0 <= y < len(c)]
        if bad:
            raise DataError(f"labels of questions {bad[:5]} point outside their choice lists.")

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def num_classes(self) -> int:
        return self.num_options

    @property
    def label_names(self) -> tuple[str, ...]:
        return LETTERS[: self.num_options]

    def subset(self, index: Sequence[int] | np.ndarray) -> MultipleChoiceSplit:
        """The questions at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return MultipleChoiceSplit(
            questions=tuple(self.questions[i] for i in index),
            choices=tuple(self.choices[i] for i in index),
            labels=self.labels[index],
            num_options=self.num_options,
            ids=None if self.ids is None else tuple(self.ids[i] for i in index),
        )

    def with_num_options(self, num_options: int) -> MultipleChoiceSplit:
        """The same questions with C = ``num_options`` classes (so that all splits of a task agree)."""
        return MultipleChoiceSplit(self.questions, self.choices, self.labels, num_options, self.ids)


def _question(record: Any, where: str) -> tuple[str, tuple[str, ...], int, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    question = record.get("question")
    if isinstance(question, dict):  # AI2 JSONL: {"question": {"stem", "choices"}}
        stem, choices = question.get("stem"), question.get("choices")
    else:  # hub schemas: ai2_arc {"question": str, "choices": {...}}, openbookqa {"question_stem": str, ...}
        stem = question if isinstance(question, str) else record.get("question_stem")
        choices = record.get("choices")
    if not isinstance(stem, str):
        raise DataError(f"{where}: no question text (question.stem); got keys {sorted(record)}. Fix the record.")
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # hub: {"text": [...], "label": [...]}
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(labels, list) or len(labels) != len(texts):
            raise DataError(f"{where}: choices.text and choices.label must be lists of equal length.")
        choices = [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)]
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: question.choices must be a list of at least two options, got {choices!r:.100}.")
    option_texts, option_labels = [], []
    for k, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) or "label" not in choice:
            raise DataError(f"{where}: choice {k} must be an object with 'text' and 'label', got {choice!r:.100}.")
        option_texts.append(choice["text"])
        option_labels.append(str(choice["label"]).strip())
    repeated = sorted({lab for lab in option_labels if option_labels.count(lab) > 1})
    if repeated:  # the answer would silently map to the first of them
        raise DataError(
            f"{where}: choice labels {repeated} occur more than once in {option_labels}, so the answerKey cannot "
            "tell which option is correct; give every choice of a question its own label."
        )
    answer = record.get("answerKey")
    if answer is None:
        raise DataError(f"{where}: no answerKey; every question needs the label of its correct choice.")
    answer = str(answer).strip()
    if answer not in option_labels:
        raise DataError(
            f"{where}: answerKey {answer!r} is not among the choice labels {option_labels}; fix the record "
            "(labels are A-E or 1-5)."
        )
    return stem, tuple(option_texts), option_labels.index(answer), str(record.get("id", where))


def _build(rows: list[tuple[str, tuple[str, ...], int, str]], num_options: int | None) -> MultipleChoiceSplit:
    longest = max(len(r[1]) for r in rows)
    return MultipleChoiceSplit(
        questions=tuple(r[0] for r in rows),
        choices=tuple(r[1] for r in rows),
        labels=np.asarray([r[2] for r in rows], dtype=np.int64),
        num_options=max(longest, num_options or 0),
        ids=tuple(r[3] for r in rows),
    )


def load_mcqa_jsonl(path: str | Path, num_options: int | None = None) -> MultipleChoiceSplit:
    """Read an AI2-schema JSONL file (one question per line).

    Raises:
        DataError: when the file is missing or empty, a line is not JSON, a record lacks its stem, choices or
            answerKey, the answerKey is not one of its choice labels, or two choices share a label; the message
            names file and line.
    """
    path = Path(path)
    lines = read_text(path).splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}): {line[:100]!r}. Fix the line.") from None
        rows.append(_question(record, f"{path}:{number}"))
    if not rows:
        raise DataError(f"{path} has no questions; give a JSONL file with one question object per line.")
    return _build(rows, num_options)


def hub_records_to_mcqa(
    records: Sequence[Mapping[str, Any]], source: str, num_options: int | None = None
) -> MultipleChoiceSplit:
    """Rows of a Hugging Face dataset (``allenai/ai2_arc``, ``allenai/openbookqa``) into a split."""
    if len(records) == 0:
        raise DataError(f"{source} has no rows; choose a labelled split.")
    rows = [_question(dict(r), f"{source} row {i}") for i, r in enumerate(records)]
    return _build(rows, num_options)


class MultipleChoiceLoader:
    """Batches ``(inputs, targets)`` of a multiple-choice split for a causal LM, tokenized once up front.

    ``inputs`` for ``scoring="loglik"``: ``input_ids`` and ``attention_mask`` (B, C, T), ``target_mask``
    (B, C, T) marking the option's tokens, ``choice_mask`` (B, C). For ``scoring="letters"``: ``input_ids`` and
    ``attention_mask`` (B, T) and ``choice_mask`` (B, C). Rows are right-padded. Re-iterable; with ``shuffle``
    every pass takes a new permutation from a generator seeded with ``seed``.

    Args:
        split: the questions.
        tokenizer: the LM's tokenizer.
        batch_size: questions per batch.
        max_length: token limit per row; the question is cut from the left, the option is kept.
        scoring: ``"loglik"`` or ``"letters"``.
        shuffle: reshuffle every pass.
        seed: seed of the shuffling.
    """

    def __init__(
        self,
        split: MultipleChoiceSplit,
        tokenizer,
        *,
        batch_size: int,
        max_length: int = 128,
        scoring: Scoring = "loglik",
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}.")
        if scoring not in ("loglik", "letters"):
            raise DataError(f"scoring must be 'loglik' or 'letters', got {scoring!r}.")
        if split.num_options > len(LETTERS):
            raise DataError(f"at most {len(LETTERS)} options are supported, the task has {split.num_options}.")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.scoring = scoring
        self._generator = torch.Generator().manual_seed(seed)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.targets = torch.as_tensor(split.labels, dtype=torch.long)

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self._rows: list[list[tuple[list[int], int]]] = []  # per question: (ids, number of option tokens)
        for stem, options in zip(split.questions, split.choices, strict=True):
            if scoring == "letters":
                listing = "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(options))
                ids = encode(f"Question: {stem}{listing}\nAnswer:")[-max_length:]
                self._rows.append([(ids, 0)])
            else:
                prompt = encode(f"Question: {stem}\nAnswer:")
                rows = []
                for option in options:
                    cont = encode(" " + option)[: max_length - 1] or [self._pad_id]
                    rows.append((prompt[-(max_length - len(cont)) :] + cont, len(cont)))
                self._rows.append(rows)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def _collate(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        picked = index.tolist()
        c = self.split.num_options
        choice_mask = torch.zeros(len(picked), c, dtype=torch.long)
        for b, i in enumerate(picked):
            choice_mask[b, : len(self.split.choices[i])] = 1
        if self.scoring == "letters":
            length = max(len(self._rows[i][0][0]) for i in picked)
            ids = torch.full((len(picked), length), self._pad_id, dtype=torch.long)
            mask = torch.zeros(len(picked), length, dtype=torch.long)
            for b, i in enumerate(picked):
                row = self._rows[i][0][0]
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            inputs = {"input_ids": ids, "attention_mask": mask, "choice_mask": choice_mask}
            return inputs, self.targets[index]
        length = max(len(r[0]) for i in picked for r in self._rows[i])
        ids = torch.full((len(picked), c, length), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(picked), c, length, dtype=torch.long)
        target = torch.zeros(len(picked), c, length, dtype=torch.long)
        for b, i in enumerate(picked):
            for k, (row, n_option) in enumerate(self._rows[i]):
                ids[b, k, : len(row)] = torch.tensor(row)
                mask[b, k, : len(row)] = 1
                target[b, k, len(row) - n_option : len(row)] = 1
            for k in range(len(self._rows[i]), c):  # a missing option: one padding token, masked out later
                mask[b, k, 0] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "target_mask": target, "choice_mask": choice_mask}
        return inputs, self.targets[index]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self._collate(order[start : start + self.batch_size])
