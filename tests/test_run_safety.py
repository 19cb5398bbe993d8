"""Nothing lost: `pyrolora train` looks at --out before writing, locks it, and replaces a run only when done."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pyrolora import fit, guides
from pyrolora.cli import app
from pyrolora.errors import RunFolderError
from pyrolora.runs.build import load_run

CONFIG = """
[model]
name = "{model}"
max_length = 16
[adapters]
rank = {rank}
target_modules = ["query", "value"]
[train]
epochs = {epochs}
batch_size = 64
seed = {seed}
[predict]
num_samples = 2
"""


def _config(tmp_path: Path, model: Path, name: str = "run.toml", rank: int = 2, epochs=0.05, seed: int = 0) -> Path:
    path = tmp_path / name
    path.write_text(CONFIG.format(model=model, rank=rank, epochs=epochs, seed=seed), encoding="utf-8")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args)])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run folder (seed 0), trained through the CLI."""
    tmp = tmp_path_factory.mktemp("finished")
    result = _train("--config", _config(tmp, tiny_model_dir), "--out", tmp / "run")
    assert result.exit_code == 0, result.output
    return tmp / "run"


def _copy(folder: Path, target: Path) -> Path:
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_an_invalid_config_leaves_a_finished_run_untouched(finished, tiny_model_dir, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    bad = _config(tmp_path, tiny_model_dir, "bad.toml", rank=1000)  # more than the tiny model's 16 dimensions
    for extra in ((), ("--overwrite",)):
        result = _train("--config", bad, "--out", out, *extra)
        assert result.exit_code == 2
        assert _snapshot(out) == before  # not one byte changed, with or without --overwrite
    assert "already holds a finished run" in _train("--config", bad, "--out", out).output
    assert "rank" in result.output  # with --overwrite the config itself is checked, and named
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind
    load_run(out)


def test_a_folder_with_other_files_is_refused_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    config = _config(tmp_path, tiny_model_dir)
    result = _train("--config", config, "--out", out)
    assert result.exit_code == 2 and "other files (notes.txt)" in result.output and "--overwrite" in result.output
    assert _snapshot(out) == {"notes.txt": b"my notes"}


def test_overwrite_replaces_the_old_run_with_the_complete_new_one(finished, tiny_model_dir, tmp_path):
    out = _copy(finished, tmp_path / "run")
    result = _train("--config", _config(tmp_path, tiny_model_dir, seed=1), "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert load_run(out).config.train.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.toml"]  # staging and old folders removed


def test_a_second_training_into_a_locked_folder_is_refused(tiny_model_dir, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what a running `pyrolora train` holds on its --out
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _train("--config", _config(tmp_path, tiny_model_dir), "--out", out)
    finally:
        os.close(fd)
    assert result.exit_code == 2 and "another process is training into" in result.output
    assert list(out.iterdir()) == []


def test_resume_under_a_swapped_config_json_is_refused(tiny_model_dir, tmp_path):
    """Two trainings raced into one folder before the lock existed: the checkpoint is seed 0's, config.json seed 1's.

    The checkpoint records the digest of its own configuration, so resuming under the other one is refused.
    """
    from pyrolora.runs.build import train
    from pyrolora.runs.config import load_config

    out = tmp_path / "raced"
    first = load_config(_config(tmp_path, tiny_model_dir, "a.toml", seed=0))
    train(first, progress=False, checkpoint_dir=out)  # leaves config.json and the final checkpoint
    second = _config(tmp_path, tiny_model_dir, "b.toml", seed=1)
    (out / "config.json").write_text(json.dumps(load_config(second).to_dict()), encoding="utf-8")
    result = _train("--config", second, "--out", out, "--resume")
    assert result.exit_code == 2 and "written by a run with another configuration" in result.output


@pytest.mark.slow
def test_a_killed_overwrite_keeps_the_old_run_and_resumes_into_its_place(finished, tiny_model_dir, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    config = _config(tmp_path, tiny_model_dir, seed=1, epochs=1)  # 83 steps: long enough to be caught mid-way
    command = [sys.executable, "-m", "pyrolora", "train", "--config", str(config), "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "victim.log").open("w")
    victim = subprocess.Popen([*command, "--checkpoint-every", "5"], stdout=log, stderr=log, env=env)
    checkpoint = tmp_path / ".run.partial" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    rival = _train("--config", config, "--out", out, "--overwrite")  # while the first one trains
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    log.close()
    stderr = (tmp_path / "victim.log").read_text()
    assert victim.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {stderr[-2000:]}"
    assert rival.exit_code == 2 and "another process is training into" in rival.output
    assert _snapshot(out) == before  # the killed re-train did not touch the finished run
    assert load_run(out).config.train.seed == 0

    resumed = _train("--config", config, "--out", out, "--resume", "--checkpoint-every", "5")
    assert resumed.exit_code == 0, resumed.output
    assert load_run(out).config.train.seed == 1  # swapped in once complete
    assert not checkpoint.parent.exists() and not (tmp_path / ".run.old").exists()


def test_fit_refuses_a_checkpoint_with_another_tag(tmp_path):
    """The same check in code: fit(..., checkpoint_tag=...) refuses to resume a checkpoint of another tag."""
    from pyrolora import BayesianLoraModel, LoraXSConfig, inject_adapters
    from tests.conftest import tiny_bert, token_batch

    backbone = tiny_bert()
    model = BayesianLoraModel(backbone, inject_adapters(backbone, LoraXSConfig(rank=2)), dataset_size=5)
    data = [(token_batch(), torch.tensor([0, 1, 2, 0, 1]))]
    fit(model, guides.make("diagonal", model), data, num_steps=2, progress=False, checkpoint_dir=tmp_path,
        checkpoint_tag="a")  # fmt: skip
    with pytest.raises(RunFolderError, match="another configuration"):
        fit(model, guides.make("diagonal", model), data, num_steps=2, progress=False, resume_from=tmp_path,
            checkpoint_tag="b")  # fmt: skip


def test_one_flipped_bit_in_the_checkpoint_header_is_refused(tmp_path):
    """The stored learning rate 0.01 edited to 0.09 (one bit: '1' is 0x31, '9' is 0x39) is caught on resume."""
    from pyrolora import BayesianLoraModel, LoraXSConfig, inject_adapters
    from tests.conftest import tiny_bert, token_batch

    backbone = tiny_bert()
    model = BayesianLoraModel(backbone, inject_adapters(backbone, LoraXSConfig(rank=2)), dataset_size=5)
    data = [(token_batch(), torch.tensor([0, 1, 2, 0, 1]))]
    fit(model, guides.make("diagonal", model), data, num_steps=2, lr=0.01, progress=False, checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    at = raw.index(b"0.01", 0, header_end)  # the first stored learning rate, in the JSON header
    path.write_bytes(raw[:at] + b"0.09" + raw[at + 4 :])
    with pytest.raises(RunFolderError, match="JSON header"):
        fit(model, guides.make("diagonal", model), data, num_steps=2, lr=0.01, progress=False, resume_from=tmp_path)


def test_a_base_model_changed_outside_the_adapted_layers_is_refused(tiny_model_dir, tmp_path):
    """Word embeddings and an unadapted layer of the base model edited after training: evaluate refuses the run."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    assert _train("--config", _config(tmp_path, model), "--out", out).exit_code == 0
    weights = load_file(model / "model.safetensors")
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.intermediate.dense.weight"):
        weights[name] = weights[name] + 0.01  # neither is adapted (the adapters sit on query and value)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 2 and "the base model differs from the one the run" in result.output


PEFT = '\n[guide]\nname = "delta"\n[method]\nname = "peft_lora"\nlora_rank = 2\nlora_targets = ["query"]\n'
ENSEMBLE = '\n[guide]\nname = "delta"\n[method]\nname = "ensemble"\nensemble_size = 2\n'


@pytest.mark.parametrize(("method", "section", "victim"), [("peft_lora", PEFT, "peft_lora.safetensors"),
                                                           ("ensemble", ENSEMBLE, "config.json")])  # fmt: skip
def test_peft_lora_and_ensemble_folders_have_a_checked_manifest(tiny_model_dir, tmp_path, method, section, victim):
    config = _config(tmp_path, tiny_model_dir)
    config.write_text(config.read_text() + section, encoding="utf-8")
    out = tmp_path / "run"
    trained = _train("--config", config, "--out", out)
    assert trained.exit_code == 0, trained.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and victim in manifest["files"]
    raw = bytearray((out / victim).read_bytes())
    raw[-3] ^= 0x01  # one bit: a LoRA weight's low mantissa bit, or a character of the configuration
    (out / victim).write_bytes(bytes(raw))
    result = CliRunner().invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 2 and f"{victim} is corrupt" in result.output


def test_save_run_into_a_used_folder_keeps_no_stale_files_and_refuses_an_unfitted_guide(finished, tmp_path):
    from pyrolora.errors import ConfigError
    from pyrolora.runs.build import build, save_run

    out = _copy(finished, tmp_path / "run")
    run = load_run(out)
    assert run.metrics and run.fit_result is not None
    run.metrics, run.fit_result = {}, None  # the same posterior saved again without metrics and history
    save_run(run, out)
    (out / "fit.json").write_text(json.dumps({"losses": [1.0], "num_steps": 1, "seconds": 0, "dataset_size": 1}))
    again = load_run(out)  # the stray fit.json is not the run's: the manifest does not list it
    assert again.metrics == {} and again.fit_result is None and not (out / "metrics.json").exists()

    fresh = build(run.config)  # the guide was never fitted: it has no parameters
    with pytest.raises(ConfigError, match="has not been fitted"):
        save_run(fresh, tmp_path / "unfitted")
    assert not (tmp_path / "unfitted").exists()


def test_export_into_a_used_folder_leaves_no_stale_draws(finished, tmp_path):
    out = tmp_path / "adapters"
    runner = CliRunner()
    for which, n in (("sample", "3"), ("sample", "2"), ("median", "2")):
        result = runner.invoke(app, ["export", str(finished), "--out", str(out), "--which", which, "--num-samples", n])
        assert result.exit_code == 0, result.output
        if which == "sample":
            assert sorted(p.name for p in out.glob("draw_*")) == [f"draw_{i:02d}" for i in range(int(n))]
    assert list(out.glob("draw_*")) == [] and (out / "adapter_config.json").is_file()  # one point, no old draws
    assert json.loads((out / "pyrolora_export.json").read_text())["adapters"] == ["."]
