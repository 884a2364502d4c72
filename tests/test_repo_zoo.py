"""The repository's own zoo: every version intact, loadable as users load it, and reproducing its card.

Schema and drift checks (style.md 7): checksums recomputed, the card read by the
one `ModelCard` schema, parameter counts recounted from the SavedModel's own
object graph (not from Keras), the committed ``models.config`` regenerated from
the manifest, and each model re-evaluated on its test data (generated images,
or the real Fashion-MNIST files read here with a few lines of numpy) must give
the accuracy its card records.
"""

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from iterconv_keras import compiling, loading, zoo
from iterconv_keras.data import datasets, generated, pipeline, sources
from iterconv_keras.zoo.card import ModelCard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "zoo")
MODELS = zoo.list_pretrained(ROOT) if os.path.isfile(os.path.join(ROOT, "MANIFEST.json")) else []
NAMES = [m["name"] for m in MODELS]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def test_the_repository_zoo_holds_the_committed_models():
    # The five names of the 0.1 zoo stay, each with its version 1 served or on record as retired
    # (issue 16 retires the 5-epoch versions once newer ones exist); the grid adds versions and names.
    zero_one = {"digitclutter-small", "digitclutter-small-recurrent", "digitclutter-small-lipschitz",
                "digitdebris-small", "fashion-mnist-small"}
    assert zero_one <= set(NAMES), f"expected the 0.1 models in {ROOT}, found {NAMES}"
    for m in MODELS:
        if m["name"] in zero_one:
            assert 1 in m["versions"] or 1 in [r["version"] for r in m["retired"]], m["name"]


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


@pytest.mark.parametrize("name", [m["name"] for m in MODELS if m["dataset"] in sources.GENERATED_NAMES])
def test_generated_data_models_reproduce_their_recorded_accuracy(name):
    loaded = loading.load(name, zoo=ROOT)
    card = loaded.card
    recorded = card.metrics
    splits = datasets.load(card.dataset, clutter_digits=card.setting("clutter_digits") or 3,
                           debris_fragments=card.setting("debris_fragments") or generated.DEFAULT_DEBRIS_FRAGMENTS,
                           train_size=8, validation_size=0, test_size=recorded.get("examples", 5000))
    model = loaded.model
    model.compile(loss=compiling.make_loss(model.multi_label), metrics=[compiling.make_accuracy(model.multi_label)])
    result = model.evaluate(pipeline.evaluation_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True)
    # Same generated images, same weights: equal up to float summation order.
    assert result["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-3)
    assert result["loss"] == pytest.approx(recorded["loss"], rel=1e-3)


def _idx(path):
    # The IDX format: a zero word, the element type and rank, the sizes, then the bytes.
    with gzip.open(path) as f:
        data = f.read()
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("name", ["fashion-mnist-small", "fashion-mnist-small-conventional"])
def test_fashion_mnist_lambda_0_through_the_serving_signature_on_the_real_test_set(name):
    # Issue 16's must-show: lambda 0, unconstrained, >= 0.925 on the 10,000 real test images,
    # recomputed through the exported SavedModel as TF Serving would run it (TensorFlow's own
    # loader and the `serving_default` signature; no Keras, no iterconv code in the path).
    import tensorflow as tf

    images = _idx(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))[..., None].astype(np.float32) / 255
    labels = _idx(os.path.join(FASHION_MNIST, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    info = zoo.show(name, ROOT)
    card = info["card"]
    assert card.metrics["examples"] == len(labels) == 10000
    assert card.coupling == 0 and card.constraint["lipschitz"] is None, name
    serve = tf.saved_model.load(info["path"]).signatures["serving_default"]
    outputs = [serve(images=tf.constant(images[i:i + 1000])) for i in range(0, len(images), 1000)]
    classes = np.concatenate([o["classes"].numpy() for o in outputs])
    logits = np.concatenate([o["logits"].numpy() for o in outputs]).astype(np.float64)
    accuracy = float(np.mean(classes == labels))
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    loss = float(-log_softmax[np.arange(len(labels)), labels].mean())
    print(f"{name}: accuracy {accuracy:.4f} (card {card.metrics['accuracy']:.4f}), "
          f"loss {loss:.4f} (card {card.metrics['loss']:.4f})")
    assert abs(accuracy - card.metrics["accuracy"]) <= 1 / len(labels)  # at most one image flips
    assert loss == pytest.approx(card.metrics["loss"], rel=1e-3)
    assert accuracy >= 0.925, f"{name}: {accuracy:.4f} is below issue 16's target"


def test_the_front_door_loads_and_lists_the_zoo():
    import iterconv_keras

    assert iterconv_keras.load_model is loading.load_model
    assert iterconv_keras.list_pretrained is zoo.list_pretrained


_KERAS_ONLY = textwrap.dedent(
    """
    import json, sys
    import iterconv_keras, keras
    import numpy as np
    results = {}
    for path in sys.argv[1:]:
        model = keras.saving.load_model(path)  # Keras' default: compile=True
        results[path] = np.asarray(model(np.zeros((1, *model.image_shape), "float32"), training=False)).tolist()
    print(json.dumps(results))
    """
)


def test_every_zoo_model_loads_with_plain_keras_after_importing_the_package():
    # Issue 12: a fresh process, `import iterconv_keras, keras`, Keras' own loader.
    paths = [os.path.join(ROOT, name, str(m["default_version"]), "assets.extra", "model.keras")
             for name, m in zip(NAMES, MODELS, strict=True)]
    result = subprocess.run([sys.executable, "-c", _KERAS_ONLY, *paths], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.splitlines()[-1])
    for name, path in zip(NAMES, paths, strict=True):
        shape = zoo.show(name, ROOT)["card"].image_shape
        expected = loading.load_model(name, zoo=ROOT)(np.zeros((1, *shape), "float32"), training=False)
        np.testing.assert_allclose(outputs[path], np.asarray(expected), rtol=1e-5, atol=1e-5)


def _readme_zoo_rows():
    text = open(os.path.join(os.path.dirname(ROOT), "README.md")).read()
    start = text.index("| name | version |")
    lines = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_readme_zoo_table_matches_the_cards():
    rows = _readme_zoo_rows()
    assert len(rows) == len(zoo.list_pretrained(ROOT))
    for name, version, _, coupling, bound, accuracy, ri, di, rates, auc in rows:
        card = zoo.show(f"{name.strip('`')}@{version}", ROOT)["card"].to_json()
        indices = card["indices"]
        assert float(coupling) == card["coupling"], name
        assert bound == ("-" if card["constraint"]["lipschitz"] is None else f"{card['constraint']['lipschitz']:g}")
        assert accuracy == f"{card['metrics']['accuracy']:.3f}", name
        assert (ri, di) == (f"{indices['recurrence']:.2f}", f"{indices['divergence']:.2f}"), name
        measured = [s.get("convergence_rate") for s in indices["per_stage"]]
        assert rates == ("-" if None in measured else " / ".join(f"{r:.2f}" for r in measured)), name
        assert auc == f"{card['occlusion_auc']:.2f}", name
