"""``iterconv train`` at the command line: JSON output, errors, startup cost."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import one_error_line

from iterconv_cli.main import cli

FAST = ["--variant", "tiny", "--epochs", "1", "--batch-size", "64", "--train-size", "128",
        "--validation-size", "32", "--test-size", "64"]


def _invoke(args):
    return CliRunner().invoke(cli, args)


def test_train_json_is_one_document_and_progress_goes_to_stderr(tmp_path):
    out = tmp_path / "run"
    result = _invoke(["train", *FAST, "--coupling", "1", "--seed", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["run_dir"] == str(out)
    assert document["config"]["coupling"] == 1.0 and document["config"]["seed"] == 3
    assert document["epochs_completed"] == 1
    assert set(document["test"]) == {"dataset", "split", "examples", "loss", "accuracy"}
    assert "1/1" in result.stderr or "2/2" in result.stderr  # Keras progress, on stderr
    # The saved model carries the coupling strength it was trained with.
    import keras

    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert model.coupling == 1.0


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--coupling", "1.5"], 2, "coupling must be in [0, 1], got 1.5"),
        (["--coupling", "-0.1"], 2, "got -0.1"),
        (["--variant", "huge"], 2, "'huge' is not one of 'tiny', 'small',"),
        (["--dataset", "imagenet"], 2, "'imagenet' is not one of"),
        (["--epochs", "0"], 2, "--epochs must be an integer > 0, got 0"),
        (["--epochs", "-3"], 2, "got -3"),
        (["--lipschitz", "0"], 2, "--lipschitz must be a number > 0, got 0.0"),
        (["--lipschitz", "abc"], 2, "'abc' is not a valid float"),
        (["--batch-size", "0"], 2, "--batch-size must be an integer > 0, got 0"),
        (["--clutter-digits", "9"], 2, "--clutter-digits must be 2..5, got 9"),
        (
            ["--dataset", "digitdebris", "--debris-fragments", "25"],
            2,
            "--debris-fragments must be one of 10, 30, 50 (the debris levels), got 25",
        ),
        (["--dataset", "mnist", "--augment"], 2, "not available for --dataset 'mnist': flips change digits"),
        (["--augment"], 2, "not available for --dataset 'digitclutter'"),
        (["--dataset", "fashion_mnist", "--fresh-data"], 2,
         "--fresh-data needs a generated dataset (digitclutter, digitdebris); --dataset 'fashion_mnist' is a fixed"),
        (["--block-init", "shared"], 2, "'shared' is not one of 'tied', 'independent'"),
    ],
)
def test_bad_options_give_one_line_and_exit_code(tmp_path, args, code, needle):
    out = tmp_path / "run"
    line = one_error_line(_invoke(["train", *args, "--out", str(out)]), code)
    assert needle in line
    assert not out.exists()


def test_data_options_are_recorded_and_reach_the_model(tmp_path):
    out = tmp_path / "run"
    result = _invoke(["train", *FAST, "--fixed-data", "--block-init", "independent", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["fresh_data"], config["augment"], config["block_init"]) == (False, False, "independent")
    with open(out / "config.json") as f:
        assert json.load(f) == config
    import keras

    assert keras.saving.load_model(out / "model.keras", compile=False).block_init == "independent"
    line = one_error_line(_invoke(["train", "--resume", "--fresh-data", "--out", str(out)]), 2)
    assert "--fresh-data True differs from the run's False" in line


def test_existing_output_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("keep me")
    line = one_error_line(_invoke(["train", *FAST, "--out", str(out)]), 2)
    assert "already exists" in line
    assert os.listdir(out) == ["something"]


def test_resume_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "plain").mkdir()
    line = one_error_line(_invoke(["train", "--resume", "--out", str(tmp_path / "plain")]), 2)
    assert "not a run directory" in line


def test_resume_refuses_contradicting_options(tmp_path):
    out = tmp_path / "run"
    assert _invoke(["train", *FAST, "--out", str(out)]).exit_code == 0
    line = one_error_line(_invoke(["train", "--resume", "--coupling", "0.5", "--out", str(out)]), 2)
    assert "--coupling 0.5 differs from the run's 0.0" in line
    # Resuming a finished run trains nothing more and succeeds.
    again = _invoke(["train", "--resume", "--out", str(out), "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["epochs_completed"] == 1


def test_missing_dataset_exits_3(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ITERCONV_DATA_DIR", raising=False)
    line = one_error_line(
        _invoke(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]), 3
    )
    assert str(tmp_path) in line


def test_help_does_not_import_tensorflow():
    # `iterconv train --help` must answer instantly: no TensorFlow at import time.
    code = (
        "import sys\n"
        "from iterconv_cli.main import cli\n"
        "try:\n"
        "    cli(['train', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--coupling" in result.stdout
