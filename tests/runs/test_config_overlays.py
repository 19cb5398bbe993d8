"""Configs as a base plus overlays: ``base = ...`` inside a file, or several files given to ``load_config``."""

from pathlib import Path

import pytest

from pyrolora.errors import ConfigError
from pyrolora.runs.config import load_config

ROOT = Path(__file__).parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_file_laid_over_its_base_equals_the_merged_file(tmp_path):
    _write(tmp_path / "base" / "task.toml", '[task]\nname = "sst2"\n[train]\nepochs = 3\nlr = 0.02\n')
    _write(tmp_path / "methods" / "map.toml", '[guide]\nname = "delta"\n[train]\nepochs = 5\n')
    run = _write(tmp_path / "run.toml", 'base = ["base/task.toml", "methods/map.toml"]\n[train]\nseed = 7\n')
    merged = _write(
        tmp_path / "merged.toml",
        '[task]\nname = "sst2"\n[guide]\nname = "delta"\n[train]\nepochs = 5\nlr = 0.02\nseed = 7\n',
    )
    assert load_config(run) == load_config(merged)
    # the same through several files: later ones win key by key
    assert load_config(tmp_path / "base" / "task.toml", tmp_path / "methods" / "map.toml").train.epochs == 5
    assert load_config(tmp_path / "methods" / "map.toml", tmp_path / "base" / "task.toml").train.epochs == 3


def test_naming_another_guide_drops_the_options_of_the_base_guide(tmp_path):
    base = _write(tmp_path / "a.toml", '[guide]\nname = "lowrank"\noptions = { rank = 3 }\n')
    over = _write(tmp_path / "b.toml", '[guide]\nname = "delta"\n')
    assert load_config(base, over).guide.options == {}
    same = _write(tmp_path / "c.toml", "[guide]\noptions = { rank = 5 }\n")
    assert load_config(base, same).guide.options == {"rank": 5} and load_config(base, same).guide.name == "lowrank"


def test_bad_bases_fail_with_the_file_and_the_fix(tmp_path):
    _write(tmp_path / "x.toml", 'base = "y.toml"\n')
    _write(tmp_path / "y.toml", 'base = "x.toml"\n')
    with pytest.raises(ConfigError, match="in a circle"):
        load_config(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match=r"names base 'nope\.toml', but .* does not exist"):
        load_config(_write(tmp_path / "z.toml", 'base = "nope.toml"\n'))
    with pytest.raises(ConfigError, match="must be a file name or a list"):
        load_config(_write(tmp_path / "w.toml", "base = 3\n"))
    with pytest.raises(ConfigError, match="at least one"):
        load_config()


def test_every_shipped_config_is_a_task_base_plus_a_method_overlay():
    files = sorted((ROOT / "configs").glob("*.toml"))
    bases = sorted(p.stem for p in (ROOT / "configs" / "base").glob("*.toml"))
    methods = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.toml"))
    assert len(bases) == 6 and len(methods) == 6 and len(files) == len(bases) * len(methods)
    for path in files:
        task, method = next((t, path.stem[len(t) + 1 :]) for t in bases if path.stem.startswith(t + "-"))
        assert f'base = ["base/{task}.toml", "methods/{method}.toml"]' in path.read_text(encoding="utf-8")
        # the file equals its two parts given on the command line, plus at most a few keys of its own
        assert load_config(path).model == load_config(ROOT / "configs" / "base" / f"{task}.toml").model
    blora = load_config(ROOT / "configs" / "sst2-blora-xs.toml")
    assert blora.task.name == "sst2" and blora.guide.name == "lowrank" and blora.guide.options == {"rank": 2}


def test_the_cli_lays_repeated_config_flags_over_each_other(tmp_path):
    from typer.testing import CliRunner

    from pyrolora.cli import app

    base = _write(tmp_path / "base.toml", "[train]\nepochs = 1\n")
    bad = _write(tmp_path / "bad.toml", "[train]\nepochs = 0\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(base), "--config", str(bad), "--out", str(out)])
    # the second file's value reached validation (before any model is loaded): the overlay was applied
    assert result.exit_code == 2 and "train.epochs must be positive, got 0.0" in result.output
    assert not out.exists()
