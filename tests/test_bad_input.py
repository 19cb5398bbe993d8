"""Bad input answered by the package's own errors, each naming the bad value and the fix."""

import warnings

import numpy as np
import pytest
import torch

from pyrolora.data import ClassificationSplit, TokenizedLoader, load_vader, vader_splits
from pyrolora.errors import ConfigError, DataError, PyroloraError, TargetError, TruncationWarning
from pyrolora.models.backbones import check_tokenizer, load_tokenizer
from pyrolora.runs.build import build
from pyrolora.runs.config import RunConfig, load_config
from tests.conftest import tiny_bert


def _split(texts, labels=None):
    labels = np.arange(len(texts)) % 2 if labels is None else labels
    return ClassificationSplit(texts=tuple(texts), labels=np.asarray(labels), label_names=("neg", "pos"))


def _splits(texts):
    s = _split(texts)
    return {"train": s, "validation": s, "test": s}


def _config(model_dir, **sections):
    base = {
        "model": {"name": str(model_dir), "max_length": 16},
        "adapters": {"rank": 2, "target_modules": ["query", "value"]},
        "guide": {"name": "delta"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return RunConfig.from_dict(base)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("[train]\nepochs = inf\n", "train.epochs must be finite"),
        ("[train]\nlr = nan\n", "train.lr must be finite"),
        ("[train]\nwarmup = -0.5\n", "train.warmup must be >= 0"),
        ("[predict]\nn_bins = 0\n", "predict.n_bins must be positive"),
        ("[adapters]\nrank = 2.5\n", "adapters.rank must be an integer"),
        ("[adapters]\nlayers_to_transform = [-1]\n", "layers_to_transform must be non-negative"),
        ("[task]\nneutral_margin = -1\n", "task.neutral_margin must be >= 0"),
        ('[model]\nname = ""\n', "model.name is empty"),
        ("[guide]\noptions = 3\n", "guide.options must be a table"),
        ("model = 3\n", r"\[model\] must be a table"),
    ],
)
def test_impossible_config_values_are_named(tmp_path, toml, match):
    path = tmp_path / "c.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_a_json_config_that_is_not_a_table(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a table of sections, got list"):
        load_config(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"cannot read config file .*c\.json"):
        load_config(path)


@pytest.mark.parametrize(
    ("sections", "error", "match"),
    [
        ({"adapters": {"rank": 32}}, TargetError, r"rank 32 exceeds min\(out=16, in=16\)"),
        ({"adapters": {"target_modules": ["nonexistent"]}}, TargetError, "nonexistent"),
        ({"guide": {"name": "lowrank", "options": {"rank": 99}}}, ConfigError, "exceeds the latent dimension D=16"),
        ({"guide": {"name": "lowrank", "options": {"sharpness": 1}}}, ConfigError, r"rejected options \['sharpness'\]"),
        ({"model": {"name": "/nonexistent/model/folder"}}, ConfigError, "cannot load model"),
    ],
)
def test_values_impossible_for_the_model_fail_at_build(tiny_model_dir, sections, error, match):
    with pytest.raises(error, match=match):
        build(_config(tiny_model_dir, **sections), _splits(["good", "bad"]))


# ------------------------------------------------------------------------------------------------ data
def test_empty_unreadable_and_binary_lexicons(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no entries"):
        load_vader(empty)
    with pytest.raises(DataError, match="cannot read the VADER lexicon"):
        load_vader(tmp_path)  # a folder, not a file
    with pytest.raises(DataError, match="cannot read the VADER lexicon"):
        load_vader(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x80\x81\x82 not utf-8")
    with pytest.raises(DataError, match="UTF-8"):
        load_vader(binary)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("\t1.0\t0.5\t[1, 1]", "entry .first field. is empty"),
        ("w\t1.0\t0.5\t[1, 9]", "integers from -4 to 4"),
        ("w\t1.0\t0.5\t[true, 1]", "integers from -4 to 4"),
        ("w\t1.0\t0.5\t[]", "non-empty list"),
        ("w\t1.0\t0.5\t" + "[" * 5000 + "]" * 5000, "are not a list"),
        ("w\t1.0\t0.5\t[100000000000000000000000000000000000000000000]", "integers from -4 to 4"),
    ],
)
def test_malformed_lexicon_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "lex.txt"
    path.write_text(f"fine\t1.0\t0.5\t[1, 2]\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"lex.txt:2: .*{match}"):
        load_vader(path)


def test_a_lexicon_too_small_to_split(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("good\t1.0\t0.5\t[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        vader_splits(path=path)


def test_split_contents_are_checked():
    with pytest.raises(DataError, match="example 1: the text must be a string, got None"):
        _split(["a", None])
    with pytest.raises(DataError, match="integer class indices"):
        _split(["a", "b"], labels=np.array([0.0, 1.0]))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        _split(["a", "b"], labels=np.array([0, 2]))  # a label outside the label map
    with pytest.raises(DataError, match="human_probs must be finite"):
        ClassificationSplit(
            texts=("a",), labels=np.array([0]), label_names=("n", "p"), human_probs=np.array([[np.nan, 1.0]])
        )


def test_long_sequences_are_truncated_with_one_warning():
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    split = _split(["short", "a much longer text " * 10, "another very long text " * 10, "tiny"])
    with pytest.warns(TruncationWarning, match="2 of 4 examples are longer than max_length=8") as record:
        loader = TokenizedLoader(split, tokenizer, batch_size=4, max_length=8)
    assert len(record) == 1  # one warning for the dataset, not one per example
    inputs, _ = next(iter(loader))
    assert inputs["input_ids"].shape == (4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and none when nothing is cut
        TokenizedLoader(_split(["short", "tiny"]), tokenizer, batch_size=2, max_length=8)


def test_max_length_beyond_the_model_is_capped_and_the_model_runs(tiny_model_dir):
    # the tiny model has 32 positions; without the cap a 100-token input would index past its embeddings
    run = build(_config(tiny_model_dir, model={"max_length": 100}), _splits(["word " * 60, "ok"]))
    assert run.max_length == 32
    with pytest.warns(TruncationWarning, match="capped at the 32 tokens the model allows") as record:
        loader = run.loader("train")
    assert len(record) == 1
    inputs, _ = next(iter(loader))
    assert inputs["input_ids"].shape[1] == 32
    with torch.no_grad():
        assert run.model.backbone(**inputs).logits.shape == (2, 2)


def test_mismatched_tokenizer_and_model(tmp_path):
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ConfigError, match="30522 tokens, but the model's input embedding has only 64 rows"):
        check_tokenizer(tokenizer, tiny_bert())
    folder = tmp_path / "mixed"  # a model folder whose tokenizer files belong to another model
    tiny_bert(num_labels=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match="tokenizer and weights belong to different models"):
        build(_config(folder), _splits(["good", "bad"]))


def test_every_error_class_is_a_pyrolora_error():
    for cls in (ConfigError, DataError, TargetError):
        assert issubclass(cls, PyroloraError) and issubclass(cls, ValueError)
