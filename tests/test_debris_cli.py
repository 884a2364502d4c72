"""The debris variant through the toolkit: ``data debris``, ``train``/``eval`` end to end, metadata.

Reference: Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551.
"""

import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from iterconv_cli import train_cmd
from iterconv_cli.main import cli
from iterconv_keras.analysis import evaluation
from iterconv_keras.data import debris, generated

FRAGMENTS = 10
TRAIN = ["--variant", "tiny", "--epochs", "1", "--batch-size", "64", "--train-size", "256",
         "--validation-size", "32", "--test-size", "64", "--lr", "0.01"]


def _invoke(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained for a few steps on 256 debris images through the CLI."""
    out = tmp_path_factory.mktemp("debris") / "run"
    result = _invoke(["train", "--dataset", "digitdebris", "--debris-fragments", str(FRAGMENTS), *TRAIN,
                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["config"]["dataset"] == "digitdebris"
    assert summary["config"]["debris_fragments"] == FRAGMENTS
    assert summary["test"]["examples"] == 64
    return str(out)


def test_data_debris_writes_the_generated_set(tmp_path):
    out = tmp_path / "sub" / "debris.npz"
    result = _invoke(
        ["data", "debris", "--fragments", "50", "--count", "300", "--seed", "5", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["path"], summary["count"], summary["fragments"], summary["seed"]) == (str(out), 300, 50, 5)
    assert "generating" in result.stderr  # progress goes to stderr
    expected = debris.generate(50, 300, seed=5)
    with np.load(out) as archive:
        assert sorted(archive.files) == ["images", "info", "labels"]
        np.testing.assert_array_equal(archive["images"], expected.images)
        np.testing.assert_array_equal(archive["labels"], expected.labels)
        info = json.loads(str(archive["info"]))
    assert info == expected.info and info["n_fragments"] == 50
    # Atomic write: no temporary file is left next to the output.
    assert os.listdir(out.parent) == ["debris.npz"]
    plain = _invoke(["data", "debris", "--count", "20", "--out", str(tmp_path / "d.npz")])
    assert plain.exit_code == 0
    assert plain.stdout.strip() == f"wrote 20 images with 10 fragments (seed 0) to {tmp_path / 'd.npz'}"


def test_eval_rebuilds_the_debris_test_set_and_scores_a_prefix(run_dir, tmp_path):
    result = _invoke(["eval", run_dir, "--limit", "16", "--json", "--plots", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "occlusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(result.stdout)
    assert (document["dataset"], document["split"], document["examples"]) == ("digitdebris", "test", 16)
    assert {"recurrence", "divergence", "convergence", "per_stage", "curves"} <= set(document["indices"])
    occlusion = document["occlusion"]
    assert occlusion["levels"][0] == 0.0 and len(occlusion["accuracy"]) == len(occlusion["levels"])
    assert "clutter" not in occlusion  # the clutter sweep is for multi-label Digitclutter models
    assert list(occlusion["debris"]) == ["10", "30", "50"]
    # The 10-fragment set of the sweep is the evaluated test set itself.
    assert occlusion["debris"][str(FRAGMENTS)] == pytest.approx(document["accuracy"])
    assert 0.0 <= document["accuracy"] <= 1.0
    # Independently: the first 16 images of the fixed 10-fragment test stream, scored
    # by the saved model's plain forward pass.
    test = debris.generate(FRAGMENTS, 16, seed=generated.debris_seed("test", FRAGMENTS))
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    logits = np.asarray(model(test.images.astype(np.float32) / 255))
    assert document["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == test.labels)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(test.labels, logits)
    assert document["loss"] == pytest.approx(float(loss), rel=1e-4)
    # And the 50-fragment level of the sweep, from its own fixed test stream.
    harder = debris.generate(50, 16, seed=generated.debris_seed("test", 50))
    predicted = np.asarray(model(harder.images.astype(np.float32) / 255)).argmax(axis=1)
    assert occlusion["debris"]["50"] == pytest.approx(float(np.mean(predicted == harder.labels)))


def test_debris_sweep_levels_are_the_generators():
    from iterconv_keras.analysis import occlusion

    assert occlusion.DEBRIS_FRAGMENTS == debris.FRAGMENT_COUNTS


def test_resume_keeps_the_fragment_count(run_dir):
    result = _invoke(["train", "--resume", "--debris-fragments", "50", "--out", run_dir])
    assert result.exit_code == 2
    assert "--debris-fragments 50 differs from the run's 10" in result.stderr


def test_load_for_model_reads_the_fragment_count_from_run_or_zoo_metadata(monkeypatch):
    # No training set is generated: the occlusion fill is the model's own input mean (review S5).
    def no_training_set(*args, **kwargs):
        raise AssertionError("a training set was generated for an evaluation")

    monkeypatch.setattr(generated, "generate_splits", no_training_set)
    model = type("Model", (), {"multi_label": False, "input_mean": (0.123,)})()
    for metadata in ({"dataset": "digitdebris", "debris_fragments": 50},
                     {"dataset": "digitdebris", "recipe": {"debris_fragments": 50}}):
        data = evaluation.load_for_model(model, metadata, limit=8)
        assert data.info["n_fragments"] == 50 and len(data.x) == 8 and data.mean == (0.123,)
        expected = debris.generate(50, 8, seed=generated.debris_seed("test", 50))
        np.testing.assert_array_equal(data.x, expected.images)
        np.testing.assert_array_equal(data.y, expected.labels)
    assert evaluation.load_for_model(model, {"dataset": "digitdebris"}, limit=4).info["n_fragments"] == 10


def test_load_for_model_gives_the_test_split_training_uses():
    from iterconv_keras.data import datasets

    model = type("Model", (), {"multi_label": True, "input_mean": (0.25,)})()
    data = evaluation.load_for_model(model, {"dataset": "digitclutter", "clutter_digits": 4}, limit=16)
    splits = datasets.load("digitclutter", clutter_digits=4, train_size=8, validation_size=8, test_size=16)
    np.testing.assert_array_equal(data.x, splits.x_test)
    np.testing.assert_array_equal(data.y, splits.y_test)
    assert (data.num_classes, data.multi_label, data.name, data.mean) == (10, True, "digitclutter", (0.25,))


def test_command_line_defaults_match_the_library():
    # The commands keep literal defaults (for a fast --help); the library decides them.
    from iterconv_cli import data_cmd
    from iterconv_keras.config import TrainConfig

    train = {p.name: p.default for p in train_cmd.COMMAND.params}
    data = {p.name: p.default for p in data_cmd.COMMAND.commands["debris"].params}
    assert train["debris_fragments"] == data["fragments"] == generated.DEFAULT_DEBRIS_FRAGMENTS
    assert train["debris_fragments"] == TrainConfig().debris_fragments
    assert train["clutter_digits"] == TrainConfig().clutter_digits
