import pytest
import torch
from safetensors.torch import load_file

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, predict
from pyrolora.errors import RunFolderError
from pyrolora.inference.state import load_state, save_state
from tests.conftest import tiny_bert, token_batch


def _build(seed=0, targets=("query", "value")):
    torch.manual_seed(seed)
    backbone = tiny_bert()
    adapters = inject_adapters(backbone, LoraXSConfig(rank=2, target_modules=targets))
    return BayesianLoraModel(backbone, adapters, dataset_size=15)


@pytest.mark.parametrize("name", ["lowrank", "diagonal", "full", "delta"])
def test_round_trip_gives_identical_predictions(tmp_path, name):
    data = [(token_batch(seed=i), torch.randint(0, 3, (5,))) for i in range(3)]
    model = _build()
    guide = guides.make(name, model)
    fit(model, guide, data, num_steps=5, progress=False, seed=0)
    expected = predict(model, guide, data, num_samples=4, seed=9)
    save_state(tmp_path / "state.safetensors", model, guide)
    tensors = load_file(tmp_path / "state.safetensors")
    assert any(k.startswith("head.classifier") for k in tensors) and any(k.startswith("guide.") for k in tensors)

    fresh = _build(seed=0)  # same base weights, fresh (different) head until loaded
    fresh_guide = guides.make(name, fresh)
    load_state(tmp_path / "state.safetensors", fresh, fresh_guide)
    got = predict(fresh, fresh_guide, data, num_samples=4, seed=9)
    assert torch.equal(got.probs, expected.probs)


def test_mismatched_sites_and_guides_are_refused(tmp_path):
    model = _build()
    guide = guides.make("lowrank", model)
    guides.setup(guide, model)
    save_state(tmp_path / "s.safetensors", model, guide)
    other = _build(targets=("query",))
    with pytest.raises(RunFolderError, match="adapter sites"):
        load_state(tmp_path / "s.safetensors", other, guides.make("lowrank", other))
    same = _build()
    with pytest.raises(RunFolderError, match="AutoLowRankMultivariateNormal posterior"):
        load_state(tmp_path / "s.safetensors", same, guides.make("diagonal", same))
    with pytest.raises(RunFolderError, match="do not fit"):
        load_state(tmp_path / "s.safetensors", same, guides.make("lowrank", same, rank=3))


def test_truncated_file_is_refused(tmp_path):
    model = _build()
    guide = guides.make("delta", model)
    guides.setup(guide, model)
    path = tmp_path / "s.safetensors"
    save_state(path, model, guide)
    path.write_bytes(path.read_bytes()[:-10])
    fresh = _build()
    with pytest.raises(RunFolderError, match="cannot read"):
        load_state(path, fresh, guides.make("delta", fresh))
