"""The options of the commands as a user meets them (user-journey audit).

Every option has help text and the help shows what the defaults are; errors name
the option the user typed, not the library's keyword; an option the chosen dataset
does not read is refused rather than recorded with no effect; a ``--data-dir`` that
does not exist is a usage error; ``--dataset`` takes the zoo's spelling
``fashion-mnist``; a data file that is intact but contradicts the options is a usage
error (2), a corrupt one an integrity failure (5).
"""

import json
import re

import click
import pytest
from click.testing import CliRunner
from conftest import one_error_line
from test_datasets import write_idx

from iterconv_cli._common import option_spelling
from iterconv_cli.main import cli
from iterconv_cli.train_cmd import train
from iterconv_keras import training
from iterconv_keras.config import TrainConfig
from iterconv_keras.data import setfile
from iterconv_keras.errors import IntegrityError, UsageError

FAST = ["--variant", "tiny", "--epochs", "1", "--batch-size", "32", "--train-size", "64",
        "--validation-size", "0", "--test-size", "16"]
# Options allowed to have no help text: none.
KNOWN_WITHOUT_HELP = set()


def _invoke(args):
    return CliRunner().invoke(cli, args)


def _commands(command=cli, path=()):
    """Every command of the tree, as (path of names, command)."""
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    yield path, command


# ------------------------------------------------------------------------ help


def test_every_option_of_every_command_has_help_text():
    missing = {(" ".join(path), p.opts[0]) for path, command in _commands() for p in command.params
               if isinstance(p, click.Option) and not p.help}
    assert missing <= KNOWN_WITHOUT_HELP, missing - KNOWN_WITHOUT_HELP


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=lambda p: " ".join(p) or "iterconv")
def test_rendered_help_shows_no_doubled_percent(path):
    # Click does not %-format help strings: "%%" would be printed as it is.
    result = _invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "%%" not in result.output


def test_train_help_states_the_default_sizes():
    text = " ".join(_invoke(["train", "--help"]).output.split())
    # The generated sets: 20,000 / 2,000 / 5,000; the real ones: their training split
    # (60,000 MNIST-like, 50,000 CIFAR) less the validation (10 %, at most 5,000), whole test split.
    assert "Training images [default: 20,000 for digitclutter and digitdebris" in text
    assert "55,000 for mnist and fashion_mnist, 45,000 for cifar10 and cifar100" in text
    assert "Validation images, 0 for none [default: 2,000 for digitclutter and digitdebris" in text
    assert "5,000 for mnist and fashion_mnist, 5,000 for cifar10 and cifar100" in text
    assert "[default: 5,000 for digitclutter and digitdebris; the whole test split for the real datasets, " \
           "10,000 images" in text
    assert "first 20 % test, next 10 % validation" in text
    assert "the dataset's" not in text


# ------------------------------------------------------------ errors name options


@pytest.mark.parametrize("message, expected", [
    ("epochs must be an integer > 0, got 0", "--epochs must be an integer > 0, got 0"),
    ("alpha applies to residual_form 'contractive' only, got alpha=0.5",
     "--alpha applies to --residual-form 'contractive' only, got --alpha 0.5"),
    ("jit_compile must be true or false", "--xla must be true or false"),  # the option's own spelling
    # Prose, quotes, paths and options are left alone.
    ("devices 4: TensorFlow already runs with 2 logical CPU devices; logical devices can only",
     "--devices 4: TensorFlow already runs with 2 logical CPU devices; logical devices can only"),
    ("data file /runs/seed 3/f.npz: the strategy is 'auto'", "data file /runs/seed 3/f.npz: the strategy is 'auto'"),
    ("got 'epochs' and --lr 0.1", "got 'epochs' and --lr 0.1"),
    ("n_digits must be in 2..5", "n_digits must be in 2..5"),  # not an option of train
    # A flag takes no value: True is the flag, False its --no- (or other) form.
    ("fresh_data=False with data_file", "--fixed-data with --data-file"),
    ("spectral_norm False needs lipschitz < 1", "--no-spectral-norm needs lipschitz < 1"),
    ("augment=True", "--augment"),
])
def test_setting_names_are_spelled_as_the_commands_options(message, expected):
    assert option_spelling(message, train) == expected


def test_an_empty_message_keeps_its_exception_type_for_the_error_line():
    error = ValueError("")
    assert option_spelling(error, train) is error


@pytest.mark.parametrize("args, needle", [
    (["train", "--epochs", "0"], "--epochs must be an integer > 0, got 0"),
    (["train", "--batch-size", "-1"], "--batch-size must be an integer > 0, got -1"),
    (["train", "--train-size", "0"], "--train-size must be an integer > 0, got 0"),
    (["train", "--clutter-digits", "9"], "--clutter-digits must be 2..5, got 9"),
    (["train", "--alpha", "0.5"], "--alpha applies to --residual-form 'contractive' only, got --alpha 0.5"),
    (["train", "--dataset", "mnist", "--augment"], "--augment (translation and horizontal flip) is not available "
                                                   "for --dataset 'mnist'"),
    (["data", "digitclutter", "--n-digits", "7", "--count", "4"], "--n-digits must be in 2..5, got 7"),
])
def test_cli_errors_name_the_option_typed(tmp_path, args, needle):
    out = tmp_path / ("f.npz" if args[0] == "data" else "run")
    line = one_error_line(_invoke([*args, "--out", str(out)]), 2)
    assert needle in line
    assert not out.exists()


def test_the_library_keeps_its_keyword_names():
    with pytest.raises(ValueError, match=r"^epochs must be an integer > 0, got 0$"):
        TrainConfig(epochs=0).validate()


# ------------------------------------------------- options the dataset does not read


@pytest.mark.parametrize("dataset, option", [
    ("fashion_mnist", ["--clutter-digits", "4"]),
    ("digitdebris", ["--clutter-digits", "3"]),  # the default value, but typed
    ("digitclutter", ["--debris-fragments", "30"]),
    ("digitclutter", ["--data-dir", "{tmp}"]),
    ("digitdebris", ["--data-dir", "{tmp}"]),
])
def test_an_option_the_dataset_does_not_read_is_refused(tmp_path, dataset, option):
    option = [o.format(tmp=tmp_path) for o in option]
    out = tmp_path / "run"
    line = one_error_line(_invoke(["train", *FAST, "--dataset", dataset, *option, "--out", str(out)]), 2)
    assert f"{option[0]} applies to --dataset" in line and f"with --dataset '{dataset}'" in line
    assert not out.exists()


def test_the_python_api_refuses_them_too(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="clutter_digits applies to dataset 'digitclutter' only, got "
                                         "clutter_digits=4 with dataset='digitdebris'"):
        training.train(TrainConfig(dataset="digitdebris", clutter_digits=4, out=str(out)), log=lambda line: None)
    assert not out.exists()


# ------------------------------------------------------------------ --data-dir


@pytest.mark.parametrize("command", [["train", *FAST, "--dataset", "fashion_mnist"], ["data", "info"]])
def test_a_data_dir_that_does_not_exist_is_a_usage_error(tmp_path, command):
    missing = tmp_path / "nonexistent" / "dir"
    out = tmp_path / "run"
    line = one_error_line(_invoke([*command, "--data-dir", str(missing),
                                    *(["--out", str(out)] if command[0] == "train" else [])]), 2)
    assert f"'{missing}' does not exist" in line
    assert not out.exists()


# ---------------------------------------------------- --dataset fashion-mnist


def test_the_hyphenated_dataset_name_is_read_as_fashion_mnist(tmp_path):
    data = tmp_path / "data"
    write_idx(str(data), n_train=80, n_test=20)
    out = tmp_path / "run"
    result = _invoke(["train", *FAST, "--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["data_dir"]) == ("fashion_mnist", str(data))
    line = one_error_line(_invoke(["train", "--dataset", "fashion-mnist", "--fresh-data",
                                    "--out", str(tmp_path / "r2")]), 2)
    assert "--dataset 'fashion_mnist'" in line


def test_an_unknown_dataset_still_lists_the_names(tmp_path):
    line = one_error_line(_invoke(["train", "--dataset", "fashion-mnist-v2", "--out", str(tmp_path / "r")]), 2)
    assert re.search(r"'fashion-mnist-v2' is not one of .*'fashion_mnist'", line)


# ----------------------------------------- a data file that contradicts the options


@pytest.fixture(scope="module")
def clutter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "dc.npz"
    result = _invoke(["data", "digitclutter", "--count", "40", "--seed", "1", "--out", str(path)])
    assert result.exit_code == 0, result.stderr
    return path


@pytest.mark.parametrize("args, needle", [
    (["--clutter-digits", "4"], "holds 3 digits per image, not --clutter-digits 4; pass --clutter-digits 3"),
    (["--dataset", "digitdebris"], "holds a digitclutter set, not one for --dataset 'digitdebris'"),
])
def test_a_file_that_contradicts_the_options_is_a_usage_error(clutter_file, tmp_path, args, needle):
    out = tmp_path / "run"
    line = one_error_line(_invoke(["train", *FAST, "--train-size", "16", *args, "--data-file", str(clutter_file),
                                    "--out", str(out)]), 2)
    assert needle in line and str(clutter_file) in line
    assert not out.exists()


def test_the_library_says_mismatch_in_keywords_and_corruption_stays_5(clutter_file, tmp_path):
    with pytest.raises(UsageError, match="not clutter_digits=4; pass clutter_digits=3 or another file"):
        setfile.load_npz(str(clutter_file), dataset="digitclutter", level=4)
    with pytest.raises(UsageError, match="not one for dataset='digitdebris'"):
        setfile.load_npz(str(clutter_file), dataset="digitdebris")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(clutter_file.read_bytes()[:-100])
    with pytest.raises(IntegrityError):
        setfile.load_npz(str(truncated), dataset="digitclutter", level=3)
    line = one_error_line(_invoke(["train", *FAST, "--data-file", str(truncated), "--out", str(tmp_path / "r")]), 5)
    assert str(truncated) in line
