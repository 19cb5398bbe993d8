"""GLUE-format TSV loading: the real SST-2 / RTE / CoLA files, a task from a spec alone, and every input error."""

import numpy as np
import pytest

from pyrolora.data import GLUE_TASKS, TsvSpec, load_splits, load_tsv
from pyrolora.errors import DataError

PAIR = TsvSpec(("premise", "hypothesis"), "gold", ("yes", "no"), ("entail", "contradict"))


def write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_a_task_from_a_spec_alone_with_bom_crlf_and_quotes(tmp_path):
    # a byte-order mark, Windows line ends, a bare quote and a trailing blank line must all be tolerated
    f = write(
        tmp_path / "t.tsv", 'id\tpremise\thypothesis\tgold\r\n1\tA "quoted\tB\tno\r\n2\tC\tD\tyes\r\n\r\n', bom=True
    )
    split = load_tsv(f, PAIR)
    assert split.texts == ('A "quoted', "C") and split.text_pairs == ("B", "D")
    assert split.labels.tolist() == [1, 0] and split.label_names == ("entail", "contradict")


def test_headerless_file_with_declared_columns(tmp_path):
    spec = TsvSpec(("text",), "y", ("0", "1"), columns=("src", "y", "star", "text"))
    split = load_tsv(write(tmp_path / "c.tsv", "a\t1\t\tgood one\nb\t0\t*\tbad one\n"), spec)
    assert split.texts == ("good one", "bad one") and split.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"t\.tsv is empty"),
        ("id\tpremise\thypothesis\tgold\n", r"t\.tsv has no example rows"),
        ("id\tpremise\tgold\n1\ta\tyes\n", r"no column\(s\) \['hypothesis'\]"),
        ("id\tpremise\thypothesis\tgold\n1\ta\tb\tyes\n2\ta\tb\n", r"t\.tsv:3: expected 4 tab-separated fields"),
        ("id\tpremise\thypothesis\tgold\n1\ta\tb\tmaybe\n", r"t\.tsv:2: label 'maybe' is not one of .*'yes', 'no'"),
    ],
)
def test_malformed_files_name_file_line_and_value(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        load_tsv(write(tmp_path / "t.tsv", text), PAIR)


def test_missing_file_says_how_to_point_at_the_data(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; point the task's data folder"):
        load_tsv(tmp_path / "nope.tsv", PAIR)


def test_bad_specs_are_rejected():
    with pytest.raises(DataError, match="one or two columns"):
        TsvSpec(("a", "b", "c"), "y", ("0", "1"))
    with pytest.raises(DataError, match="at least two distinct"):
        TsvSpec(("a",), "y", ("0", "0"))
    with pytest.raises(DataError, match=r"not among the declared columns"):
        TsvSpec(("a",), "y", ("0", "1"), columns=("a", "label"))


def test_custom_tsv_task_carves_validation_from_train_and_uses_dev_as_test(tmp_path):
    rows = "".join(f"{i}\tp{i}\th{i}\t{'yes' if i % 3 else 'no'}\n" for i in range(50))
    write(tmp_path / "train.tsv", "id\tpremise\thypothesis\tgold\n" + rows)
    write(tmp_path / "dev.tsv", "id\tpremise\thypothesis\tgold\n1\tx\ty\tyes\n2\tz\tw\tno\n")
    splits = load_splits("tsv", path=str(tmp_path), tsv=PAIR, validation_fraction=0.2, seed=3)
    assert len(splits["train"]) == 40 and len(splits["validation"]) == 10 and len(splits["test"]) == 2
    assert not set(splits["train"].texts) & set(splits["validation"].texts)  # a partition, not a resample
    again = load_splits("tsv", path=str(tmp_path), tsv=PAIR, validation_fraction=0.2, seed=3)
    assert again["validation"].texts == splits["validation"].texts  # seeded


@pytest.mark.slow
def test_real_glue_files_have_the_official_sizes(data_dir):
    # row counts from $PYROLORA_DATA/README.md (train / dev)
    expected = {"sst2": (67349, 872), "rte": (2490, 277), "cola": (8551, 1043)}
    for name, (n_train, n_dev) in expected.items():
        spec = GLUE_TASKS[name]
        train = load_tsv(data_dir / "glue" / name / spec.train_file, spec)
        dev = load_tsv(data_dir / "glue" / name / spec.eval_file, spec)
        assert (len(train), len(dev)) == (n_train, n_dev), name
        assert set(np.unique(train.labels)) == {0, 1}
    rte = load_tsv(data_dir / "glue/rte/dev.tsv", GLUE_TASKS["rte"])
    assert rte.text_pairs is not None and rte.label_names == ("entailment", "not_entailment")
    cola = load_splits("cola", data_dir=str(data_dir), max_train=300, max_eval=50)
    assert len(cola["train"]) + len(cola["validation"]) == 300 and len(cola["out_of_domain"]) == 50
