"""One dispatcher from a reference to a model: run dir, .keras file, zoo version dir, NAME[@N]."""

import json
import os
import re

import keras
import numpy as np
import pytest
from conftest import random_images

from iterconv_keras import loading, zoo
from iterconv_keras.errors import IntegrityError, ModelNotFound, UsageError
from iterconv_keras.models.saving import load_keras
from iterconv_keras.models.variants import create_model

SHAPE = (16, 16, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run directory, a bare .keras file and a zoo holding `digits` (from the run) and `other`."""
    base = tmp_path_factory.mktemp("loading")
    keras.utils.set_random_seed(11)
    run_model, other = create_model("tiny", SHAPE, 10), create_model("tiny", SHAPE, 10)
    run = base / "run"
    run.mkdir()
    run_model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"dataset": "mnist", "variant": "tiny", "epochs": 1}))
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    other.save(base / "other.keras")
    root = str(base / "zoo")
    card = zoo.ModelCard.from_run_dir(str(run), run_model)
    zoo.export_version(run_model, "digits", root=root, card=card)
    zoo.export_version(other, "other", root=root)
    return {"base": base, "run": str(run), "keras": str(base / "other.keras"), "zoo": root,
            "models": {"run": run_model, "other": other}}


def _same(a, b):
    images = random_images(2, SHAPE, seed=3)
    np.testing.assert_array_equal(a(images, training=False), b(images, training=False))


def test_each_kind_of_reference(files):
    zoo_model_file = ("assets.extra", "model.keras")
    cases = [
        (files["run"], "run", files["models"]["run"], os.path.join(files["run"], "model.keras")),
        (files["keras"], "keras_file", files["models"]["other"], files["keras"]),
        (os.path.join(files["zoo"], "other", "1"), "zoo_version", files["models"]["other"],
         os.path.join(files["zoo"], "other", "1", "assets.extra", "model.keras")),
        ("digits", "zoo", files["models"]["run"], os.path.join(files["zoo"], "digits", "1", *zoo_model_file)),
        ("digits@1", "zoo", files["models"]["run"], os.path.join(files["zoo"], "digits", "1", *zoo_model_file)),
    ]
    for reference, kind, model, path in cases:
        loaded = loading.load(reference, zoo=files["zoo"])
        assert (loaded.provenance.kind, loaded.provenance.path) == (kind, path), reference
        _same(loaded.model, model)
        _same(loading.load_model(reference, zoo=files["zoo"]), model)


def test_the_card_follows_the_kind(files):
    run = loading.load(files["run"]).card
    assert run.recipe == {"dataset": "mnist", "variant": "tiny", "epochs": 1} and run.metrics == {"accuracy": 0.5}
    assert run.source == files["run"] and run.name is None
    bare = loading.load(files["keras"]).card
    assert bare.dataset is None and bare.recipe is None and bare.source == files["keras"]
    stored = loading.load("digits@1", zoo=files["zoo"])
    with open(os.path.join(files["zoo"], "digits", "1", "assets.extra", "metadata.json")) as f:
        assert stored.card.to_json() == json.load(f)  # the zoo's card as stored
    assert stored.card.recipe == run.recipe and stored.provenance.source == "digits@1"


def test_a_folder_named_like_a_zoo_model_without_a_model_does_not_shadow_it(files, monkeypatch):
    # Review U5: running `iterconv eval digits` inside the zoo folder (where `digits/`
    # holds version folders, not a model) used to fail "is a directory but holds neither".
    monkeypatch.chdir(files["zoo"])
    assert os.path.isdir("digits")
    loaded = loading.load("digits", zoo=files["zoo"])
    assert loaded.provenance.kind == "zoo"
    _same(loaded.model, files["models"]["run"])


def test_a_name_that_is_both_a_local_model_and_a_zoo_model_is_refused(files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    os.symlink(files["run"], "digits")
    with pytest.raises(UsageError) as info:
        loading.load("digits", zoo=files["zoo"])
    assert "./digits" in str(info.value) and "digits@N" in str(info.value) and info.value.exit_code == 2
    assert loading.load("./digits", zoo=files["zoo"]).provenance.kind == "run"
    assert loading.load("digits@1", zoo=files["zoo"]).provenance.kind == "zoo"
    # Not in this zoo: the local directory is the only reading.
    assert loading.load("digits", zoo=str(tmp_path / "empty")).provenance.kind == "run"


@pytest.mark.parametrize("reference, error, message", [
    ("missing-name", ModelNotFound, "available: digits@1, other@1"),
    ("digits@4", ModelNotFound, "versions: 1 (default 1)"),
    ("./missing", ModelNotFound, "no model at ./missing"),
    ("gone.keras", ModelNotFound, "gone.keras does not exist"),
    ("Model.H5", ModelNotFound, "no model at Model.H5: no such file or directory, and model name must match"),
])
def test_missing_references(files, reference, error, message):
    with pytest.raises(error, match=re.escape(message)):
        loading.load(reference, zoo=files["zoo"])


def test_a_directory_without_a_model_and_without_a_zoo_entry(files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    os.mkdir("notes")
    with pytest.raises(ModelNotFound, match="is a directory but holds neither model.keras"):
        loading.load("notes", zoo=files["zoo"])


def test_an_interrupted_run_is_told_how_to_resume(files, tmp_path):
    from iterconv_cli.train_cmd import COMMAND as train_command
    from iterconv_keras import runs

    run = tmp_path / "stopped"
    for epoch in (1, 2):  # what a run stopped after its second epoch leaves: checkpoints, no model.keras
        model_file, state_file = runs.checkpoint_files(runs.checkpoint_path(str(run), epoch))
        os.makedirs(os.path.dirname(model_file))
        files["models"]["run"].save(model_file)
        with open(state_file, "w") as f:
            json.dump({"epoch": epoch}, f)
    with pytest.raises(ModelNotFound) as caught:
        loading.load(str(run), zoo=files["zoo"])
    message = str(caught.value)
    assert "holds neither model.keras" in message
    assert f"checkpoints up to epoch 2: interrupted? resume with `iterconv train --resume --out {run}`" in message
    # The hint names options train really has.
    assert {"--resume", "--out"} <= {opt for param in train_command.params for opt in param.opts}
    # A folder without complete checkpoints gets no such hint.
    os.remove(runs.checkpoint_files(runs.checkpoint_path(str(run), 1))[1])
    os.remove(runs.checkpoint_files(runs.checkpoint_path(str(run), 2))[1])
    with pytest.raises(ModelNotFound) as caught:
        loading.load(str(run), zoo=files["zoo"])
    assert "resume with" not in str(caught.value)


def test_load_keras_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_keras(str(tmp_path / "none.keras"))
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(IntegrityError, match=f"cannot load model {garbage}"):
        load_keras(str(garbage))


def test_a_path_with_an_at_sign_is_a_path(files):
    # Review: '@' marks a zoo version only in a bare name; runs/lr@1e-3 is a run directory.
    import shutil

    target = files["base"] / "sweep" / "lr@1e-3"
    shutil.copytree(files["run"], target)
    loaded = loading.load(str(target), zoo=files["zoo"])
    assert loaded.provenance.kind == "run"
    _same(loaded.model, files["models"]["run"])
