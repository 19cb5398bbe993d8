"""Run folders, exports and merged models get the permissions of the user's umask, and merged models the labels."""

import os
import stat

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from pyrolora.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture
def umask_027():
    old = os.umask(0o027)  # group may read, others nothing: unlike both tempfile's 0600/0700 and the usual 022
    yield 0o027
    os.umask(old)


def modes(root):
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (stat.S_IMODE(os.stat(path).st_mode), name in dirs)
    return found


def test_run_export_and_merge_files_follow_the_umask_and_merged_models_name_their_labels(
    tmp_path, tiny_model_dir, umask_027
):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"film {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30)))
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = {{ name = "tsv", path = "{data}" }}\n[model]\nname = "{tiny_model_dir}"\nmax_length = 8\n'
        '[adapters]\nrank = 2\n[guide]\nname = "lowrank"\n[train]\nepochs = 1\nbatch_size = 8\n'
        "[predict]\nnum_samples = 2\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    run, export, merged = tmp_path / "run", tmp_path / "export", tmp_path / "merged"
    for args in (
        ["train", "--config", str(config), "--out", str(run)],
        ["export", str(run), "--out", str(export), "--which", "sample", "--num-samples", "2"],
        ["merge", str(run), "--out", str(merged)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    for root in (run, export, merged):
        found = modes(root)
        assert found, root
        wrong = {p: oct(m) for p, (m, is_dir) in found.items() if m != (0o750 if is_dir else 0o640)}
        assert not wrong, f"{root}: {wrong}"
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o750, root
    labels = AutoConfig.from_pretrained(merged)
    assert labels.id2label == {0: "neg", 1: "pos"} and labels.label2id == {"neg": 0, "pos": 1}
