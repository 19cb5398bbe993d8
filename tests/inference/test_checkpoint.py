"""Checkpoints inside fit: exact resume, atomic and verified files, divergence leaves the last one intact."""

import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, likelihoods
from pyrolora.data import ClassificationSplit, TokenizedLoader
from pyrolora.errors import DataError, DivergenceError, RunFolderError
from pyrolora.inference.checkpoint import CHECKPOINT_FILE, read_checkpoint, write_checkpoint
from tests.conftest import tiny_bert

NUM_STEPS = 20


class _Crash(Exception):
    pass


class _CharTokenizer:
    """Each character is one token id: lengths identify texts, ids stay inside tiny_bert's vocabulary of 64."""

    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=16):
        ids = [[1, *[2 + (ord(ch) % 60) for ch in t], 3][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def _model(seed=0):
    torch.manual_seed(seed)
    backbone = tiny_bert(num_labels=2)
    backbone.train()  # dropout on, so that the random stream inside each step matters too
    for m in backbone.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=("query", "value")))
    return BayesianLoraModel(backbone, adapters, dataset_size=27)


def _data(kind):
    g = np.random.default_rng(0)
    texts = tuple("".join(chr(97 + c) for c in g.integers(0, 26, size=g.integers(1, 9))) for _ in range(27))
    split = ClassificationSplit(texts=texts, labels=g.integers(0, 2, size=27), label_names=("n", "p"))
    if kind == "loader":  # shuffled with its own generator: 4 batches per pass, 20 steps cross 4 pass boundaries
        return TokenizedLoader(split, _CharTokenizer(), batch_size=8, shuffle=True, seed=5)
    x = torch.randint(2, 60, (27, 6))
    y = torch.as_tensor(split.labels)
    if kind == "dataloader":  # shuffled from the global torch RNG at every pass
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    return [({"input_ids": x[i : i + 8]}, y[i : i + 8]) for i in range(0, 27, 8)]


def _fit(model, guide, data, **kwargs):
    return fit(model, guide, data, num_steps=NUM_STEPS, lr=0.05, seed=3, progress=False, **kwargs)


def _guide_state(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


@pytest.mark.parametrize("kind", ["loader", "dataloader", "list"])
@pytest.mark.parametrize("guide_name", ["lowrank", "delta"])
def test_resume_after_a_crash_equals_an_uninterrupted_fit(tmp_path, kind, guide_name):
    model = _model()
    guide = guides.make(guide_name, model)
    full = _fit(model, guide, _data(kind))
    expected, expected_head = _guide_state(guide), model.head_state()

    model = _model()
    guide = guides.make(guide_name, model)

    def crash(step, loss):
        if step == 13:  # after step 14 was taken; the last checkpoint is the one after step 12
            raise _Crash

    with pytest.raises(_Crash):
        _fit(model, guide, _data(kind), checkpoint_dir=tmp_path, checkpoint_every=6, callback=crash)
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["step"] == 12
    # a fresh process would start from scratch: new model, guide and data objects, other global RNG states
    torch.manual_seed(123)
    random.seed(5)
    model = _model()
    guide = guides.make(guide_name, model)
    resumed = _fit(model, guide, _data(kind), checkpoint_dir=tmp_path, checkpoint_every=6, resume_from=tmp_path)
    # Same CPU, same thread count, the same operations in the same order on bit-identical states: the
    # results must be bit-identical (tolerance zero), so any state not restored shows up here.
    assert resumed.losses == full.losses and resumed.learning_rates == full.learning_rates
    assert resumed.num_steps == NUM_STEPS
    got = _guide_state(guide)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(torch.equal(model.head_state()[k], v) for k, v in expected_head.items())
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["step"] == NUM_STEPS  # the final step is checkpointed


def test_checkpoint_round_trips_nested_states(tmp_path):
    tree = {
        "rng": (3, tuple(range(5)), None),
        "np": np.random.get_state(),  # noqa: NPY002
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}}, "groups": [{"lr": 0.1}]},
        "nan": math.inf,
    }
    write_checkpoint(tmp_path / "c.safetensors", tree)
    back = read_checkpoint(tmp_path / "c.safetensors")
    assert back["rng"] == tree["rng"] and back["nan"] == math.inf and back["opt"]["groups"] == [{"lr": 0.1}]
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], torch.ones(2, 2))  # int keys stay ints
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], tree["np"][1])
    assert back["np"][1].dtype == np.uint32


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, {"w": torch.arange(100.0)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data: safetensors cannot notice, the checksum does
    path.write_bytes(bytes(raw))
    with pytest.raises(RunFolderError, match="corrupt: its tensors do not match"):
        read_checkpoint(path)
    path.write_bytes(bytes(raw[:-50]))
    with pytest.raises(RunFolderError, match="missing, truncated or corrupt"):
        read_checkpoint(path)


def _regression():
    """A 4-batch regression through one adapter whose 3rd batch holds NaN inputs: step 3 diverges."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0"]))
    model = BayesianLoraModel(net, adapters, dataset_size=64, likelihood=likelihoods.Gaussian(0.1), head=())
    x, y = torch.randn(64, 3), torch.randn(64)
    x[32:48] = math.nan
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_divergence_leaves_the_last_good_checkpoint_intact(tmp_path):
    model, data = _regression()
    with pytest.raises(DivergenceError) as info:
        fit(
            model,
            guides.make("diagonal", model),
            data,
            num_steps=8,
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
        )
    message = str(info.value)
    # steps 1-2 ran, the NaN batch is step 3: the checkpoint after step 2 is the last good one, and is named
    assert "step 3 of 8" in message and "(step 2), is intact" in message and "resume_from" in message
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["step"] == 2
    fresh, data = _regression()
    with pytest.raises(DivergenceError):  # resuming into the same bad batch diverges again ...
        fit(
            fresh,
            guides.make("diagonal", fresh),
            data,
            num_steps=8,
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path,
            resume_from=tmp_path,
        )
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before  # ... and still leaves the checkpoint untouched


def test_labels_outside_the_classes_are_a_data_error_not_a_divergence():
    model = _model()
    data = _data("list")
    poisoned = [*data[:2], (data[2][0], torch.full_like(data[2][1], 7))]  # label 7 of 2 classes
    with pytest.raises(DataError, match="batch at step 3 lie outside the likelihood's support"):
        fit(model, guides.make("delta", model), poisoned, num_steps=4, progress=False)


def test_resume_refuses_a_different_model_guide_or_schedule(tmp_path):
    model = _model()
    fit(model, guides.make("delta", model), _data("list"), num_steps=4, progress=False, checkpoint_dir=tmp_path)
    other = _model()
    with pytest.raises(RunFolderError, match="holds a PointMass guide"):
        fit(other, guides.make("diagonal", other), _data("list"), num_steps=4, progress=False, resume_from=tmp_path)
    with pytest.raises(RunFolderError, match="run of 4 steps, but this one has 6"):
        fit(other, guides.make("delta", other), _data("list"), num_steps=6, progress=False, resume_from=tmp_path)
    with pytest.raises(RunFolderError, match="4 batches per pass, but this data has 3"):
        fit(other, guides.make("delta", other), _data("list")[:3], num_steps=4, progress=False, resume_from=tmp_path)
    torch.manual_seed(0)
    backbone = tiny_bert(num_labels=2)
    narrow = BayesianLoraModel(
        backbone, inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=("query",))), dataset_size=27
    )
    with pytest.raises(RunFolderError, match="adapter sites"):
        fit(narrow, guides.make("delta", narrow), _data("list"), num_steps=4, progress=False, resume_from=tmp_path)
    with pytest.raises(RunFolderError, match="no training checkpoint"):
        fit(
            other,
            guides.make("delta", other),
            _data("list"),
            num_steps=4,
            progress=False,
            resume_from=tmp_path / "nowhere",
        )
