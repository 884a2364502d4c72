"""SavedModel export: export -> reload -> compare, TF-only loading, signatures, docs examples."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_images

from iterconv_keras.models.variants import build_model
from iterconv_keras.zoo import savedmodel as export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 1)
# Same graph, same kernels, same CPU: only op scheduling can differ, so the
# SavedModel's probabilities must match Keras' to float32 rounding.
PROB_ATOL = 1e-6


def tiny_trained_model(image_shape=SHAPE, multi_label=False, seed=3):
    """A tiny model after two optimizer steps (BN statistics and weights off their init)."""
    keras.utils.set_random_seed(seed)
    model = build_model("tiny", image_shape, 10, multi_label=multi_label)
    if multi_label:
        loss, labels = keras.losses.BinaryCrossentropy(from_logits=True), np.eye(10, dtype="float32")[np.arange(8) % 10]
    else:
        loss, labels = keras.losses.SparseCategoricalCrossentropy(from_logits=True), np.arange(8) % 10
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    images = random_images(8, image_shape, seed=seed)
    for _ in range(2):
        model.train_on_batch(images, labels)
    return model


def example_bytes(image, key=export.IMAGE_FEATURE):
    feature = {key: tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(image).reshape(-1)))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def trained():
    return tiny_trained_model()


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "1")
    card = export.model_card(trained, name="tiny", run_config={"dataset": "mnist", "lipschitz": None})
    export.write_saved_model(trained, path, card)
    return path


@pytest.fixture(scope="module")
def loaded(saved):
    return tf.saved_model.load(saved)


@pytest.mark.parametrize("batch", [1, 7])
def test_serving_default_equals_keras(trained, loaded, batch):
    images = random_images(batch, SHAPE, seed=10 + batch)
    logits = trained(images, training=False).numpy()
    expected = tf.nn.softmax(logits).numpy()
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    diff = np.abs(out["probabilities"].numpy() - expected).max()
    print(f"batch {batch}: max |probability difference| = {diff:.3g}")
    assert out["probabilities"].dtype == tf.float32 and out["probabilities"].shape == (batch, 10)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(out["logits"].numpy(), logits, rtol=0, atol=1e-5)
    assert out["classes"].dtype == tf.int64
    np.testing.assert_array_equal(out["classes"].numpy(), logits.argmax(-1))


def test_classify_scores_equal_serving_default(loaded):
    images = random_images(3, SHAPE, seed=20)
    out = loaded.signatures["classify"](inputs=tf.constant([example_bytes(im) for im in images]))
    reference = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["scores"].numpy(), reference["probabilities"].numpy(), rtol=0, atol=PROB_ATOL)
    # The card's dataset (mnist) names the classes "0".."9", one row per example.
    assert out["classes"].numpy().tolist() == [[str(k).encode() for k in range(10)]] * 3


def test_multi_label_probabilities_are_sigmoids():
    model = tiny_trained_model(multi_label=True, seed=4)
    serve, classify = export.serving_functions(model, [f"c{k}" for k in range(10)])
    images = random_images(4, SHAPE, seed=5)
    logits = model(images, training=False).numpy()
    out = serve(tf.constant(images))
    np.testing.assert_allclose(out["probabilities"].numpy(), 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-6)
    scores = classify(tf.constant([example_bytes(im) for im in images]))["scores"]
    np.testing.assert_allclose(scores.numpy(), out["probabilities"].numpy(), rtol=0, atol=1e-6)


_TF_ONLY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["keras"] = None           # any import of these now raises ImportError
    sys.modules["iterconv_keras"] = None
    import numpy as np
    import tensorflow as tf

    path, data = sys.argv[1], np.load(sys.argv[2])
    model = tf.saved_model.load(path)
    sig = model.signatures
    serve = sig["serving_default"](images=tf.constant(data["images"]))
    classify = sig["classify"](inputs=tf.constant(data["examples"]))
    errors = {}
    bad = {
        "spatial": ("sig", tf.zeros([1, 8, 8, 1])),
        "rank": ("sig", tf.zeros([16, 16, 1])),
        "dtype": ("sig", tf.zeros([1, 16, 16, 1], tf.int32)),
        "restored_spatial": ("fn", tf.zeros([1, 8, 8, 1])),
        "restored_dtype": ("fn", tf.zeros([1, 16, 16, 1], tf.float64)),
        "classify_length": ("classify", None),
    }
    for key, (how, arg) in bad.items():
        try:
            if how == "sig":
                sig["serving_default"](images=arg)
            elif how == "fn":
                model.serving_default(arg)
            else:
                sig["classify"](inputs=tf.constant([data["short_example"].item()]))
            errors[key] = ["no error", ""]
        except Exception as exc:
            errors[key] = [type(exc).__name__, " ".join(str(exc).split())[:600]]
    json.dump({
        "probabilities": serve["probabilities"].numpy().tolist(),
        "classes": serve["classes"].numpy().tolist(),
        "scores": classify["scores"].numpy().tolist(),
        "class_names": classify["classes"].numpy().astype(str).tolist(),
        "keras_loaded": [m for m in sys.modules if m.split(".")[0] in ("keras", "iterconv_keras") and sys.modules[m] is not None],
        "errors": errors,
    }, sys.stdout)
    """
)


TF_ONLY_TEST = "test_runs_with_tensorflow_only_and_rejects_bad_inputs_clearly"
CLI_TEST = "test_saved_model_cli_lists_documented_signatures"
TF_ONLY_IMAGES = random_images(5, SHAPE, seed=30)


@pytest.fixture(scope="module", autouse=True)
def outside_processes(request, saved, tmp_path_factory):
    """The TensorFlow-only run and ``saved_model_cli``, started right after the export
    so their slow TensorFlow imports overlap the in-process tests."""
    selected = {item.name for item in request.session.items}
    procs = {}
    if TF_ONLY_TEST in selected:
        data = tmp_path_factory.mktemp("tf_only") / "data.npz"
        np.savez(
            data, images=TF_ONLY_IMAGES,
            examples=np.array([example_bytes(im) for im in TF_ONLY_IMAGES], dtype=object),
            short_example=np.array(example_bytes(TF_ONLY_IMAGES[0][:8]), dtype=object),
        )
        # np.load refuses object arrays unless allowed.
        script = _TF_ONLY_SCRIPT.replace("np.load(sys.argv[2])", "np.load(sys.argv[2], allow_pickle=True)")
        procs[TF_ONLY_TEST] = subprocess.Popen(
            [sys.executable, "-c", script, saved, str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    if CLI_TEST in selected:
        procs[CLI_TEST] = subprocess.Popen(
            ["saved_model_cli", "show", "--dir", saved, "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _finished(proc):
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_runs_with_tensorflow_only_and_rejects_bad_inputs_clearly(trained, outside_processes):
    result = json.loads(_finished(outside_processes[TF_ONLY_TEST]))
    images = TF_ONLY_IMAGES
    assert result["keras_loaded"] == []
    expected = tf.nn.softmax(trained(images, training=False)).numpy()
    np.testing.assert_allclose(result["probabilities"], expected, rtol=0, atol=PROB_ATOL)
    np.testing.assert_array_equal(result["classes"], expected.argmax(-1))
    np.testing.assert_allclose(result["scores"], expected, rtol=0, atol=PROB_ATOL)
    assert result["class_names"] == [[str(k) for k in range(10)]] * 5

    errors = result["errors"]
    # The serving signature checks the shape up front: a clear message, no abort.
    for key, shape in (("spatial", "[1,8,8,1]"), ("rank", "[16,16,1]")):
        kind, message = errors[key]
        assert kind == "InvalidArgumentError", errors[key]
        assert f"Shape of tensor images {shape} is not compatible with expected shape [?,16,16,1]" in message
    assert errors["dtype"][0] == "InvalidArgumentError"
    assert "expected to be a float tensor but is a int32 tensor" in errors["dtype"][1]
    # The restored function binds against its input signature (TypeError naming it).
    for key in ("restored_spatial", "restored_dtype"):
        kind, message = errors[key]
        assert kind == "TypeError", errors[key]
        assert "TensorSpec(shape=(None, 16, 16, 1), dtype=tf.float32, name='images')" in message
    assert errors["classify_length"][0] == "InvalidArgumentError"
    assert "images" in errors["classify_length"][1]


def test_saved_model_cli_lists_documented_signatures(outside_processes):
    signatures = _parse_saved_model_cli(_finished(outside_processes[CLI_TEST]))
    assert signatures["serving_default"] == {
        "inputs": {"images": ("DT_FLOAT", "(-1, 16, 16, 1)")},
        "outputs": {"logits": ("DT_FLOAT", "(-1, 10)"), "probabilities": ("DT_FLOAT", "(-1, 10)"),
                    "classes": ("DT_INT64", "(-1)")},
    }
    assert signatures["classify"] == {
        "inputs": {"inputs": ("DT_STRING", "(-1)")},
        "outputs": {"classes": ("DT_STRING", "(-1, 10)"), "scores": ("DT_FLOAT", "(-1, 10)")},
    }


def _parse_saved_model_cli(text):
    """``{signature: {"inputs"|"outputs": {name: (dtype, shape)}}}`` from ``show --all``."""
    signatures = {}
    pattern = re.compile(
        r"signature_def\['(?P<sig>[^']+)'\]:(?P<body>.*?)(?=signature_def\[|\n\s*Concrete Functions|\Z)", re.S
    )
    for match in pattern.finditer(text):
        entry = {"inputs": {}, "outputs": {}}
        section = None
        for line in match.group("body").splitlines():
            line = line.strip()
            if line.startswith("The given SavedModel SignatureDef contains the following input"):
                section = "inputs"
            elif line.startswith("The given SavedModel SignatureDef contains the following output"):
                section = "outputs"
            elif m := re.match(r"(?:inputs|outputs)\['([^']+)'\] tensor_info:", line):
                name = m.group(1)
            elif line.startswith("dtype:"):
                dtype = line.split(":", 1)[1].strip()
            elif line.startswith("shape:"):
                entry[section][name] = (dtype, line.split(":", 1)[1].strip())
        signatures[match.group("sig")] = entry
    return signatures


def test_model_card_records_recipe_metrics_indices_and_versions(trained):
    evaluation = {
        "dataset": "mnist", "accuracy": 0.5, "loss": 1.5,
        "indices": {"recurrence": 0.1, "divergence": 0.8, "convergence": -0.3, "effective_parameters": 1234,
                    "parameters": trained.count_params(), "per_stage": [], "curves": {"accuracy": [0.1]}},
        "occlusion": {"levels": [0.0, 0.5], "accuracy": [0.9, 0.2], "auc": 0.71},
    }
    card = export.model_card(
        trained, name="x", run_config={"dataset": "mnist", "variant": "tiny", "lipschitz": 0.9, "epochs": 2},
        metrics={"accuracy": 0.97, "loss": 0.1, "dataset": "mnist"}, evaluation=evaluation,
    )
    json.dumps(card)  # serialisable as written to metadata.json
    assert card["parameters"] == sum(int(np.prod(v.shape)) for v in trained.trainable_variables)
    assert card["effective_parameters"] == 1234 and card["occlusion_auc"] == 0.71
    assert card["metrics"] == {"accuracy": 0.97, "loss": 0.1}  # the runner's metrics win over eval's
    assert card["indices"]["recurrence"] == 0.1 and "curves" not in card["indices"]
    # The model's own setting wins; the run's config fills it for models without one.
    assert card["constraint"] == {"lipschitz": trained.get_config().get("lipschitz", 0.9), "spectral_norm": None}
    assert card["coupling"] == 0.0
    assert card["recipe"]["epochs"] == 2 and card["variant"] == "tiny"
    assert card["libraries"]["tensorflow"] == tf.__version__ and card["libraries"]["keras"] == keras.__version__
    assert card["class_names"] == [str(k) for k in range(10)] and card["probabilities"] == "softmax"


def test_assets_extra_hold_the_full_model_and_card(trained, saved):
    from iterconv_keras import loading

    reloaded = loading.load_model(saved)
    assert reloaded.kind == "zoo_version" and reloaded.metadata["name"] == "tiny"
    images = random_images(2, SHAPE, seed=40)
    np.testing.assert_array_equal(reloaded.model(images, training=False), trained(images, training=False))
    assert reloaded.model.get_config() == trained.get_config()


def test_constrained_models_are_projected_onto_their_bound_before_export(trained):
    from iterconv_keras.analysis.certify import certify
    from iterconv_keras.models import lipschitz

    assert export.prepare_for_export(trained) is False  # unconstrained: untouched
    keras.utils.set_random_seed(3)
    model = build_model("tiny", SHAPE, 10, lipschitz=0.9)
    # Push every constrained kernel far above its bound, as training outside fit could.
    for _, _, block in lipschitz.constrained_blocks(model):
        for conv in block.convolutions:
            conv.kernel.assign(conv.kernel * 5.0)
    assert certify(model, iterations=300)["max_certified"] > 2 * 0.9
    assert export.prepare_for_export(model) is True
    assert certify(model, iterations=300)["max_certified"] <= 0.9
    assert export.model_card(model)["constraint"]["lipschitz"] == 0.9


def test_export_refuses_an_existing_directory(trained, saved):
    with pytest.raises(ValueError, match="already exists"):
        export.write_saved_model(trained, saved, {})


# -- the documented REST bodies (docs/serving.md, docs/examples/*.json)


def _tf_serving_example(features):
    # TF Serving's JSON -> tf.Example rule: a list of JSON floats is a float_list,
    # of integers an int64_list, of strings a bytes_list.
    feature = {}
    for key, values in features.items():
        values = values if isinstance(values, list) else [values]
        if all(isinstance(v, float) for v in values):
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        elif all(isinstance(v, int) for v in values):
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode() for v in values]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _documented_block(doc, marker):
    match = re.search(rf"<!-- example: {marker} -->\s*```json\n(.*?)```", doc, re.S)
    assert match, f"docs/serving.md lacks the {marker} example"
    return json.loads(match.group(1))


def test_documented_requests_are_accepted_and_responses_have_the_documented_shape(tmp_path):
    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        doc = f.read()
    with open(os.path.join(REPO, "docs", "examples", "predict.json")) as f:
        predict = json.load(f)
    with open(os.path.join(REPO, "docs", "examples", "classify.json")) as f:
        classify = json.load(f)
    for name in ("predict.json", "classify.json"):
        assert f"-d @docs/examples/{name}" in doc
    assert "tensorflow_model_server --rest_api_port=8501" in doc and "--model_config_file=$PWD/zoo/models.config" in doc

    model = tiny_trained_model(image_shape=(32, 32, 1), seed=6)
    path = str(tmp_path / "1")
    export.write_saved_model(model, path, export.model_card(model, run_config={"dataset": "digitclutter"}))
    signatures = tf.saved_model.load(path).signatures

    # :predict in the row format: TF Serving converts the nested lists to the input's dtype.
    out = signatures["serving_default"](images=tf.constant(predict["instances"], dtype=tf.float32))
    response = {"predictions": [{k: v.numpy()[i].tolist() for k, v in out.items()} for i in range(len(predict["instances"]))]}
    documented = _documented_block(doc, "predict-response")
    assert _structure(response) == _structure(documented)
    # The example image is a stroke, not an empty frame.
    assert 0 < np.mean(predict["instances"]) < 0.2

    assert classify["signature_name"] == "classify"
    examples = [_tf_serving_example(e) for e in classify["examples"]]
    out = signatures["classify"](inputs=tf.constant(examples))
    response = {"result": [[[c.decode(), float(s)] for c, s in zip(cs, ss)]
                           for cs, ss in zip(out["classes"].numpy(), out["scores"].numpy())]}
    documented = _documented_block(doc, "classify-response")
    assert _structure(response) == _structure(documented)
    assert [pair[0] for pair in documented["result"][0]] == [pair[0] for pair in response["result"][0]]
    np.testing.assert_allclose(out["scores"].numpy(), signatures["serving_default"](
        images=tf.constant(predict["instances"], dtype=tf.float32))["probabilities"].numpy(), atol=PROB_ATOL)

    # The documented pitfall: integers become an int64_list, which the float feature rejects.
    as_ints = {"images": [int(v) for v in classify["examples"][0]["images"]]}
    with pytest.raises(tf.errors.InvalidArgumentError):
        signatures["classify"](inputs=tf.constant([_tf_serving_example(as_ints)]))


def _structure(value):
    """Types and lengths of a JSON value, ignoring the numbers themselves."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return ["list", len(value), [_structure(v) for v in value]]
    return type(value).__name__
