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

from iterconv_keras import loading, zoo
from iterconv_keras.models.variants import create_model
from iterconv_keras.zoo import savedmodel as export
from iterconv_keras.zoo.card import ModelCard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 1)
SMALL_SHAPE = (8, 8, 1)
# Same graph, same kernels, same CPU: only op scheduling can differ, so the
# SavedModel's probabilities must match Keras' to float32 rounding.
PROB_ATOL = 1e-6


def tiny_trained_model(image_shape=SHAPE, multi_label=False, seed=3):
    """A tiny model after two optimizer steps (BN statistics and weights off their init)."""
    keras.utils.set_random_seed(seed)
    model = create_model("tiny", image_shape, 10, multi_label=multi_label)
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
    card = ModelCard.from_model(trained, name="tiny", recipe={"dataset": "mnist", "lipschitz": None})
    export.write_saved_model(trained, path, card.to_json())
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
        "keras_loaded": [m for m in sys.modules
                         if m.split(".")[0] in ("keras", "iterconv_keras") and sys.modules[m] is not None],
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
            ["saved_model_cli", "show", "--dir", saved, "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
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


def test_each_variable_is_stored_once(trained, saved):
    # The old export tracked the model too, so every value was stored twice
    # (`_all_variables/...` and `variables/...`, 415,002 values each for `small`).
    stored = [(name, shape) for name, shape in tf.train.list_variables(os.path.join(saved, "variables", "variables"))
              if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    # Oracle: inference reads every weight and batch-norm statistic of the model, once.
    assert sum(int(np.prod(shape)) for _, shape in stored) == sum(int(np.prod(w.shape)) for w in trained.weights)
    assert len(stored) == len(trained.weights)
    names = [node.variable.name for node in _object_graph(saved).nodes if node.WhichOneof("kind") == "variable"]
    assert len(names) == len(set(names)) == len(trained.weights)


def _object_graph(path):
    from tensorflow.core.protobuf import saved_model_pb2

    document = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        document.ParseFromString(f.read())
    return document.meta_graphs[0].object_graph_def


def test_card_parameters_match_the_saved_models_trainable_variables(saved):
    # Independent of Keras: the SavedModel's own object graph marks trainable variables.
    trainable = sum(int(np.prod([d.size for d in node.variable.shape.dim])) for node in _object_graph(saved).nodes
                    if node.WhichOneof("kind") == "variable" and node.variable.trainable)
    with open(os.path.join(saved, "assets.extra", "metadata.json")) as f:
        assert json.load(f)["parameters"] == trainable > 0


def test_assets_extra_hold_the_full_model_and_card(trained, saved):
    reloaded = loading.load(saved)
    assert reloaded.provenance.kind == "zoo_version" and reloaded.card.name == "tiny"
    images = random_images(2, SHAPE, seed=40)
    np.testing.assert_array_equal(reloaded.model(images, training=False), trained(images, training=False))
    assert reloaded.model.get_config() == trained.get_config()


def test_export_refuses_an_existing_directory(trained, saved):
    with pytest.raises(ValueError, match="already exists"):
        export.write_saved_model(trained, saved, {})


def _exact_conv_norm(kernel, input_shape):
    """Largest singular value of the zero-padded SAME convolution as an explicit matrix."""
    height, width, channels = input_shape
    n = height * width * channels
    basis = np.eye(n, dtype=np.float64).reshape(n, height, width, channels)
    columns = tf.nn.conv2d(basis, np.asarray(kernel, np.float64), strides=1, padding="SAME").numpy()
    return float(np.linalg.norm(columns.reshape(n, -1), ord=2))


def test_export_projects_a_copy_of_a_constrained_model_and_says_so(tmp_path):
    # Review M6: the caller's model is not changed, and the card records the projection.
    from iterconv_keras.models import lipschitz

    keras.utils.set_random_seed(3)
    # 8x8 images, not SHAPE: the exact oracle is a full SVD of each convolution as an explicit
    # (height * width * channels)-square matrix, 256 here instead of 1024 (about 50x cheaper);
    # the projection and its certificate do not depend on the image size.
    model = create_model("tiny", SMALL_SHAPE, 10, lipschitz=0.9)
    convs = [conv for _, _, block in lipschitz.constrained_blocks(model) for conv in block.convolutions]
    # Push every constrained kernel far above its bound, as training outside fit could.
    for conv in convs:
        conv.kernel.assign(conv.kernel * 5.0)
    weights = [np.array(w) for w in model.weights]
    per_conv = np.sqrt(0.9)  # sqrt(c) / Lip(relu): the two convolutions of a block share c
    exact_before = [_exact_conv_norm(conv.kernel, conv.kernel_constraint.input_shape) for conv in convs]
    assert max(exact_before) > 2 * per_conv

    _, _, path = zoo.export_version(model, "projected", root=str(tmp_path))

    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))  # bitwise untouched
    exported = loading.load(path)
    projection = exported.card.projection
    assert projection["per_conv_bound"] == pytest.approx(per_conv)
    # The card's norms are certified upper bounds: never below the exact norm, and close to it.
    assert max(exact_before) <= projection["max_conv_norm_before"] <= 1.5 * max(exact_before)
    exported_convs = [c for _, _, b in lipschitz.constrained_blocks(exported.model) for c in b.convolutions]
    exact_after = [_exact_conv_norm(c.kernel, c.kernel_constraint.input_shape) for c in exported_convs]
    assert max(exact_after) <= projection["max_conv_norm_after"] <= per_conv
    # An unconstrained model is exported as it is, with no projection on its card.
    plain = create_model("tiny", SMALL_SHAPE, 10)
    assert loading.load(zoo.export_version(plain, "plain", root=str(tmp_path))[2]).card.projection is None


# -- the documented REST bodies (docs/serving.md, docs/examples/*.json), through TF Serving's own protos


def _documented_block(doc, marker):
    match = re.search(rf"<!-- example: {marker} -->\s*```json\n(.*?)```", doc, re.S)
    assert match, f"docs/serving.md lacks the {marker} example"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def documented():
    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        doc = f.read()
    bodies = {}
    for name in ("predict", "classify"):
        with open(os.path.join(REPO, "docs", "examples", f"{name}.json")) as f:
            bodies[name] = f.read()
    return doc, bodies


def test_documented_example_image_is_a_digitclutter_test_image(documented):
    from iterconv_keras.data import generated

    doc, bodies = documented
    images, labels, _ = generated.clutter_test_set(3, 1)
    expected = images[0].astype(np.float64) / 255
    np.testing.assert_allclose(json.loads(bodies["predict"])["instances"][0], expected, atol=5e-5)
    np.testing.assert_allclose(json.loads(bodies["classify"])["examples"][0]["images"], expected.reshape(-1), atol=5e-5)
    assert "digits 3, 4 and 7" in doc and np.flatnonzero(labels[0]).tolist() == [3, 4, 7]
    # TF Serving turns a JSON number without a decimal point into an int64_list, which
    # the float feature rejects: every value of the classify body is written as a float.
    assert not re.findall(r"[\[,]\s*-?\d+\s*(?=[,\]])", bodies["classify"])


def test_documented_responses_are_what_the_zoo_model_answers(documented):
    """The documented :predict and :classify responses, recomputed from the committed
    `digitclutter-small` with the requests built as TF Serving's protobufs."""
    from tensorflow_serving.apis import classification_pb2, predict_pb2

    doc, bodies = documented
    for name in ("predict.json", "classify.json"):
        assert f"-d @docs/examples/{name}" in doc
    assert "tensorflow_model_server --rest_api_port=8501" in doc and "--model_config_file=/models/models.config" in doc
    assert "/v1/models/digitclutter-small/versions/2:predict" in doc  # the documented answers are version 2's
    model = zoo.load_serving("digitclutter-small@2")
    card = zoo.show("digitclutter-small@2")["card"]
    assert card.probabilities == "sigmoid" and "multi-label" in doc

    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(json.loads(bodies["predict"])["instances"], tf.float32))
    outputs = model.signatures["serving_default"](images=tf.constant(tf.make_ndarray(request.inputs["images"])))
    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    (prediction,) = _documented_block(doc, "predict-response")["predictions"]
    assert set(prediction) == set(response.outputs)
    for key in ("logits", "probabilities"):
        np.testing.assert_allclose(prediction[key], tf.make_ndarray(response.outputs[key])[0], atol=2e-4)
    assert prediction["classes"] == int(tf.make_ndarray(response.outputs["classes"])[0]) == 4
    # Multi-label: the documented digit set is the three classes above 0.5, not `classes`.
    assert [k for k, p in enumerate(prediction["probabilities"]) if p > 0.5] == [3, 4, 7]

    body = json.loads(bodies["classify"])
    request = classification_pb2.ClassificationRequest()
    request.model_spec.signature_name = body["signature_name"]
    for features in body["examples"]:
        example = request.input.example_list.examples.add()
        for key, values in features.items():
            example.features.feature[key].float_list.value.extend(values)
    serialized = [e.SerializeToString() for e in request.input.example_list.examples]
    outputs = model.signatures[request.model_spec.signature_name](inputs=tf.constant(serialized))
    response = classification_pb2.ClassificationResponse()
    for names, scores in zip(outputs["classes"].numpy(), outputs["scores"].numpy(), strict=True):
        classifications = response.result.classifications.add()
        for label, score in zip(names, scores, strict=True):
            classifications.classes.add(label=label.decode(), score=score)
    documented_result = _documented_block(doc, "classify-response")["result"]
    assert len(documented_result) == len(response.result.classifications) == 1
    for pairs, classifications in zip(documented_result, response.result.classifications, strict=True):
        assert [p[0] for p in pairs] == [c.label for c in classifications.classes] == card.class_names
        np.testing.assert_allclose([p[1] for p in pairs], [c.score for c in classifications.classes], atol=2e-4)
    np.testing.assert_allclose([p[1] for p in documented_result[0]], prediction["probabilities"], atol=1e-9)

    # The documented pitfall: integers become an int64_list, which the float feature rejects.
    as_ints = classification_pb2.ClassificationRequest()
    as_ints.input.example_list.examples.add().features.feature["images"].int64_list.value.extend([0] * 1024)
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.signatures["classify"](inputs=tf.constant([as_ints.input.example_list.examples[0].SerializeToString()]))
