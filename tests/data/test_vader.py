import numpy as np
import pytest
import torch

from pyrolora.data import ClassificationSplit, TokenizedLoader, load_vader, vader_splits
from pyrolora.errors import DataError


def test_lexicon_is_loaded_with_pooled_duplicates():
    data = load_vader()
    assert len(data) == 7520 - 14  # 14 entries appear twice and are pooled
    assert len(set(data.texts)) == len(data)
    np.testing.assert_allclose(data.human_probs.sum(1), 1.0)
    i = data.texts.index("d:")  # rated once as a frown (mean -2.9) and once as a grin (mean 1.2)
    assert 0.3 < data.human_probs[i, 1] < 0.7


def test_labels_follow_the_sign_of_the_mean_rating():
    data = load_vader()
    i = data.texts.index("adorable")
    j = data.texts.index("abandon")
    assert data.labels[i] == 1 and data.labels[j] == 0
    # the majority of raters agrees with the label for almost every item (ties count half)
    agree = data.human_probs[np.arange(len(data)), data.labels]
    assert (agree >= 0.5).mean() > 0.98


def test_splits_are_fixed_disjoint_and_complete():
    a, b = vader_splits(), vader_splits()
    sizes = {k: len(v) for k, v in a.items()}
    assert sizes == {"train": 5254, "validation": 751, "test": 1501}
    assert all(a[k].texts == b[k].texts for k in a)
    names = [set(a[k].texts) for k in a]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(map(len, names)) == len(load_vader())


def test_neutral_margin_drops_near_neutral_items():
    kept = load_vader(neutral_margin=0.5)
    everything = load_vader()
    assert 0 < len(everything) - len(kept) < 1000


def test_malformed_lexicon_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "lex.txt"
    bad.write_text("good\t1.0\t0.5\t[1, 1]\nbroken line\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lex.txt:2: expected 4"):
        load_vader(bad)
    bad.write_text("good\t1.0\t0.5\t[1, x]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lex.txt:1: the ratings"):
        load_vader(bad)


class _ToyTokenizer:
    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=8):
        ids = [[1, *[2 + (ord(ch) % 50) for ch in t][: max_length - 2], 3] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def test_loader_pads_per_batch_and_reshuffles_reproducibly():
    split = ClassificationSplit(
        texts=("a", "bb", "ccc", "dddd", "eeeee"), labels=np.array([0, 1, 0, 1, 0]), label_names=("n", "p")
    )
    loader = TokenizedLoader(split, _ToyTokenizer(), batch_size=2, shuffle=True, seed=3)
    assert len(loader) == 3

    def order(batches):  # text lengths identify the examples: length k+2 tokens for text number k
        return torch.cat([inputs["attention_mask"].sum(1) for inputs, _ in batches]).tolist()

    first, second = list(loader), list(loader)
    assert sorted(order(first)) == [3, 4, 5, 6, 7]  # every example exactly once per pass
    assert order(first) != order(second)  # each pass draws a new permutation
    inputs, targets = first[0]
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, max(order(first)[:2]))
    assert targets.tolist() == [split.labels[n - 3] for n in order(first)[:2]]
    again = TokenizedLoader(split, _ToyTokenizer(), batch_size=2, shuffle=True, seed=3)
    assert order(list(again)) == order(first)  # same seed, same batches
    plain = TokenizedLoader(split, _ToyTokenizer(), batch_size=2)
    assert order(list(plain)) == [3, 4, 5, 6, 7]


def test_split_validation():
    with pytest.raises(DataError, match="no examples"):
        ClassificationSplit(texts=(), labels=np.zeros(0, dtype=int), label_names=("a", "b"))
    with pytest.raises(DataError, match="labels must lie"):
        ClassificationSplit(texts=("x",), labels=np.array([2]), label_names=("a", "b"))
