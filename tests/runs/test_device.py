"""``[train] device``, ``--device`` and ``precision``: the auto rule, clear errors, and every command on the CPU."""

import json

import pytest
import torch
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.errors import ConfigError
from pyrolora.runs.config import RunConfig
from pyrolora.runs.device import resolve_device


@pytest.mark.parametrize("available,expected", [(True, "cuda"), (False, "cpu")])
def test_auto_is_cuda_exactly_when_torch_sees_a_gpu(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(None) == torch.device(expected)


def test_explicit_devices_and_their_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU; use 'auto' or 'cpu'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="torch sees 1 GPU"):
        resolve_device("cuda:3")


def test_the_config_validates_device_and_precision():
    assert RunConfig().train.device == "auto" and RunConfig().train.precision == "float32"
    assert RunConfig.from_dict({"train": {"device": "cuda:1", "precision": "bf16"}}).train.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"train\.device must be"):
        RunConfig.from_dict({"train": {"device": "tpu"}})
    with pytest.raises(ConfigError, match=r"train\.precision must be one of"):
        RunConfig.from_dict({"train": {"precision": "fp16"}})


def test_every_command_runs_on_the_device_it_is_given_and_says_so(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" must mean the CPU here
    from tests.runs.make_old_folders import write_task

    data = tmp_path / "data"
    write_task(data)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[model]\nname = "{tiny_model_dir}"\nmax_length = 16\n'
        f'[task]\nname = "tsv"\npath = "{data}"\ntext_columns = ["text"]\nlabels = ["0", "1"]\n'
        '[adapters]\nrank = 2\n[guide]\nname = "diagonal"\n[train]\nepochs = 1\nbatch_size = 16\n'
        'device = "auto"\nprecision = "bf16"\n[predict]\nnum_samples = 2\n',
        encoding="utf-8",
    )
    runner = CliRunner()
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    assert "device: cpu" in trained.output and "bayesian on cpu" in trained.output
    assert json.loads((out / "result.json").read_text())["device"] == "cpu"
    for command in (["evaluate", str(out)], ["diagnose", str(out), "--max-examples", "4", "--num-samples", "2"]):
        result = runner.invoke(app, [*command, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert "device: cpu" in result.output
    for command in (
        ["export", str(out), "--out", str(tmp_path / "peft")],
        ["merge", str(out), "--out", str(tmp_path / "m")],
    ):
        result = runner.invoke(app, [*command, "--device", "auto"])
        assert result.exit_code == 0 and "device: cpu" in result.output, result.output
    refused = runner.invoke(app, ["evaluate", str(out), "--device", "cuda"])
    assert refused.exit_code == 2 and "no CUDA GPU" in refused.output
