"""Property and fuzz tests (hypothesis): configs round-trip, metrics are bounded and order-free, and the
loaders, config reader and checkpoint reader fail only with the package's own errors on arbitrary input.

Example counts are modest (CI has two cores) and runs are derandomized, so CI is reproducible; raise
``max_examples`` locally to search harder.
"""

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyrolora import metrics
from pyrolora.data import ClassificationSplit, TokenizedLoader, load_vader
from pyrolora.errors import ConfigError, DataError, PyroloraError, RunFolderError
from pyrolora.inference import guides
from pyrolora.inference.checkpoint import read_checkpoint
from pyrolora.models.backbones import load_tokenizer
from pyrolora.runs.config import RunConfig, load_config

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ------------------------------------------------------------------------------------------------ configs
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=12)

valid_configs = st.fixed_dictionaries(
    {},
    optional={
        "model": st.fixed_dictionaries({}, optional={"name": names, "max_length": st.integers(1, 4096)}),
        "task": st.fixed_dictionaries(
            {}, optional={"name": st.just("vader"), "neutral_margin": st.floats(0, 4, allow_nan=False)}
        ),
        "adapters": st.fixed_dictionaries(
            {"rank": st.integers(1, 64)},
            optional={
                "alpha": positive,
                "target_modules": st.one_of(st.lists(names, min_size=1, max_size=4), st.just("all-linear")),
                "layers_to_transform": st.one_of(st.none(), st.lists(st.integers(0, 47), min_size=1, max_size=4)),
            },
        ),
        "prior": st.fixed_dictionaries({}, optional={"scale": positive}),
        "guide": st.fixed_dictionaries(
            {"name": st.sampled_from(guides.available())},
            optional={"options": st.dictionaries(names, st.integers(-9, 9) | positive, max_size=3)},
        ),
        "train": st.fixed_dictionaries(
            {},
            optional={
                "epochs": positive,
                "batch_size": st.integers(1, 4096),
                "lr": positive,
                "warmup": st.floats(0, 100, allow_nan=False),
                "schedule": st.sampled_from(["cosine", "linear", "constant"]),
                "num_particles": st.integers(1, 8),
                "seed": st.integers(0, 2**31),
            },
        ),
        "predict": st.fixed_dictionaries(
            {}, optional={"num_samples": st.integers(1, 64), "n_bins": st.integers(1, 50)}
        ),
    },
)


def _toml_value(value):
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)  # ints, and strings (JSON escapes are valid TOML basic strings)


def _to_toml(data):
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None)
    return "\n".join(lines) + "\n"


@FUZZ
@given(valid_configs)
def test_configs_round_trip_through_dicts_json_and_toml(tmp_path_factory, data):
    config = RunConfig.from_dict(data)
    assert RunConfig.from_dict(config.to_dict()) == config
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "c.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    assert load_config(folder / "c.json") == config
    (folder / "c.toml").write_text(_to_toml(config.to_dict()), encoding="utf-8")
    assert load_config(folder / "c.toml") == config


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**63])
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
section_keys = st.sampled_from(
    ["model", "task", "adapters", "prior", "guide", "train", "predict", "pyrolora_version", "other"]
)
edge_values = st.sampled_from([10**400, -(10**400), 2**63, -1, 0, 0.5, math.inf, math.nan, "", [], {}, True, None])
field_keys = st.sampled_from(
    ["name", "max_length", "rank", "alpha", "target_modules", "layers_to_transform", "layers_pattern", "scale",
     "options", "epochs", "batch_size", "lr", "warmup", "schedule", "seed", "num_samples", "svd_convention", "x"]
)  # fmt: skip


@FUZZ
@given(
    st.dictionaries(
        section_keys, st.dictionaries(field_keys, edge_values | json_values, max_size=4) | json_values, max_size=4
    )
)
def test_arbitrary_config_data_fails_only_with_config_error(data):
    try:
        RunConfig.from_dict(data)
    except ConfigError as err:
        assert str(err)  # a message, naming the value
    # any other exception escapes and fails the test


@FUZZ
@given(st.binary(max_size=300))
@pytest.mark.filterwarnings("ignore:.*sets nothing:UserWarning")  # an empty file (or only comments) warns, by design
def test_arbitrary_config_files_fail_only_with_config_error(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("cfg")
    for name in ("c.toml", "c.json"):
        (folder / name).write_bytes(raw)
        try:
            load_config(folder / name)
        except ConfigError:
            pass


# ------------------------------------------------------------------------------------------------ metrics
@st.composite
def predictions(draw):
    n, c = draw(st.integers(1, 40)), draw(st.integers(2, 5))
    raw = draw(arrays(np.float64, (n, c), elements=st.floats(0, 1, allow_nan=False)))
    raw = raw + 1e-9  # no all-zero rows
    probs = raw / raw.sum(1, keepdims=True)
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    perm = np.asarray(draw(st.permutations(range(n))), dtype=np.int64)
    return probs, labels, perm


@FUZZ
@given(predictions(), st.integers(1, 20))
def test_metrics_stay_in_range_and_ignore_the_order_of_examples(case, n_bins):
    probs, labels, perm = case
    values = {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=n_bins),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "mcc": metrics.mcc(probs, labels),
    }
    assert 0 <= values["accuracy"] <= 1 and 0 <= values["ece"] <= 1 and 0 <= values["brier"] <= 2
    assert 0 <= values["nll"] <= -math.log(1e-12) + 1e-9 and -1 - 1e-12 <= values["mcc"] <= 1 + 1e-12
    shuffled = {
        "accuracy": metrics.accuracy(probs[perm], labels[perm]),
        "ece": metrics.ece(probs[perm], labels[perm], n_bins=n_bins),
        "nll": metrics.nll(probs[perm], labels[perm]),
        "brier": metrics.brier(probs[perm], labels[perm]),
        "mcc": metrics.mcc(probs[perm], labels[perm]),
    }
    for key, value in values.items():
        # the same terms summed in another order: equal up to float64 reassociation (a few ulps of the total)
        assert shuffled[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# ------------------------------------------------------------------------------------------------ loaders
field = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ratings = st.lists(st.integers(-6, 6) | st.floats() | st.booleans() | st.text(max_size=2), max_size=4).map(json.dumps)
lexicon_line = st.one_of(
    st.text(max_size=40),  # anything at all
    st.tuples(field, field, field, ratings | field).map("\t".join),  # right number of fields, odd contents
    st.lists(field, max_size=6).map("\t".join),
)


@FUZZ
@given(st.lists(lexicon_line, max_size=8))
def test_lexicon_loader_fails_only_with_data_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("lex") / "lex.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        split = load_vader(path)
    except DataError as err:
        assert "lex.txt" in str(err) or "no examples" in str(err)  # names the file, or an empty result
    else:
        assert len(split) > 0 and np.allclose(split.human_probs.sum(1), 1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")


@settings(FUZZ, max_examples=30)
@given(
    st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.none() | st.integers(),
             min_size=1, max_size=5),
    st.integers(1, 12),
)  # fmt: skip
def test_tokenized_loader_takes_any_text_or_fails_with_data_error(tokenizer, texts, max_length):
    try:
        split = ClassificationSplit(texts=tuple(texts), labels=np.zeros(len(texts), np.int64), label_names=("a", "b"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=Warning)
            loader = TokenizedLoader(split, tokenizer, batch_size=2, max_length=max(max_length, 2))
    except PyroloraError:
        assert any(not isinstance(t, str) for t in texts)
        return
    batches = list(loader)
    assert sum(len(targets) for _, targets in batches) == len(texts)
    assert all(inputs["input_ids"].shape[1] <= max(max_length, 2) for inputs, _ in batches)


@settings(FUZZ, max_examples=40)
@given(st.binary(max_size=200))
def test_checkpoint_reader_fails_only_with_run_folder_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    path.write_bytes(raw)
    with pytest.raises(RunFolderError):
        read_checkpoint(path)


def test_every_config_key_with_every_edge_value_fails_only_with_config_error():
    """Exhaustive over (section, key) x edge value, where random search is too sparse to reach each pair."""
    import dataclasses

    from pyrolora.runs.config import _SECTIONS

    edges = [10**400, -(10**400), 2**63, -1, 0, 0.5, math.inf, -math.inf, math.nan, "", "x", [], [1], {}, True, None]
    tried = 0
    for section, cls in _SECTIONS.items():
        for key in [f.name for f in dataclasses.fields(cls)] + ["svd_convention", "unknown"]:
            for value in edges:
                tried += 1
                try:
                    RunConfig.from_dict({section: {key: value}})
                except ConfigError:
                    pass
    assert tried > 500
