"""The repository's own zoo: every version intact and reproducing its model card.

Schema and drift checks (style.md 7): checksums recomputed, parameter counts
recounted from the loaded model, and each model of generated data (Digitclutter,
debris) re-evaluated on the same generated test images must give the accuracy
its card records.
"""

import os

import numpy as np
import pytest

from iterconv_keras import training, zoo
from iterconv_keras.data import datasets, pipeline

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo")
MODELS = zoo.list_models(ROOT) if os.path.isfile(os.path.join(ROOT, "MANIFEST.json")) else []
CARD_KEYS = {"dataset", "recipe", "coupling", "constraint", "parameters", "effective_parameters",
             "metrics", "indices", "occlusion_auc", "libraries", "created"}


def test_the_repository_zoo_is_not_empty():
    assert MODELS, f"no models in {ROOT}"


def test_every_checksum_matches():
    report = zoo.verify(root=ROOT, load_models=False)
    assert all(result["ok"] for result in report)


@pytest.mark.parametrize("name", [m["name"] for m in MODELS])
def test_card_schema_and_parameter_count(name):
    entry = zoo.load_entry(name, root=ROOT)
    card = entry.metadata
    missing = CARD_KEYS - set(card)
    assert not missing, missing
    trainable = int(sum(np.prod(v.shape) for v in entry.model.trainable_variables))
    assert card["parameters"] == trainable
    assert 0 < card["effective_parameters"] <= card["parameters"]
    assert card["coupling"] == entry.model.coupling


@pytest.mark.parametrize("name", [m["name"] for m in MODELS if m["dataset"] in datasets.GENERATED_NAMES])
def test_generated_data_models_reproduce_their_recorded_accuracy(name):
    entry = zoo.load_entry(name, root=ROOT)
    recipe = entry.metadata["recipe"]
    recorded = entry.metadata["metrics"]
    dataset = entry.metadata["dataset"]
    splits = datasets.load(dataset, clutter_digits=recipe.get("clutter_digits", 3),
                           debris_fragments=recipe.get("debris_fragments", datasets.DEFAULT_DEBRIS_FRAGMENTS),
                           train_size=8, validation_size=0, test_size=recorded.get("examples", 5000))
    model = entry.model
    model.compile(loss=training.make_loss(model.multi_label), metrics=[training.make_accuracy(model.multi_label)])
    result = model.evaluate(pipeline.evaluation_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True)
    # Same generated images, same weights: equal up to float summation order.
    assert result["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-3)
    assert result["loss"] == pytest.approx(recorded["loss"], rel=1e-3)
