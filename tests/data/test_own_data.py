"""Your own data: one CSV / TSV / JSON / JSONL file from one config line, a datasets.Dataset, dict batches."""

import json

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from typer.testing import CliRunner

import pyrolora as pl
from pyrolora.backbones import load_sequence_classifier, load_tokenizer
from pyrolora.cli import app
from pyrolora.data import TokenizedLoader, TsvSpec, load_splits, load_tsv
from pyrolora.errors import DataError
from tests.conftest import tiny_bert

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def rows(n=40):
    return [(f"a {WORDS[i % 6]} film, {i}", "pos" if i % 6 < 3 else "neg") for i in range(n)]


def write_format(folder, suffix, data):
    path = folder / f"reviews{suffix}"
    if suffix == ".csv":  # quoted fields with commas, and one that spans two lines
        body = "".join(f'"{t}",{y}\n' for t, y in data)
        path.write_text('text,label\n"a long\nreview, over two lines",pos\n' + body, encoding="utf-8")
        data = [("a long\nreview, over two lines", "pos"), *data]
    elif suffix == ".tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in data), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in data), encoding="utf-8")
    else:
        path.write_text(json.dumps([{"text": t, "label": y} for t, y in data]), encoding="utf-8")
    return path, data


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_one_file_of_any_format_gives_seeded_train_validation_and_test_splits(tmp_path, suffix):
    path, data = write_format(tmp_path, suffix, rows())
    splits = load_splits("tsv", path=str(path), tsv=TsvSpec((), "label", ()), test_fraction=0.25, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    # labels inferred from the file, sorted: class 0 = "neg", class 1 = "pos"
    assert splits["test"].label_names == ("neg", "pos")
    got = {t: y for s in splits.values() for t, y in zip(s.texts, s.labels.tolist(), strict=True)}
    assert got == {t: int(y == "pos") for t, y in data}  # every row exactly once, with its own label
    assert len(splits["test"]) == round(0.25 * len(data))
    again = load_splits("tsv", path=str(path), tsv=TsvSpec((), "label", ()), test_fraction=0.25, seed=3)
    assert again["test"].texts == splits["test"].texts  # the split is seeded


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("r.csv", 'text,label\n"ok",pos\n"unclosed,neg\n', r"r\.csv:3: not valid CSV"),
        ("r.csv", "text,label\nok,pos\nbad,neg,extra\n", r"r\.csv:3: expected 2 comma-separated fields"),
        ("r.csv", "text,label\nok,pos\nfine,meh\n", r"r\.csv:3: label 'meh' is not one of"),
        ("r.jsonl", '{"text": "ok", "label": "pos"}\n{"text": "x"\n', r"r\.jsonl:2: not valid JSON"),
        ("r.jsonl", '{"text": "ok", "label": "pos"}\n{"label": "neg"}\n', r"r\.jsonl:2: the record has no field"),
        ("r.json", '[{"text": "ok",\n "label": ]', r"r\.json:2: not valid JSON"),
        ("r.json", '[{"text": 3, "label": "pos"}]', r"r\.json\[record 0\]: the text in column 'text' must be"),
        ("r.parquet", "x", r"cannot tell the format from the suffix '\.parquet'"),
    ],
)
def test_malformed_own_files_name_file_line_and_fix(tmp_path, name, text, match):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_tsv(tmp_path / name, TsvSpec(("text",), "label", ("neg", "pos")))


def test_a_folder_without_an_evaluation_file_splits_one_off_and_named_columns_are_used(tmp_path):
    body = "".join(f'{y},"{t}"\n' for t, y in rows(30))
    (tmp_path / "train.csv").write_text("stars,review\n" + body, encoding="utf-8")
    spec = TsvSpec(("review",), "stars", ("neg", "pos"), train_file="train.csv")
    splits = load_splits("tsv", path=str(tmp_path), tsv=spec, test_fraction=0.2)
    assert sum(len(s) for s in splits.values()) == 30 and len(splits["test"]) == 6
    with pytest.raises(DataError, match=r"no text column given .* \['stars', 'review'\]"):
        load_splits("tsv", path=str(tmp_path), tsv=TsvSpec((), "stars", (), train_file="train.csv"))


@pytest.mark.slow
def test_cli_trains_from_a_single_csv_file_given_in_one_config_line(tmp_path, tiny_model_dir):
    path, data = write_format(tmp_path, ".csv", rows(50))
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = {{ name = "tsv", path = "{path}" }}\n'  # the one line; the rest only makes it small
        f'[model]\nname = "{tiny_model_dir}"\nmax_length = 16\n[adapters]\nrank = 2\n'
        '[guide]\nname = "delta"\n[train]\nepochs = 1\nbatch_size = 16\n[predict]\nnum_samples = 1\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_examples"] == round(0.2 * len(data))  # the default test_fraction


def test_fit_and_predict_take_a_datasets_dataset_through_the_tokenized_loader():
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    label = datasets.ClassLabel(names=["neg", "pos"])
    features = datasets.Features({"text": datasets.Value("string"), "label": label})
    train = datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows(24)], "label": [int(y == "pos") for _, y in rows(24)]}, features=features
    )
    loader = TokenizedLoader(train, tokenizer, batch_size=8, max_length=16)  # the one call
    assert loader.split.label_names == ("neg", "pos")
    assert loader.targets.tolist() == train["label"]
    model, guide = _tiny_model(len(train))
    result = pl.fit(model, guide, loader, num_steps=3)
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    with pytest.raises(DataError, match=r"datasets\.Dataset, which yields single rows.*TokenizedLoader\(dataset"):
        pl.fit(model, guide, train, num_steps=1)
    with pytest.raises(DataError, match=r"yields single rows"):
        pl.predict(model, guide, train, num_samples=2)


def _tiny_model(n):
    torch.manual_seed(0)
    backbone = tiny_bert(num_labels=2)
    backbone.resize_token_embeddings(30522)
    adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=2, target_modules=["query", "value"]))
    model = pl.BayesianLoraModel(backbone, adapters, prior=pl.priors.IsotropicNormal(0.1), dataset_size=n)
    return model, pl.guides.make("lowrank", model, rank=2)


def test_a_dataloader_of_dict_batches_with_labels_trains_like_pairs(tiny_model_dir):
    # what a Hugging Face pipeline hands over: a tokenized dataset, DataCollatorWithPadding, "labels" in the dict
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts, labels = [t for t, _ in rows(16)], [int(y == "pos") for _, y in rows(16)]
    tokenized = datasets.Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"]
    )
    collate = DataCollatorWithPadding(tokenizer)
    dicts = DataLoader(tokenized, batch_size=8, collate_fn=collate)

    def as_pair(examples):
        batch = collate(examples)
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]

    # a DataLoader draws a seed from torch's generator on every pass: compare with one, not with a list
    pairs = DataLoader(tokenized, batch_size=8, collate_fn=as_pair)
    assert "labels" in next(iter(dicts))
    losses = []
    for data in (dicts, pairs):
        pyro_clear()
        torch.manual_seed(0)  # the same guide initialisation for both runs
        backbone = load_sequence_classifier(str(tiny_model_dir), num_labels=2)
        adapters = pl.inject_adapters(backbone, pl.LoraXSConfig(rank=2, target_modules=["query", "value"]))
        model = pl.BayesianLoraModel(backbone, adapters, dataset_size=16)
        guide = pl.guides.make("lowrank", model, rank=2)
        losses.append(pl.fit(model, guide, data, num_steps=4, seed=0).losses)
        assert pl.predict(model, guide, data, num_samples=2).mean.shape == (16, 2)
    assert losses[0] == losses[1]  # the same batches either way: identical losses (same seed, same arithmetic)
    # a dict batch without labels cannot be fitted: the message says what to pass
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in dicts]
    with pytest.raises(DataError, match=r"step 0 has no targets.*under 'labels'"):
        pl.fit(model, guide, unlabelled, num_steps=1)


def pyro_clear():
    import pyro

    pyro.clear_param_store()
