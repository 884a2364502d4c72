"""The repository's own zoo: every version intact and reproducing its card.

Schema and drift checks (style.md 7): checksums recomputed, the card read by the
one `ModelCard` schema, parameter counts recounted from the SavedModel's own
object graph (not from Keras), the committed ``models.config`` regenerated from
the manifest, and each model of generated data (Digitclutter, debris)
re-evaluated on the same generated test images must give the accuracy its card
records.
"""

import os

import numpy as np
import pytest

from iterconv_keras import loading, training, zoo
from iterconv_keras.data import datasets, pipeline
from iterconv_keras.zoo.card import ModelCard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "zoo")
MODELS = zoo.list_pretrained(ROOT) if os.path.isfile(os.path.join(ROOT, "MANIFEST.json")) else []
NAMES = [m["name"] for m in MODELS]


def test_the_repository_zoo_is_not_empty():
    assert len(MODELS) == 5, f"expected the five committed models in {ROOT}"


def test_every_checksum_matches():
    report = zoo.verify(root=ROOT, load_models=False)
    assert all(result["ok"] for result in report)


def test_the_committed_serving_config_is_the_container_convention():
    with open(os.path.join(ROOT, zoo.SERVING_CONFIG)) as f:
        committed = f.read()
    assert committed == zoo.serving.config_text(zoo.read_manifest(ROOT), "/models")
    assert REPO not in committed and "/work/" not in committed


def _saved_model_trainable_parameters(version_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    document = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        document.ParseFromString(f.read())
    sizes = {}
    for node in document.meta_graphs[0].object_graph_def.nodes:
        if node.WhichOneof("kind") == "variable" and node.variable.trainable:
            # The committed versions hold each variable twice; count each name once.
            sizes[node.variable.name] = int(np.prod([d.size for d in node.variable.shape.dim]))
    return sum(sizes.values())


@pytest.mark.parametrize("name", NAMES)
def test_card_and_an_independent_parameter_count(name):
    info = zoo.show(name, ROOT)
    card = info["card"]
    assert isinstance(card, ModelCard) and card.extra == {}
    # Review T3: the oracle is TensorFlow's record of the trainable variables in the
    # SavedModel, not Keras' model the card was computed from.
    assert card.parameters == _saved_model_trainable_parameters(info["path"])
    assert 0 < card.effective_parameters <= card.parameters
    # The model's coupling is the one its recipe asked for.
    assert card.coupling == card.recipe["coupling"]
    assert card.constraint["lipschitz"] == (card.recipe["lipschitz"] if card.recipe["spectral_norm"] else None)


@pytest.mark.parametrize("name", [m["name"] for m in MODELS if m["dataset"] in datasets.GENERATED_NAMES])
def test_generated_data_models_reproduce_their_recorded_accuracy(name):
    loaded = loading.load(name, zoo=ROOT)
    card = loaded.card
    recorded = card.metrics
    splits = datasets.load(card.dataset, clutter_digits=card.setting("clutter_digits") or 3,
                           debris_fragments=card.setting("debris_fragments") or datasets.DEFAULT_DEBRIS_FRAGMENTS,
                           train_size=8, validation_size=0, test_size=recorded.get("examples", 5000))
    model = loaded.model
    model.compile(loss=training.make_loss(model.multi_label), metrics=[training.make_accuracy(model.multi_label)])
    result = model.evaluate(pipeline.evaluation_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True)
    # Same generated images, same weights: equal up to float summation order.
    assert result["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-3)
    assert result["loss"] == pytest.approx(recorded["loss"], rel=1e-3)
