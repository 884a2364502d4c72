"""Export an `IterativeResNet` to a plain SavedModel that TensorFlow Serving loads.

The exported directory (interfaces.md, "SavedModel signatures"):

    saved_model.pb, variables/, fingerprint.pb
    assets.extra/model.keras      the full Keras model (for the indices)
    assets.extra/metadata.json    the model card (see `model_card`)

Signatures:

- ``serving_default``: input ``images`` float32 ``[batch, H, W, C]`` in [0, 1]
  (normalisation is inside the model); outputs ``logits`` float32 ``[batch, K]``,
  ``probabilities`` float32 ``[batch, K]`` (softmax, or sigmoid for multi-label
  models) and ``classes`` int64 ``[batch]`` (the arg-max).
- ``classify``: TF Serving Classify-API shaped. Input ``inputs``: string
  ``[batch]`` of serialized ``tf.Example``s holding the image under the feature
  `IMAGE_FEATURE` (``"images"``) as a float list of H*W*C values in row-major
  (H, W, C) order. Outputs ``classes`` string ``[batch, K]`` (the class names,
  the same row for every example) and ``scores`` float32 ``[batch, K]`` (the
  probabilities of ``serving_default``).

The SavedModel needs neither Keras nor this package to load and run.
"""

import datetime
import os
import platform

import numpy as np

from iterconv_keras.fsutil import read_json_if_present, write_json_atomic

IMAGE_FEATURE = "images"
SERVING_SIGNATURE = "serving_default"
CLASSIFY_SIGNATURE = "classify"
ASSETS_EXTRA = "assets.extra"
MODEL_FILE = os.path.join(ASSETS_EXTRA, "model.keras")
METADATA_FILE = os.path.join(ASSETS_EXTRA, "metadata.json")
METADATA_SCHEMA = 1

# Names of the classes of the datasets the toolkit trains on; other models get
# their class ids as strings.
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DATASET_CLASS_NAMES = {
    "digitclutter": tuple(str(d) for d in range(10)),
    "digitdebris": tuple(str(d) for d in range(10)),
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": _FASHION_NAMES,
    "cifar10": _CIFAR10_NAMES,
}


def class_names_for(dataset, num_classes):
    """The class names of ``dataset``, or ``"0".."K-1"`` when unknown or mismatched."""
    names = DATASET_CLASS_NAMES.get(dataset)
    if names is None or len(names) != num_classes:
        return [str(k) for k in range(num_classes)]
    return list(names)


def prepare_for_export(model):
    """Project a Lipschitz-constrained model's kernels onto its bound before export.

    `iterconv_keras.models.lipschitz.enforce` runs many power iterations and rescales
    every constrained kernel, so weights trained outside ``fit`` (which enforces
    at its end) are exported within the bound too. Unconstrained models are
    left untouched.

    Args:
        model: the Keras model about to be exported.

    Returns:
        True when a projection was applied.
    """
    if getattr(model, "lipschitz", None) is None:
        return False
    from iterconv_keras.models import lipschitz

    lipschitz.enforce(model)
    return True


def serving_functions(model, class_names):
    """The two functions exported as signatures (plain TensorFlow, traceable).

    Args:
        model: an `IterativeResNet` (needs ``image_shape``, ``num_classes``,
            ``multi_label``).
        class_names: list of K strings returned by ``classify``.

    Returns:
        ``(serve, classify)``: functions of ``images`` and ``inputs``.
    """
    import tensorflow as tf

    height, width, channels = model.image_shape
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names needs {model.num_classes} entries, got {len(class_names)}: {class_names!r}")
    names = tf.constant([str(n) for n in class_names], dtype=tf.string)

    def outputs(images):
        # ensure_shape fails with a clear InvalidArgumentError naming both shapes.
        # Without it a rank-3 input reaches the oneDNN convolution, whose shape
        # check aborts the whole process (measured with TF 2.21), and a wrong
        # spatial size silently yields a prediction of the wrong image.
        images = tf.ensure_shape(images, [None, height, width, channels], name="check_images_shape")
        logits = tf.cast(model(images, training=False), tf.float32)
        probabilities = tf.sigmoid(logits) if model.multi_label else tf.nn.softmax(logits, axis=-1)
        return logits, probabilities

    def serve(images):
        logits, probabilities = outputs(images)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    def classify(inputs):
        features = tf.io.parse_example(
            inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([height * width * channels], tf.float32)}
        )
        images = tf.reshape(features[IMAGE_FEATURE], [-1, height, width, channels])
        _, probabilities = outputs(images)
        batch = tf.shape(probabilities)[0]
        return {"classes": tf.tile(names[tf.newaxis], [batch, 1]), "scores": probabilities}

    return serve, classify


def write_saved_model(model, path, metadata, class_names=None):
    """Write ``model`` as a SavedModel with both signatures plus ``assets.extra``.

    Args:
        model: a built `IterativeResNet`.
        path: directory to create; must not exist yet.
        metadata: the model card (a JSON-serialisable dict), written to
            ``assets.extra/metadata.json``.
        class_names: K strings for ``classify``; default from
            ``metadata["dataset"]`` (see `class_names_for`).

    Raises:
        ValueError: ``path`` exists or ``model`` is not an image classifier.
    """
    import keras
    import tensorflow as tf

    for attribute in ("image_shape", "num_classes", "multi_label"):
        if not hasattr(model, attribute):
            raise ValueError(f"export needs an IterativeResNet (with {attribute!r}), got {type(model).__name__}")
    if os.path.exists(path):
        raise ValueError(f"export target {path} already exists; versions are immutable")
    if class_names is None:
        class_names = metadata.get("class_names") or class_names_for(metadata.get("dataset"), model.num_classes)
    prepare_for_export(model)
    serve, classify = serving_functions(model, class_names)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_SIGNATURE, serve,
        input_signature=[tf.TensorSpec([None, *model.image_shape], tf.float32, name="images")],
    )
    archive.add_endpoint(
        CLASSIFY_SIGNATURE, classify, input_signature=[tf.TensorSpec([None], tf.string, name="inputs")]
    )
    archive.write_out(path, verbose=False)
    os.makedirs(os.path.join(path, ASSETS_EXTRA), exist_ok=True)
    model.save(os.path.join(path, MODEL_FILE))
    write_json_atomic(os.path.join(path, METADATA_FILE), metadata, sort_keys=True)


def model_card(model, *, name=None, run_config=None, metrics=None, evaluation=None, source=None, class_names=None):
    """The ``metadata.json`` document of an exported model.

    Args:
        model: the `IterativeResNet`.
        name: zoo name, if any.
        run_config: the training run's ``config.json`` (the recipe), or None.
        metrics: the run's ``metrics.json`` (final test metrics), or None.
        evaluation: an ``iterconv eval --json`` document, or None; supplies the
            indices, effective parameters and occlusion AUC.
        source: where the model came from (a path or reference), for provenance.
        class_names: K strings; default from the dataset.

    Returns:
        A JSON-serialisable dict. Fields without a known value are None, so the
        schema is the same for every version.
    """
    run_config = dict(run_config or {})
    metrics = dict(metrics or {})
    evaluation = dict(evaluation or {})
    config = model.get_config()
    dataset = run_config.get("dataset") or metrics.get("dataset") or evaluation.get("dataset")
    indices = evaluation.get("indices") or {}
    occlusion = evaluation.get("occlusion") or {}
    # The model's own setting is the truth; the run's config is the fallback for
    # models saved before the constraint existed.
    lipschitz = config["lipschitz"] if "lipschitz" in config else run_config.get("lipschitz")
    return {
        "schema": METADATA_SCHEMA,
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "dataset": dataset,
        "image_shape": list(model.image_shape),
        "num_classes": model.num_classes,
        "multi_label": bool(model.multi_label),
        "class_names": list(class_names or class_names_for(dataset, model.num_classes)),
        "recipe": run_config or None,
        "variant": run_config.get("variant"),
        "architecture": {"class_name": type(model).__name__, "config": config},
        "coupling": float(config.get("coupling", run_config.get("coupling", 0.0))),
        # The run's flag says whether --spectral-norm was on; with it off a
        # configured --lipschitz value is not applied.
        "constraint": {"lipschitz": lipschitz, "spectral_norm": run_config.get("spectral_norm")},
        # Trainable parameters, the count the effective number is compared with
        # (batch-norm moving statistics are not learned).
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "effective_parameters": indices.get("effective_parameters"),
        "metrics": _final_metrics(metrics, evaluation),
        "indices": _index_summary(indices) if indices else None,
        "occlusion_auc": occlusion.get("auc"),
        "signatures": {
            SERVING_SIGNATURE: {"inputs": {"images": ["float32", [None, *model.image_shape]]},
                                "outputs": {"logits": ["float32", [None, model.num_classes]],
                                            "probabilities": ["float32", [None, model.num_classes]],
                                            "classes": ["int64", [None]]}},
            CLASSIFY_SIGNATURE: {"inputs": {"inputs": ["string", [None]]},
                                 "example_feature": {IMAGE_FEATURE: ["float", int(_size(model.image_shape))]},
                                 "outputs": {"classes": ["string", [None, model.num_classes]],
                                             "scores": ["float32", [None, model.num_classes]]}},
        },
        "probabilities": "sigmoid" if model.multi_label else "softmax",
        "libraries": library_versions(),
    }


def _size(shape):
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _final_metrics(metrics, evaluation):
    # The training runner's test metrics first; an eval document fills what is missing.
    result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("accuracy", "loss"):
        if key not in result and isinstance(evaluation.get(key), (int, float)):
            result[key] = evaluation[key]
    return result


def _index_summary(indices):
    # The curves are bulky and belong to the eval document; the card keeps the numbers.
    keys = ("recurrence", "divergence", "convergence", "effective_parameters", "parameters", "per_stage")
    return {k: indices[k] for k in keys if k in indices}


def library_versions():
    """Versions of the libraries that wrote an export (for reproducibility)."""
    import keras
    import numpy
    import tensorflow as tf

    import iterconv_keras

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "iterconv": iterconv_keras.__version__,
    }


def read_run_files(run_dir):
    """The ``config.json``, ``metrics.json`` and ``eval.json`` of a run (each {} if absent).

    Args:
        run_dir: a training run directory.

    Raises:
        IntegrityError: one of the files exists but is not valid JSON.
    """
    return {key: read_json_if_present(os.path.join(run_dir, f"{key}.json")) for key in ("config", "metrics", "eval")}


