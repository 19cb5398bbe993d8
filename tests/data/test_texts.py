"""The OOD text file formats of ``pyrolora.data.texts``, on small files and on the real GLUE layouts."""

import json

import numpy as np
import pytest

from pyrolora.data.texts import load_texts, unlabelled_split
from pyrolora.errors import DataError


def test_plain_text_tsv_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first one\n\n  second  \n", encoding="utf-8")
    assert load_texts(tmp_path / "a.txt") == (("first one", "second"), None)
    (tmp_path / "b.tsv").write_text('label\tsentence\n1\tit "quotes" fine\n0\tx\n', encoding="utf-8")
    assert load_texts(tmp_path / "b.tsv") == (('it "quotes" fine', "x"), None)
    (tmp_path / "c.tsv").write_text("src\t1\t\tno header here\n", encoding="utf-8")
    assert load_texts(tmp_path / "c.tsv", column=3) == (("no header here",), None)
    with pytest.raises(DataError, match="--ood-column"):
        load_texts(tmp_path / "c.tsv")
    (tmp_path / "d.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n", encoding="utf-8")
    assert load_texts(tmp_path / "d.tsv") == (("a",), ("b",))
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "t1"}) + "\n" + json.dumps({"sentence": "t2"}) + "\n")
    assert load_texts(tmp_path / "e.jsonl") == (("t1", "t2"), None)
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "e.csv")
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(DataError, match=r"\.txt, \.tsv or \.jsonl"):
        load_texts(tmp_path / "e.csv")


def test_limit_is_a_seeded_subset_in_file_order(tmp_path):
    (tmp_path / "n.txt").write_text("\n".join(f"t{i}" for i in range(100)), encoding="utf-8")
    texts, _ = load_texts(tmp_path / "n.txt", limit=10, seed=3)
    assert len(texts) == 10 and texts == load_texts(tmp_path / "n.txt", limit=10, seed=3)[0]
    index = [int(t[1:]) for t in texts]
    assert index == sorted(index) and texts != load_texts(tmp_path / "n.txt", limit=10, seed=4)[0]


def test_unlabelled_split_has_placeholder_labels():
    split = unlabelled_split(["a", "b"], ("neg", "pos"))
    assert len(split) == 2 and split.num_classes == 2 and (split.labels == 0).all()
    assert split.human_probs is None and isinstance(split.labels, np.ndarray)


def test_real_glue_files(data_dir):
    sst2, _ = load_texts(data_dir / "glue/sst2/dev.tsv")
    assert len(sst2) == 872 and sst2[0].startswith("it 's a charming")  # row counts from the data README
    cola_ood, _ = load_texts(data_dir / "glue/cola/raw/out_of_domain_dev.tsv", column=3)
    assert len(cola_ood) == 516 and cola_ood[0] == "Somebody just left - guess who."
    rte, pairs = load_texts(data_dir / "glue/rte/dev.tsv")
    assert len(rte) == len(pairs) == 277
