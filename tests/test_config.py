import json

import pytest

from pyrolora.errors import ConfigError
from pyrolora.runs.config import RunConfig, load_config

EXAMPLE = """
[model]
max_length = 24

[adapters]
rank = 4
target_modules = ["query", "value"]

[prior]
scale = 0.2

[guide]
name = "lowrank"
options = { rank = 3 }

[train]
epochs = 2
batch_size = 16
"""


def test_toml_file_is_read_and_round_trips_through_json(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    config = load_config(path)
    assert config.adapters.rank == 4 and config.adapters.target_modules == ("query", "value")
    assert config.guide.options == {"rank": 3} and config.train.epochs == 2.0 and config.prior.scale == 0.2
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_defaults_are_valid():
    config = RunConfig()
    assert config.guide.name == "lowrank" and config.adapters.rank == 8
    assert RunConfig.from_dict({}) == config


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"trian": {}}, r"unknown section\(s\) \['trian'\]"),
        ({"train": {"epoch": 3}}, r"unknown key\(s\) \['epoch'\] in \[train\]"),
        ({"train": {"batch_size": "32"}}, "train.batch_size must be an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be positive"),
        ({"train": {"lr": True}}, "train.lr must be a number"),
        ({"train": {"schedule": "steep"}}, "train.schedule must be one of"),
        ({"prior": {"scale": -0.1}}, "prior.scale must be positive"),
        ({"guide": {"name": "nope"}}, "guide.name 'nope' is unknown"),
        ({"adapters": {"rank": 0}}, "rank must be a positive integer"),
        ({"adapters": {"target_modules": 3}}, "adapters.target_modules"),
        ({"model": {"max_length": 0}}, "model.max_length must be positive"),
        ({"task": {"name": "glue"}}, "task.name must be one of"),
        ({"train": []}, r"\[train\] must be a table"),
    ],
)
def test_invalid_configs_name_the_bad_value(data, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(data)


def test_replace_builds_a_validated_copy():
    config = RunConfig()
    other = config.replace(guide={"name": "delta"}, train={"epochs": 1})
    assert other.guide.name == "delta" and other.guide.options == {} and other.train.epochs == 1.0
    assert config.guide.name == "lowrank"  # frozen: the original is unchanged
    with pytest.raises(ConfigError):
        config.replace(train={"epochs": -1})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
