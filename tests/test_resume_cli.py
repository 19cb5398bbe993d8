"""Kill a real `pyrolora train` process mid-run, resume it with --resume, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pyrolora.errors import RunFolderError
from pyrolora.inference.checkpoint import CHECKPOINT_FILE, read_checkpoint
from pyrolora.runs.build import load_run

pytestmark = pytest.mark.slow

# 1.5 epochs of the VADER train split (5,254 entries) at batch 64: 83 batches per pass, 125 steps in all, so a
# run resumed from an early checkpoint crosses a pass boundary (a new shuffle).
CONFIG = """
[model]
name = "{model}"
max_length = 16
[adapters]
rank = 2
target_modules = ["query", "value"]
[guide]
name = "lowrank"
[train]
epochs = 1.5
batch_size = 64
seed = 11
[predict]
num_samples = 2
"""


def _train(config, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: same float reductions
    command = [sys.executable, "-m", "pyrolora", "train", "--config", str(config), "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_training_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(model=tiny_model_dir), encoding="utf-8")

    victim = _train(config, tmp_path / "killed", "--checkpoint-every", "20")
    checkpoint = tmp_path / "killed" / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # no clean-up handlers run: the hard case
    _, stderr = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {stderr[-2000:]}"
    step = read_checkpoint(checkpoint)["step"]
    assert 20 <= step < 125  # killed after at least one checkpoint and before the end
    with pytest.raises(RunFolderError, match=r"no manifest\.json"):  # the half-done folder does not load
        load_run(tmp_path / "killed")

    reference = _train(config, tmp_path / "reference")  # runs while the other resumes: both use one core
    resumed = _train(config, tmp_path / "killed", "--resume", "--checkpoint-every", "20")
    for process in (reference, resumed):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    assert not checkpoint.exists()  # removed once the run folder is saved

    # Tolerance zero: the resumed process restores guide, head, Adam moments, schedule, RNG states and the data
    # order exactly, and runs the same float operations on one thread, so the final parameters are bit-identical.
    got = load_file(tmp_path / "killed" / "state.safetensors")
    want = load_file(tmp_path / "reference" / "state.safetensors")
    assert got.keys() == want.keys() and any(k.startswith("guide.") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    fit_got = json.loads((tmp_path / "killed" / "fit.json").read_text())
    fit_want = json.loads((tmp_path / "reference" / "fit.json").read_text())
    assert fit_got["num_steps"] == fit_want["num_steps"] == 125 and fit_got["losses"] == fit_want["losses"]
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("killed", "reference")]
    assert metrics[0] == metrics[1]
    load_run(tmp_path / "killed")  # and the resumed folder is complete and verified


def test_resume_refuses_a_changed_config_and_a_fresh_start_over_a_checkpoint(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from pyrolora.cli import app
    from pyrolora.runs.config import load_config

    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(model=tiny_model_dir), encoding="utf-8")
    folder = tmp_path / "run"  # what a killed run leaves: its config.json and a checkpoint
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_config(config).to_dict()), encoding="utf-8")
    (folder / CHECKPOINT_FILE).write_bytes(b"checkpoint of an unfinished run")
    runner = CliRunner()

    fresh = runner.invoke(app, ["train", "--config", str(config), "--out", str(folder)])
    assert fresh.exit_code == 2 and "holds the checkpoint of an unfinished run" in fresh.output
    assert "--resume" in fresh.output

    changed = tmp_path / "changed.toml"
    changed.write_text(CONFIG.format(model=tiny_model_dir).replace("seed = 11", "seed = 12"), encoding="utf-8")
    other = runner.invoke(app, ["train", "--config", str(changed), "--out", str(folder), "--resume"])
    assert other.exit_code == 2 and "differs from the one the interrupted run" in other.output
    assert "train.seed" in other.output

    nothing = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "empty"), "--resume"])
    assert nothing.exit_code == 2 and "no checkpoint to resume" in nothing.output
    assert (folder / CHECKPOINT_FILE).read_bytes() == b"checkpoint of an unfinished run"  # nothing overwritten
