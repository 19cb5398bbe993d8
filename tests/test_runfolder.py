"""Run folders: manifest with checksums and base-model fingerprint; loading refuses what does not match."""

import json
import re
from pathlib import Path

import pytest
import torch

from pyrolora import BayesianLoraModel, LoraXSConfig, guides, inject_adapters
from pyrolora.errors import RunFolderError
from pyrolora.models.backbones import load_sequence_classifier
from pyrolora.runs.build import evaluate, load_run, save_run, train
from pyrolora.runs.config import RunConfig
from pyrolora.runs.folder import MANIFEST_FILE, load_into
from tests.conftest import save_tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "pyrolora"


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tmp_path_factory):
    config = RunConfig.from_dict(
        {
            "model": {"name": str(tiny_model_dir), "max_length": 16},
            "adapters": {"rank": 2, "target_modules": ["query", "value"]},
            "guide": {"name": "lowrank", "options": {"rank": 2}},
            "train": {"epochs": 0.05, "batch_size": 64},
            "predict": {"num_samples": 2},
        }
    )
    run = train(config, progress=False)
    run.metrics = {"test": evaluate(run, "test").metrics}
    out = save_run(run, tmp_path_factory.mktemp("run") / "run")
    return out, run


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_manifest_lists_every_file_with_checksums_and_the_base_fingerprint(saved_run):
    out, run = saved_run
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "state.safetensors", "fit.json", "metrics.json"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) for e in manifest["files"].values())
    assert manifest["adapters"]["rank"] == 2 and manifest["adapters"]["target_modules"] == ["query", "value"]
    assert len(manifest["adapters"]["sites"]) == 4 and re.fullmatch(
        r"[0-9a-f]{64}", manifest["base_model"]["fingerprint"]
    )
    again = load_run(out)
    assert evaluate(again, "test").metrics == run.metrics["test"]  # bit-identical predictions after reload


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "state.safetensors").write_bytes((d / "state.safetensors").read_bytes()[:-7]), "truncated"),
        (lambda d: (d / "fit.json").write_text((d / "fit.json").read_text().replace("1", "2", 1)), "corrupt"),
        (lambda d: (d / "config.json").unlink(), "missing"),
        (lambda d: (d / MANIFEST_FILE).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST_FILE).write_text("{"), "manifest is damaged"),
    ],
    ids=["truncated-state", "corrupt-fit", "missing-config", "no-manifest", "bad-manifest"],
)
def test_damaged_folders_are_refused_with_the_file_named(saved_run, tmp_path, damage, match):
    folder = _copy(saved_run[0], tmp_path)
    damage(folder)
    with pytest.raises(RunFolderError, match=match):
        load_run(folder)


def test_a_state_file_with_flipped_bytes_is_refused(saved_run, tmp_path):
    folder = _copy(saved_run[0], tmp_path)
    raw = bytearray((folder / "state.safetensors").read_bytes())
    raw[-3] ^= 0x01  # one bit inside a float: still a valid safetensors file, only the checksum can tell
    (folder / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RunFolderError, match=r"state.safetensors is corrupt: its SHA-256"):
        load_run(folder)


def test_a_different_base_model_is_refused(saved_run, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)  # same architecture and tokenizer, other weights
    with pytest.raises(RunFolderError, match="adapted weights differ"):
        load_run(saved_run[0], model_name=str(other))


@pytest.mark.parametrize(
    ("adapters", "match"),
    [
        (LoraXSConfig(rank=4, target_modules=("query", "value")), "adapter rank 2, but this model has 4"),
        (LoraXSConfig(rank=2, target_modules=("query",)), "target modules"),
    ],
)
def test_load_into_refuses_other_ranks_and_targets(saved_run, tiny_model_dir, adapters, match):
    backbone = load_sequence_classifier(str(tiny_model_dir), 2)
    model = BayesianLoraModel(backbone, inject_adapters(backbone, adapters), dataset_size=10)
    with pytest.raises(RunFolderError, match=match):
        load_into(saved_run[0], model, guides.make("lowrank", model))


def test_load_into_a_matching_model_built_in_code(saved_run, tiny_model_dir):
    out, run = saved_run
    backbone = load_sequence_classifier(str(tiny_model_dir), 2)
    model = BayesianLoraModel(backbone, inject_adapters(backbone, run.config.adapters), dataset_size=10)
    guide = guides.make("lowrank", model, rank=2)
    load_into(out, model, guide)
    assert all(
        torch.equal(a, b) for a, b in zip(guide.state_dict().values(), run.guide.state_dict().values(), strict=True)
    )


def test_no_pickle_anywhere_in_the_package():
    """No module imports pickle; every torch.load passes weights_only=True; numpy never loads pickles."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.MULTILINE):
            offenders.append(f"{path.name}: imports pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if re.search(r"allow_pickle\s*=\s*True|pickle\.loads?\(", text):
            offenders.append(f"{path.name}: loads a pickle")
    assert not offenders, offenders
    assert len(list(SRC.rglob("*.py"))) > 20  # the scan really looked at the package
