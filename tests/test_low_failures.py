"""The low-severity failures of the adversarial pass (issue 20): each now fails cleanly or warns."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pyrolora.cli import app
from pyrolora.errors import DataError
from tests.test_run_safety import _config, _copy, finished  # noqa: F401  (the module-scoped finished run)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_model_folder_that_holds_no_model_is_a_clean_error(tmp_path):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model", encoding="utf-8")
    result = _invoke("train", "--config", _config(tmp_path, folder), "--out", tmp_path / "out")
    assert result.exit_code == 2 and f"{folder}" in result.output and "cannot load" in result.output
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_deeply_nested_json_config_is_a_clean_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"a":' * 5000 + "{}" + "}" * 5000, encoding="utf-8")
    result = _invoke("train", "--config", path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "nested too deeply" in result.output


def test_an_empty_config_file_warns(tmp_path):
    from pyrolora.runs.config import load_config

    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    with pytest.warns(UserWarning, match="sets nothing: every setting takes its default"):
        load_config(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["files"]["state.safetensors"].update(bytes="1104"),  # a string where a number belongs
        lambda m: m.pop("adapters"),
        lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}),
        lambda m: m.update(files=[]),
    ],
)
def test_hand_edited_manifests_are_refused_as_damaged(finished, tmp_path, edit):  # noqa: F811
    out = _copy(finished, tmp_path / "run")
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = _invoke("evaluate", out)
    assert result.exit_code == 2 and ("damaged" in result.output), result.output


def test_a_nan_head_is_an_error_and_json_output_is_valid(finished):  # noqa: F811
    from pyrolora._atomic import json_safe
    from pyrolora.runs.build import evaluate, load_run

    run = load_run(finished)
    with torch.no_grad():
        for p in run.model.head_parameters():
            p.fill_(math.nan)
    with pytest.raises(DataError, match="probabilities are not finite"):
        evaluate(run, "test")
    text = json.dumps(json_safe({"mcc": math.nan, "nested": [math.inf, 1.0]}), allow_nan=False)
    assert json.loads(text) == {"mcc": None, "nested": [None, 1.0]}


def test_an_interrupted_run_folder_points_to_resume(tmp_path):
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": {"name": "bayesian"}}), encoding="utf-8")
    (folder / "checkpoint.safetensors").write_bytes(b"a checkpoint")
    result = _invoke("evaluate", folder)
    assert result.exit_code == 2 and "--resume" in result.output and "Train it again" not in result.output
