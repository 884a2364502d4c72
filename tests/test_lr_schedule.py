"""The learning-rate schedule is ``lr_schedule`` (issue 12); configs that say ``schedule`` still load."""

import glob
import json
import os

import pytest
from click.testing import CliRunner

from iterconv_cli.main import cli
from iterconv_keras import compiling, runs
from iterconv_keras.config import TrainConfig
from iterconv_keras.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_old_config_reads_schedule_as_lr_schedule():
    old = TrainConfig(variant="tiny").to_dict()
    old["schedule"] = "constant"
    del old["lr_schedule"]
    config = TrainConfig.from_dict(old).validate()
    assert config.lr_schedule == "constant"
    assert "schedule" not in config.to_dict()


def test_a_run_directory_written_with_the_old_key_loads(tmp_path):
    old = TrainConfig(variant="tiny").to_dict()
    del old["lr_schedule"]
    old["schedule"] = "constant"
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(old))
    assert runs.load_run_config(str(tmp_path)).lr_schedule == "constant"


ZOO_CARDS = sorted(glob.glob(os.path.join(REPO, "zoo", "*", "*", "assets.extra", "metadata.json")))
# The 0.1 zoo's cards (tests/golden/zoo-0.1), all written before the rename.
OLD_CARDS = sorted(glob.glob(os.path.join(REPO, "tests", "golden", "zoo-0.1", "*", "metadata.json")))


@pytest.mark.parametrize("path", OLD_CARDS + ZOO_CARDS)
def test_every_committed_zoo_recipe_reads_as_a_config(path):
    with open(path) as f:
        recipe = json.load(f)["recipe"]
    # Written before the rename ("schedule") or after it ("lr_schedule"), never both.
    names = [key for key in ("schedule", "lr_schedule") if key in recipe]
    assert len(names) == 1, names
    if path in OLD_CARDS:
        assert names == ["schedule"]
    config = TrainConfig.from_dict(recipe).validate()
    assert config.lr_schedule == recipe[names[0]]


def test_both_names_at_once_are_refused():
    values = dict(TrainConfig().to_dict(), schedule="constant")
    with pytest.raises(UsageError, match="both 'schedule' and its new name 'lr_schedule'"):
        TrainConfig.from_dict(values)


def test_an_unknown_lr_schedule_echoes_the_value():
    with pytest.raises(ValueError, match="lr_schedule must be one of .*got 'step'"):
        TrainConfig(lr_schedule="step").validate()


@pytest.mark.parametrize("name, decays", [("constant", False), ("cosine", True)])
def test_lr_schedule_reaches_the_optimizer(name, decays):
    import keras

    optimizer = compiling.make_optimizer(TrainConfig(lr_schedule=name, lr=0.5, epochs=2).validate(), 10)
    optimizer.build([keras.Variable(0.0)])
    # Cosine decay reaches 0 after epochs x steps; a constant rate stays at lr.
    optimizer.iterations.assign(20)
    assert float(optimizer.learning_rate) == pytest.approx(0.0 if decays else 0.5, abs=1e-7)


def test_the_cli_option_is_lr_schedule():
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert "--lr-schedule" in result.output and "--schedule" not in result.output
    refused = CliRunner().invoke(cli, ["train", "--schedule", "constant"])
    assert refused.exit_code == 2
