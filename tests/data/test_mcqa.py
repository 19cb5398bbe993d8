"""AI2-schema multiple-choice JSONL, the hub schemas through a local `datasets` load, and the batching."""

import json

import pytest
import torch

from pyrolora.data import MultipleChoiceLoader, load_mcqa_jsonl, load_splits
from pyrolora.errors import DataError


def question(i, labels=("A", "B", "C", "D"), answer=None):
    choices = [{"text": f"option {k} of {i}", "label": lab} for k, lab in enumerate(labels)]
    return {"id": f"q{i}", "question": {"stem": f"question {i}?", "choices": choices}, "answerKey": answer or labels[1]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_labels_a_to_e_and_1_to_5_map_to_option_positions(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [question(0), question(1, ("1", "2", "3"), "3"), question(2, "ABCDE", "E")])
    split = load_mcqa_jsonl(f)
    assert split.labels.tolist() == [1, 2, 4] and split.num_options == 5
    assert split.choices[1] == ("option 0 of 1", "option 1 of 1", "option 2 of 1")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"d\.jsonl:2: not valid JSON"),
        (json.dumps({"question": {"choices": []}, "answerKey": "A"}), r"d\.jsonl:2: no question text"),
        (json.dumps({**question(1), "answerKey": "F"}), r"d\.jsonl:2: answerKey 'F' is not among the choice labels"),
        (json.dumps({k: v for k, v in question(1).items() if k != "answerKey"}), r"d\.jsonl:2: no answerKey"),
        (json.dumps(question(1, ("A", "B", "B", "C"), "B")), r"d\.jsonl:2: choice labels \['B'\] occur more than once"),
        (json.dumps({"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}}), "at least two options"),
        (json.dumps({"question": {"stem": "s", "choices": [{"label": "A"}, {}]}}), r"choice 0 must be an object"),
    ],
)
def test_malformed_lines_name_file_line_and_value(tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(question(0)) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_mcqa_jsonl(path)


def test_empty_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no questions"):
        load_mcqa_jsonl(tmp_path / "d.jsonl")


def test_hub_path_through_a_local_datasets_load(tmp_path):
    # the allenai/ai2_arc schema: question is a string, choices a dict of lists; datasets infers the splits
    # from the file names, exactly as it would for a hub repository
    def arc(i, labels=("A", "B", "C", "D")):
        return {
            "id": f"q{i}",
            "question": f"question {i}?",
            "choices": {"text": [f"o{k}" for k in range(len(labels))], "label": list(labels)},
            "answerKey": labels[i % len(labels)],
        }

    write_jsonl(tmp_path / "train.jsonl", [arc(i) for i in range(20)])
    write_jsonl(tmp_path / "validation.jsonl", [arc(i, ("1", "2", "3")) for i in range(6)])
    splits = load_splits("mcqa", source="hub", path=str(tmp_path), validation_fraction=0.25)
    assert len(splits["train"]) == 15 and len(splits["validation"]) == 5 and len(splits["test"]) == 6
    assert splits["test"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert {s.num_options for s in splits.values()} == {4}  # all splits share C

    # the nyu-mll/glue schema for a GLUE-style task: integer labels are class indices; -1 (hidden test) is not
    glue = tmp_path / "glue"
    glue.mkdir()
    write_jsonl(glue / "train.jsonl", [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(10)])
    write_jsonl(glue / "validation.jsonl", [{"sentence": "x", "label": 1, "idx": 0}])
    sst = load_splits("sst2", source="hub", path=str(glue), validation_fraction=0.2)
    assert sst["test"].labels.tolist() == [1] and len(sst["train"]) == 8
    write_jsonl(glue / "validation.jsonl", [{"sentence": "x", "label": -1, "idx": 0}])
    with pytest.raises(DataError, match=r"label -1 is outside \[0, 2\)"):
        load_splits("sst2", source="hub", path=str(glue), validation_fraction=0.2)


def test_unreachable_hub_id_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot load"):
        load_splits("arc_easy", source="hub", path=str(tmp_path / "missing-dataset"))


class CharTokenizer:
    """One token per character (ids = code points), pad id 0: enough to check the batching exactly."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_loglik_batches_mark_exactly_the_option_tokens(tmp_path):
    split = load_mcqa_jsonl(write_jsonl(tmp_path / "d.jsonl", [question(0, ("A", "B")), question(1, "ABC", "C")]))
    loader = MultipleChoiceLoader(split, CharTokenizer(), batch_size=2, max_length=200)
    inputs, targets = next(iter(loader))
    assert inputs["input_ids"].shape[:2] == (2, 3) and targets.tolist() == [1, 2]
    assert inputs["choice_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    row = inputs["input_ids"][1, 2][inputs["attention_mask"][1, 2].bool()]
    marked = inputs["input_ids"][1, 2][inputs["target_mask"][1, 2].bool()]
    assert "".join(map(chr, row.tolist())) == "Question: question 1?\nAnswer: option 2 of 1"
    assert "".join(map(chr, marked.tolist())) == " option 2 of 1"
    letters = MultipleChoiceLoader(split, CharTokenizer(), batch_size=2, max_length=200, scoring="letters")
    inputs, _ = next(iter(letters))
    text = "".join(map(chr, inputs["input_ids"][1][inputs["attention_mask"][1].bool()].tolist()))
    assert text.endswith("\nC. option 2 of 1\nAnswer:") and inputs["input_ids"].dim() == 2
    short = MultipleChoiceLoader(split, CharTokenizer(), batch_size=2, max_length=20)
    inputs, _ = next(iter(short))
    assert inputs["attention_mask"].sum(-1).max() <= 20  # the question is cut from the left, the option kept
    assert torch.equal(inputs["target_mask"].sum(-1)[1, 2], torch.tensor(len(" option 2 of 1")))


@pytest.mark.slow
def test_real_qa_files_have_the_official_sizes(data_dir):
    for name, (n_train, n_dev) in {
        "arc_easy": (2251, 570),
        "arc_challenge": (1119, 299),
        "openbookqa": (4957, 500),
    }.items():
        assert len(load_mcqa_jsonl(data_dir / "mcqa" / name / "train.jsonl")) == n_train
        assert len(load_mcqa_jsonl(data_dir / "mcqa" / name / "dev.jsonl")) == n_dev
