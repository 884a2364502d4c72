"""Training runs: run directory, checkpoints, resume, repeatability."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import exact_set_accuracy

from iterconv_keras import runs, training
from iterconv_keras.config import TrainConfig
from iterconv_keras.errors import UsageError
from iterconv_keras.fsutil import write_json_atomic

FAST = {"variant": "tiny", "epochs": 2, "batch_size": 64, "train_size": 256, "validation_size": 64, "test_size": 128,
        "lr": 0.01}


def _train(tmp_path, name="run", **overrides):
    settings = dict(FAST, out=str(tmp_path / name))
    settings.update(overrides)
    return training.train(TrainConfig(**settings), log=lambda line: None)


def _final_weights(run_dir):
    import keras

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    return [np.asarray(w) for w in model.weights]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted two-epoch run, shared by the tests that compare against it."""
    return _train(tmp_path_factory.mktemp("ref"))


def test_run_directory_contents(reference_run):
    run = reference_run["run_dir"]
    for name in ("config.json", "history.json", "model.keras", "metrics.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config == TrainConfig(**dict(FAST, out=run)).validate().to_dict()
    # The dataset's defaults are resolved before they are recorded: Digitclutter trains on
    # fresh images, without augmentation, from tied blocks.
    assert (config["fresh_data"], config["augment"], config["block_init"]) == (True, False, "tied")
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history[0])
    assert runs.checkpoint_epochs(run) == [1, 2]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    # metrics.json agrees with an independent evaluation of the saved model.
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["examples"] == reference_run["test"]["examples"] == FAST["test_size"]
    import keras

    from iterconv_keras.data import generated

    images, labels, _ = generated.clutter_test_set(3, FAST["test_size"])  # the run's test set
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    logits = np.asarray(model(images.astype(np.float32) / 255, training=False))
    assert metrics["accuracy"] == pytest.approx(exact_set_accuracy(logits, labels))
    loss = keras.losses.BinaryCrossentropy(from_logits=True)(labels, logits)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-4)


def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path, reference_run):
    again = _train(tmp_path, "again")
    for a, b in zip(_final_weights(again["run_dir"]), _final_weights(reference_run["run_dir"]), strict=True):
        np.testing.assert_array_equal(a, b)
    other = _train(tmp_path, "other", seed=1)
    diffs = [np.abs(a - b).max() for a, b in zip(_final_weights(other["run_dir"]),
                                                 _final_weights(reference_run["run_dir"]), strict=True)]
    assert max(diffs) > 1e-3


def test_resume_from_last_complete_epoch_matches_uninterrupted(tmp_path, reference_run):
    # Reproduce the state a run killed during epoch 2 leaves behind: config,
    # checkpoint of epoch 1, nothing of epoch 2.
    run = str(tmp_path / "resumed")
    shutil.copytree(reference_run["run_dir"], run)
    for name in ("model.keras", "metrics.json"):
        os.remove(os.path.join(run, name))
    shutil.rmtree(os.path.join(run, "checkpoints", "epoch-0002"))
    os.makedirs(os.path.join(run, "checkpoints", ".tmp-half-written"))
    lines = []
    summary = training.train(TrainConfig(out=run), resume=True, log=lines.append)
    assert any("resuming after epoch 1" in line for line in lines)
    assert summary["epochs_completed"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    # Bitwise: the restored optimizer state and the (seed, epoch) data order make
    # the resumed epoch the same computation as the uninterrupted one.
    for a, b in zip(_final_weights(run), _final_weights(reference_run["run_dir"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(os.path.join(run, "checkpoints", ".tmp-half-written"))


def _interrupt_after_epoch_1(run_dir, copy):
    """The state a run killed during epoch 2 leaves: config, checkpoint of epoch 1."""
    shutil.copytree(run_dir, copy)
    for name in ("model.keras", "metrics.json"):
        os.remove(os.path.join(copy, name))
    shutil.rmtree(os.path.join(copy, "checkpoints", "epoch-0002"))


CONSTRAINED = {"spectral_norm": True, "lipschitz": 0.9, "lr": 0.05}


@pytest.fixture(scope="module")
def constrained_run(tmp_path_factory):
    """One uninterrupted two-epoch constrained run, shared by the two constrained resume tests."""
    return _train(tmp_path_factory.mktemp("constrained"), **CONSTRAINED)


@pytest.mark.parametrize("overrides", [
    pytest.param({"fresh_data": False}, id="digitclutter-fixed"),
    pytest.param({"dataset": "fashion_mnist", "validation_size": 100}, id="fashion-mnist-augmented"),
    # Constrained: the power-iteration vectors and the per-epoch certificate ratios
    # (refreshed at fit start on resume, at epoch end otherwise) must restore exactly.
    pytest.param(CONSTRAINED, id="constrained"),
])
def test_resume_matches_uninterrupted_on_fixed_augmented_and_constrained_runs(tmp_path, request, overrides):
    if overrides is CONSTRAINED:
        whole = request.getfixturevalue("constrained_run")  # the run is shared, not retrained
    else:
        whole = _train(tmp_path, "whole", **overrides)
    if overrides.get("dataset") == "fashion_mnist":
        assert whole["config"]["augment"] is True  # the default there
    _interrupt_after_epoch_1(whole["run_dir"], str(tmp_path / "resumed"))
    training.train(TrainConfig(out=str(tmp_path / "resumed")), resume=True, log=lambda line: None)
    for a, b in zip(_final_weights(str(tmp_path / "resumed")), _final_weights(whole["run_dir"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_runs_record_wall_and_cpu_time(reference_run):
    for entry in reference_run["history"]:
        assert entry["seconds"] > 0 and entry["cpu_seconds"] > 0
    # A run's total covers its epochs (and data, test evaluation, saving besides).
    assert reference_run["wall_seconds"] >= sum(h["seconds"] for h in reference_run["history"])
    assert reference_run["cpu_seconds"] >= sum(h["cpu_seconds"] for h in reference_run["history"])


def test_resume_without_checkpoint_starts_over(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    config = TrainConfig(**dict(FAST, epochs=1, out=str(run)))
    write_json_atomic(str(run / "config.json"), config.to_dict())
    summary = training.train(TrainConfig(out=str(run)), resume=True, log=lambda line: None)
    assert summary["epochs_completed"] == 1


def test_existing_output_is_refused_without_resume(tmp_path, reference_run):
    with pytest.raises(UsageError, match="already exists"):
        training.train(TrainConfig(**dict(FAST, out=reference_run["run_dir"])), log=lambda line: None)


def test_resume_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError, match="not a run directory"):
        training.train(TrainConfig(out=str(tmp_path / "x")), resume=True)


def test_missing_dataset_leaves_nothing_behind(tmp_path, monkeypatch):
    from iterconv_keras.errors import DatasetNotAvailable

    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "never"
    with pytest.raises(DatasetNotAvailable):
        training.train(TrainConfig(dataset="cifar10", data_dir=str(tmp_path), out=str(out)))
    assert not out.exists()


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    with pytest.raises(training.TrainingDiverged, match=r"epoch 1, step \d+"):
        # lr near float32's maximum overflows the weights themselves: fused batch norm
        # keeps a merely huge network's loss finite (it did at lr=1e30).
        _train(tmp_path, "nan", lr=3e38, optimizer="sgd", lr_schedule="constant", epochs=1)
    assert runs.checkpoint_epochs(str(tmp_path / "nan")) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"coupling": 1.5}, "coupling"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lipschitz": -1.0}, "lipschitz"),
        ({"variant": "huge"}, "variant"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"clutter_digits": 7}, "clutter_digits"),
        ({"debris_fragments": 40}, "debris_fragments.*got 40"),
        ({"debris_fragments": 30.0}, "debris_fragments.*got 30.0"),
        ({"optimizer": "lion"}, "optimizer"),
    ],
)
def test_config_validation_echoes_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides).validate()


@pytest.mark.parametrize("dataset, fresh, augment", [
    ("digitclutter", True, False), ("digitdebris", True, False), ("mnist", False, False),
    ("fashion_mnist", False, True), ("cifar10", False, True), ("cifar100", False, True),
])
def test_data_options_default_per_dataset(dataset, fresh, augment):
    config = TrainConfig(dataset=dataset).validate()
    assert (config.fresh_data, config.augment) == (fresh, augment)


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "fashion_mnist", "fresh_data": True}, "fresh_data needs a generated dataset.*'fashion_mnist'"),
    ({"dataset": "mnist", "augment": True}, "augment .* not available for dataset 'mnist'"),
    ({"dataset": "digitdebris", "augment": True}, "augment .* not available for dataset 'digitdebris'"),
    ({"fresh_data": "yes"}, "fresh_data must be true or false, got 'yes'"),
    ({"augment": "yes"}, "augment must be true or false, got 'yes'"),
    ({"block_init": "shared"}, "block_init must be one of .*got 'shared'"),
])
def test_data_options_that_make_no_sense_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides).validate()


def test_configs_written_before_the_data_options_keep_their_meaning():
    old = TrainConfig(**FAST).to_dict()
    for key in ("fresh_data", "augment", "block_init"):
        del old[key]
    config = TrainConfig.from_dict(old).validate()  # 0.1 trained on one fixed set, tied blocks
    assert (config.fresh_data, config.augment, config.block_init) == (False, False, "tied")


def test_resume_after_the_last_checkpoint_still_projects_onto_the_bound(tmp_path, constrained_run):
    # A constrained run killed after its last checkpoint but before model.keras:
    # resuming trains nothing, so the end-of-fit projection must run on resume.
    import keras

    from iterconv_keras.analysis import certify
    from iterconv_keras.models import lipschitz

    settings = dict(FAST, **CONSTRAINED)
    run = str(tmp_path / "run")
    shutil.copytree(constrained_run["run_dir"], run)  # a copy: the shared run stays whole
    for name in ("model.keras", "metrics.json"):
        os.remove(os.path.join(run, name))
    # The checkpoint is written inside fit, before its certified projection, so the
    # test is not vacuous: some conv of the weights resumed from exceeds its bound.
    checkpoint = keras.saving.load_model(os.path.join(run, "checkpoints", "epoch-0002", "model.keras"), compile=False)
    norms = [n for block in certify.certify(checkpoint, iterations=1)["blocks"] for n in block["conv_norms_certified"]]
    assert max(norms) > lipschitz.per_conv_bound(0.9)
    training.train(TrainConfig(**dict(settings, out=run)), resume=True, log=lambda line: None)
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    report = certify.certify(model, iterations=500)
    assert max(block["certified"] for block in report["blocks"]) <= 0.9


def test_batch_larger_than_the_training_set_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="batch_size 512 is larger than the training set"):
        _train(tmp_path, "run", batch_size=512)
    assert not out.exists()


# -- block initialisation --------------------------------------------------------------


def _tiny_model(**overrides):
    from iterconv_keras.models import variants

    return variants.create_model("tiny", (16, 16, 1), 10, **overrides)


def _block_weights(model):
    return [[[np.asarray(w) for w in block.weights] for block in blocks] for blocks in model.stages]


def test_tied_blocks_are_bitwise_identical_at_initialisation(seed):
    stages = _block_weights(_tiny_model(block_init="tied"))
    for blocks in stages:
        for other in blocks[1:]:
            for a, b in zip(blocks[0], other, strict=True):
                np.testing.assert_array_equal(a, b)


def test_independent_blocks_keep_their_own_initialisation(seed):
    model = _tiny_model(block_init="independent")
    for blocks in model.stages:
        # Every kernel of every later block differs from block 0's (He-normal draws);
        # BN starts at ones/zeros in both, so only kernels can tell them apart.
        for other in blocks[1:]:
            kernels = [(a, b) for a, b in zip(blocks[0].weights, other.weights, strict=True) if len(a.shape) == 4]
            assert kernels
            for a, b in kernels:
                assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert model.get_config()["block_init"] == "independent"


def test_block_init_round_trips_and_is_validated(tmp_path, seed):
    import keras

    model = _tiny_model(block_init="independent")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert loaded.block_init == "independent"
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="block_init must be 'tied' or 'independent', got 'shared'"):
        _tiny_model(block_init="shared")


def test_models_saved_before_block_init_load_as_tied():
    """A zoo model written by 0.1 (no ``block_init`` in its config) still loads."""
    import zipfile

    import keras

    import iterconv_keras  # noqa: F401  (registers the classes)

    # 0.1's own file (tests/golden/zoo-0.1/README.md), version 1 of digitclutter-small.
    path = os.path.join(os.path.dirname(__file__), "golden", "zoo-0.1", "digitclutter-small", "model.keras")
    with zipfile.ZipFile(path) as archive:
        assert "block_init" not in json.loads(archive.read("config.json"))["config"]  # really the old format
    model = keras.saving.load_model(path, compile=False)
    assert model.block_init == "tied"
