"""Files written by ``iterconv data`` train and evaluate (issue 12, review M5).

The oracle is the generator called directly: generated sets are prefix-stable,
so the test split carved from a file of seed s is ``generate(n, test_size, s)``.
"""

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import exact_set_accuracy, one_error_line

from iterconv_cli.main import cli
from iterconv_keras.data import datasets, debris, digitclutter, setfile
from iterconv_keras.errors import DatasetNotAvailable, IntegrityError

SEED, COUNT, TEST, VALIDATION = 7, 60, 12, 6
TRAIN = ["--variant", "tiny", "--epochs", "1", "--batch-size", "16", "--test-size", str(TEST),
         "--validation-size", str(VALIDATION), "--lr", "0.01"]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def clutter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "clutter.npz"
    result = _invoke("data", "digitclutter", "--count", str(COUNT), "--seed", str(SEED), "--out", str(path))
    assert result.exit_code == 0, result.stderr
    return path


def test_train_and_eval_on_a_data_file_use_the_generators_test_images(clutter_file, tmp_path):
    import keras

    from iterconv_keras.analysis import evaluation

    run = tmp_path / "run"
    trained = _invoke("train", *TRAIN, "--data-file", str(clutter_file), "--out", str(run), "--json")
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    expected = digitclutter.generate(3, TEST, SEED)  # the generator, called directly
    model = keras.saving.load_model(run / "model.keras")
    oracle = exact_set_accuracy(model.predict(expected.images, verbose=0), expected.labels)
    # Training's final test: the generator's first TEST images of seed SEED.
    assert summary["test"]["examples"] == TEST
    assert summary["test"]["accuracy"] == pytest.approx(oracle, abs=1e-6)
    # `iterconv eval RUN` tests on the same images, found through the run's config.
    with open(run / "config.json") as f:
        config = json.load(f)
    assert config["data_file"] == str(clutter_file) and config["fresh_data"] is False
    data = evaluation.load_for_model(model, config)
    np.testing.assert_array_equal(data.x, expected.images)
    np.testing.assert_array_equal(data.y, expected.labels)
    evaluated = _invoke("eval", str(run), "--no-occlusion", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    document = json.loads(evaluated.stdout)
    assert document["examples"] == TEST and document["accuracy"] == pytest.approx(oracle, abs=1e-6)


def test_the_splits_follow_the_file_in_order(clutter_file):
    splits = datasets.load("digitclutter", data_file=str(clutter_file), test_size=TEST, validation_size=VALIDATION)
    whole = digitclutter.generate(3, COUNT, SEED)
    np.testing.assert_array_equal(splits.x_test, whole.images[:TEST])
    np.testing.assert_array_equal(splits.x_val, whole.images[TEST:TEST + VALIDATION])
    np.testing.assert_array_equal(splits.x_train, whole.images[TEST + VALIDATION:])
    np.testing.assert_array_equal(splits.y_train, whole.labels[TEST + VALIDATION:])
    assert splits.multi_label and splits.train_stream is None
    # Defaults: 20 % test, 10 % validation, the rest training.
    default = datasets.load("digitclutter", data_file=str(clutter_file))
    assert (len(default.x_test), len(default.x_val), len(default.x_train)) == (12, 6, 42)


def test_a_debris_file_round_trips(tmp_path):
    path = tmp_path / "debris.npz"
    result = _invoke("data", "debris", "--fragments", "30", "--count", "20", "--seed", "3", "--out", str(path))
    assert result.exit_code == 0, result.stderr
    read = setfile.load_npz(str(path), dataset="digitdebris", level=30)
    expected = debris.generate(30, 20, 3)
    np.testing.assert_array_equal(read.images, expected.images)
    np.testing.assert_array_equal(read.labels, expected.labels)
    splits = datasets.load("digitdebris", debris_fragments=30, data_file=str(path), test_size=5, validation_size=0)
    np.testing.assert_array_equal(splits.y_test, expected.labels[:5])
    assert not splits.multi_label


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_malformed_files_are_integrity_errors(clutter_file, tmp_path):
    with np.load(clutter_file) as npz:
        good = {key: npz[key] for key in npz.files}
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    cases = {
        "not an .npz file": str(garbage),
        "missing labels": _write_npz(tmp_path / "a.npz", images=good["images"], info=good["info"]),
        "images have shape": _write_npz(tmp_path / "b.npz", **dict(good, images=good["images"].astype(np.float32))),
        "not multi-hot with n_digits 3": _write_npz(tmp_path / "c.npz", **dict(good, labels=good["labels"] * 2)),
        "no known generator": _write_npz(tmp_path / "d.npz", **dict(good, info=np.array(json.dumps({"seed": 1})))),
    }
    for needle, path in cases.items():
        with pytest.raises(IntegrityError, match=needle):
            setfile.load_npz(path)
    with pytest.raises(DatasetNotAvailable, match="does not exist"):
        setfile.load_npz(str(tmp_path / "absent.npz"))
    assert zipfile.is_zipfile(clutter_file)  # the good file itself is untouched and readable
    setfile.load_npz(str(clutter_file), dataset="digitclutter", level=3)


def test_the_cli_refuses_bad_or_mismatched_files_with_one_line(clutter_file, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 10)
    line = one_error_line(_invoke("train", *TRAIN, "--data-file", str(garbage), "--out", str(tmp_path / "r1")), 5)
    assert str(garbage) in line
    # An intact file that contradicts the options: a usage error (2), not an integrity failure.
    line = one_error_line(_invoke("train", *TRAIN, "--dataset", "digitdebris", "--data-file", str(clutter_file),
                                   "--out", str(tmp_path / "r2")), 2)
    assert "holds a digitclutter set, not one for --dataset 'digitdebris'" in line
    line = one_error_line(_invoke("train", *TRAIN, "--clutter-digits", "4", "--data-file", str(clutter_file),
                                   "--out", str(tmp_path / "r3")), 2)
    assert "holds 3 digits per image, not --clutter-digits 4" in line
    line = one_error_line(_invoke("train", *TRAIN, "--data-file", str(tmp_path / "absent.npz"),
                                   "--out", str(tmp_path / "r4")), 3)
    assert "does not exist" in line
    line = one_error_line(_invoke("train", *TRAIN, "--fresh-data", "--data-file", str(clutter_file),
                                   "--out", str(tmp_path / "r5")), 2)
    assert "--fresh-data" in line
    line = one_error_line(_invoke("train", *TRAIN, "--dataset", "mnist", "--data-file", str(clutter_file),
                                   "--out", str(tmp_path / "r6")), 2)
    assert "--data-file holds a generated set" in line
    # Nothing half-written: no run directory was left by any refusal.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("r")]
