"""The model card: one schema, read unchanged from the committed zoo, assembled from a run's files."""

import dataclasses
import glob
import json
import os

import keras
import pytest

from iterconv_keras.errors import IntegrityError
from iterconv_keras.models.variants import create_model
from iterconv_keras.zoo.card import ModelCard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CARDS = sorted(glob.glob(os.path.join(REPO, "zoo", "*", "*", "assets.extra", "metadata.json")))
# The five cards of the 0.1 zoo, written before ModelCard existed (they lack its two new
# keys), kept as golden files when their versions were retired (tests/golden/zoo-0.1/README.md).
COMMITTED = sorted(glob.glob(os.path.join(REPO, "tests", "golden", "zoo-0.1", "*", "metadata.json")))
LATER = [p for p in ALL_CARDS if "projection" in json.load(open(p))]
SHAPE = (16, 16, 1)


def _committed(path):
    with open(path) as f:
        return json.load(f)


def test_there_are_committed_cards():
    assert len(COMMITTED) == 5, COMMITTED


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.split(os.sep)[-2])
def test_golden_cards_are_the_bytes_the_manifest_recorded_for_version_1(path):
    # Live or retired, the manifest keeps version 1's checksums: the golden file is 0.1's own.
    import hashlib

    with open(os.path.join(REPO, "zoo", "MANIFEST.json")) as f:
        entry = json.load(f)["models"][path.split(os.sep)[-2]]
    record = entry["versions"].get("1") or entry["retired"]["1"]
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == record["files"]["assets.extra/metadata.json"]


def test_the_schema_is_the_committed_cards_keys_plus_the_two_new_ones():
    fields = {f.name for f in dataclasses.fields(ModelCard)} - {"extra"}
    for path in COMMITTED:
        assert fields == set(_committed(path)) | {"lipschitz", "projection"}, path


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.split(os.sep)[-2])
def test_committed_cards_read_unchanged_and_round_trip(path):
    document = _committed(path)
    card = ModelCard.read(path)
    assert card.extra == {}
    assert card.to_json() == {**document, "lipschitz": None, "projection": None}
    assert ModelCard.from_json(card.to_json()) == card
    # The recipe stays a plain dict: the learning-rate schedule keeps its old key.
    assert card.recipe == document["recipe"] and "schedule" in card.recipe


@pytest.mark.parametrize("path", LATER, ids=lambda p: "/".join(p.split(os.sep)[-4:-2]))
def test_cards_written_by_modelcard_round_trip_exactly(path):
    document = _committed(path)
    card = ModelCard.read(path)
    assert card.extra == {} and card.to_json() == document


def test_unknown_keys_are_kept():
    card = ModelCard.from_json({"dataset": "mnist", "future_key": [1, 2]})
    assert card.extra == {"future_key": [1, 2]} and card.to_json()["future_key"] == [1, 2]
    assert card.metrics == {} and card.parameters is None


@pytest.mark.parametrize("document, message", [
    ([1, 2], "a model card is a JSON object, got list"),
    ({"schema": 2}, "schema must be an integer <= 1, got 2"),
    ({"schema": "1"}, "got '1'"),
])
def test_bad_documents_are_refused_echoing_them(document, message):
    with pytest.raises(ValueError, match=message):
        ModelCard.from_json(document)


def test_an_unreadable_card_file_names_the_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match=str(path)):
        ModelCard.read(str(path))
    with pytest.raises(IntegrityError, match="does not exist"):
        ModelCard.read(str(tmp_path / "missing.json"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run as the runner leaves it, with an eval document that has a Lipschitz summary."""
    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(5)
    create_model("tiny", SHAPE, 10, lipschitz=0.9).save(run / "model.keras")
    config = {"dataset": "mnist", "variant": "tiny", "coupling": 0.0, "lipschitz": 0.9, "spectral_norm": True,
              "epochs": 1, "seed": 5, "schedule": "cosine", "data_dir": "/data"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.91, "loss": 0.3, "dataset": "mnist"}))
    evaluation = {"dataset": "mnist", "accuracy": 0.9, "loss": 0.31, "examples": 100,
                  "indices": {"recurrence": 0.12, "recurrence_median": 0.4, "divergence": 0.85, "convergence": -0.4,
                              "effective_parameters": 2000.5, "parameters": 3422, "per_stage": [{"stage": 0}],
                              "curves": {"accuracy": [0.1]},
                              "lipschitz": {"certified": [[0.5, 0.7], [0.9, 0.2]], "bound": 0.9}},
                  "occlusion": {"levels": [0.0, 0.5], "accuracy": [0.9, 0.3], "auc": 0.71}}
    (run / "eval.json").write_text(json.dumps(evaluation))
    return str(run), config


def test_from_run_dir_reads_the_three_files(run_dir):
    run, config = run_dir
    card = ModelCard.from_run_dir(run)
    assert card.recipe == config and card.setting("data_dir") == "/data" and card.setting("missing") is None
    assert card.source == run and card.dataset == "mnist" and card.variant == "tiny"
    assert card.metrics == {"accuracy": 0.91, "loss": 0.3}  # the runner's metrics win over eval's
    # The indices keep the number of images they were measured on: the eval document's, not the runner's.
    assert card.indices == {"recurrence": 0.12, "recurrence_median": 0.4, "divergence": 0.85, "convergence": -0.4,
                            "effective_parameters": 2000.5, "parameters": 3422, "per_stage": [{"stage": 0}],
                            "examples": 100}
    assert card.effective_parameters == 2000.5 and card.occlusion_auc == 0.71
    assert card.lipschitz == {"certified": [[0.5, 0.7], [0.9, 0.2]], "bound": 0.9, "max_certified": 0.9}
    assert card.constraint == {"lipschitz": 0.9, "spectral_norm": True}
    assert card.class_names == [str(k) for k in range(10)] and card.probabilities == "softmax"
    assert card.image_shape == [16, 16, 1] and card.num_classes == 10 and card.multi_label is False
    assert card.created is None and card.name is None  # set when it is exported
    json.dumps(card.to_json())  # serialisable as written to metadata.json


def test_from_run_dir_without_eval_or_metrics(tmp_path):
    keras.utils.set_random_seed(6)
    create_model("tiny", SHAPE, 10).save(tmp_path / "model.keras")
    card = ModelCard.from_run_dir(str(tmp_path))
    assert card.recipe is None and card.metrics == {} and card.indices is None and card.lipschitz is None
    assert card.dataset is None and card.class_names == [str(k) for k in range(10)]


def test_constraint_is_the_models_setting_with_the_runs_flag():
    # Review T2: literal expectations, and the fallback branch exercised.
    keras.utils.set_random_seed(7)
    constrained = ModelCard.from_model(create_model("tiny", SHAPE, 10, lipschitz=0.9), recipe={"spectral_norm": True})
    assert constrained.constraint == {"lipschitz": 0.9, "spectral_norm": True}
    # --lipschitz 0.9 recorded without the constraint on: the model has no bound, and the card says so.
    plain = ModelCard.from_model(create_model("tiny", SHAPE, 10), recipe={"lipschitz": 0.9, "spectral_norm": False})
    assert plain.constraint == {"lipschitz": None, "spectral_norm": False}

    class OldModel:
        """A model saved before the constraint existed: its config has no `lipschitz` key."""

        image_shape, num_classes, multi_label, trainable_variables = (8, 8, 1), 3, True, []

        def get_config(self):
            return {"coupling": 0.5}

    old = ModelCard.from_model(OldModel(), recipe={"lipschitz": 0.7, "spectral_norm": True, "dataset": "x"})
    assert old.constraint == {"lipschitz": 0.7, "spectral_norm": True}
    assert old.coupling == 0.5 and old.parameters == 0 and old.class_names == ["0", "1", "2"]
    assert old.probabilities == "sigmoid"


def test_summary_rows_come_from_the_card(run_dir):
    rows = dict(ModelCard.from_run_dir(run_dir[0]).summary())
    assert rows["dataset"] == "mnist" and rows["test accuracy"] == 0.91 and rows["occlusion AUC"] == 0.71
    assert rows["certified Lip(f), max"] == 0.9 and rows["lipschitz bound"] == 0.9
    assert rows["projected at export"] is None
    projected = ModelCard(projection={"per_conv_bound": 0.9487, "max_conv_norm_before": 4.7,
                                      "max_conv_norm_after": 0.9487, "iterations": 1000})
    assert dict(projected.summary())["projected at export"] == "conv norms 4.7 -> 0.9487 (per-conv bound 0.9487)"
