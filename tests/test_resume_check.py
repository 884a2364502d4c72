"""A resumed run keeps its settings: the library refuses a changed one (review D9).

The check lives in `iterconv_keras.runs` and is applied by `training.train`
itself, so the Python API refuses what the command line refuses.
"""

import json
import os

import pytest

from iterconv_keras import runs, training
from iterconv_keras.config import TrainConfig
from iterconv_keras.errors import UsageError

FAST = {"variant": "tiny", "epochs": 1, "batch_size": 64, "train_size": 128, "validation_size": 0, "test_size": 64,
        "lr": 0.01}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "run")
    training.train(TrainConfig(**FAST, out=out), log=lambda line: None)
    return out


def _snapshot(run):
    with open(os.path.join(run, runs.HISTORY_FILE)) as f:
        history = f.read()
    return history, os.path.getmtime(os.path.join(run, runs.MODEL_FILE))


def test_resume_through_the_python_api_refuses_a_changed_setting(finished_run):
    before = _snapshot(finished_run)
    with pytest.raises(UsageError, match=r"coupling 0\.5 differs from the run's 0\.0") as caught:
        training.train(TrainConfig(out=finished_run, coupling=0.5), resume=True, log=lambda line: None)
    assert caught.value.exit_code == 2
    assert _snapshot(finished_run) == before  # nothing was trained or rewritten


def test_every_differing_setting_is_named(finished_run):
    with pytest.raises(UsageError) as caught:
        training.train(TrainConfig(out=finished_run, coupling=1.0, seed=7, variant="tiny"), resume=True,
                       log=lambda line: None)
    message = str(caught.value)
    assert "coupling 1.0 differs from the run's 0.0" in message and "seed 7 differs from the run's 0" in message
    assert "variant" not in message  # given, but the same as the run's


def test_resume_with_defaults_or_agreeing_settings_continues(finished_run):
    with open(os.path.join(finished_run, runs.CONFIG_FILE)) as f:
        stored = json.load(f)
    for config in (TrainConfig(out=finished_run), TrainConfig(**FAST, out=finished_run)):
        summary = training.train(config, resume=True, log=lambda line: None)
        assert summary["epochs_completed"] == 1 and summary["config"] == stored


def test_explicit_settings_are_those_that_differ_from_the_defaults():
    assert runs.explicit_settings(TrainConfig(out="r", coupling=0.5)) == ["coupling", "out"]
    assert runs.explicit_settings(TrainConfig()) == []


def test_a_resume_may_move_the_run_to_other_devices_but_not_change_what_it_computes():
    stored = TrainConfig(**FAST, out="run").validate()
    moved = TrainConfig(**FAST, out="run", strategy="mirrored", devices=2).validate()
    runs.check_resume(moved, stored, ["strategy", "devices", "out"])  # no error: placement only
    changed = TrainConfig(**dict(FAST, lr=0.02), out="run", strategy="mirrored").validate()
    with pytest.raises(UsageError, match=r"lr 0.02 differs from the run's 0.01") as error:
        runs.check_resume(changed, stored, ["strategy", "lr"])
    assert "strategy" not in str(error.value)


def test_the_python_api_resumes_on_the_strategy_it_is_given(finished_run, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    lines = []
    # The stored run says "auto" (one device here); the resume is told to mirror over two.
    training.train(TrainConfig(out=run, strategy="mirrored", devices=2), resume=True, log=lines.append)
    assert any(line.startswith("strategy mirrored: 2 replica(s)") for line in lines), lines
