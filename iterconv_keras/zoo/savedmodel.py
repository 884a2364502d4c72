"""The zoo version format: a plain SavedModel that TensorFlow Serving loads, plus extras.

A version directory (docs/serving.md; the names are defined only here):

    saved_model.pb, variables/, fingerprint.pb
    assets.extra/model.keras      the full Keras model (for the indices)
    assets.extra/metadata.json    the model card (`iterconv_keras.zoo.card.ModelCard`)

Signatures:

- ``serving_default``: input ``images`` float32 ``[batch, H, W, C]`` in [0, 1]
  (normalisation is inside the model); outputs ``logits`` float32 ``[batch, K]``,
  ``probabilities`` float32 ``[batch, K]`` (softmax, or sigmoid for multi-label
  models) and ``classes`` int64 ``[batch]`` (the arg-max: for a multi-label
  model the single most probable class, not the set).
- ``classify``: TF Serving Classify-API shaped. Input ``inputs``: string
  ``[batch]`` of serialized ``tf.Example``s holding the image under the feature
  `IMAGE_FEATURE` (``"images"``) as a float list of H*W*C values in row-major
  (H, W, C) order. Outputs ``classes`` string ``[batch, K]`` (the class names,
  the same row for every example) and ``scores`` float32 ``[batch, K]`` (the
  probabilities of ``serving_default``).

The SavedModel needs neither Keras nor this package to load and run, and holds
each variable once (see `write_saved_model`). This module imports no
TensorFlow at import time, so listing the zoo stays cheap.
"""

import os

from iterconv_keras.fsutil import write_json_atomic

IMAGE_FEATURE = "images"
SERVING_SIGNATURE = "serving_default"
CLASSIFY_SIGNATURE = "classify"
ASSETS_EXTRA = "assets.extra"
MODEL_FILE = os.path.join(ASSETS_EXTRA, "model.keras")
METADATA_FILE = os.path.join(ASSETS_EXTRA, "metadata.json")


def signature_summary(image_shape, num_classes):
    """The signatures of a version as the model card records them (dtype, shape per tensor).

    Args:
        image_shape: ``(H, W, C)``.
        num_classes: K.
    """
    size = 1
    for d in image_shape:
        size *= int(d)
    return {
        SERVING_SIGNATURE: {"inputs": {"images": ["float32", [None, *image_shape]]},
                            "outputs": {"logits": ["float32", [None, num_classes]],
                                        "probabilities": ["float32", [None, num_classes]],
                                        "classes": ["int64", [None]]}},
        CLASSIFY_SIGNATURE: {"inputs": {"inputs": ["string", [None]]},
                             "example_feature": {IMAGE_FEATURE: ["float", size]},
                             "outputs": {"classes": ["string", [None, num_classes]],
                                         "scores": ["float32", [None, num_classes]]}},
    }


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


def write_saved_model(model, path, card):
    """Write ``model`` as a SavedModel with both signatures plus ``assets.extra``.

    The model is written as it is: `iterconv_keras.zoo.publish.export_version`
    is where a constrained model is projected (on a copy) before it gets here.

    Each variable is stored once. ``ExportArchive.track(model)`` would add the
    model's Keras variables as a second set of checkpoint entries beside the
    TensorFlow variables the endpoints capture (``_all_variables``), doubling
    ``variables/``; the endpoints alone track every variable inference needs
    (weights and batch-norm statistics), and nothing else is needed to serve.

    Args:
        model: a built `IterativeResNet`.
        path: directory to create; must not exist yet.
        card: the model card as a JSON document (``ModelCard.to_json()``),
            written to ``assets.extra/metadata.json``; its ``class_names``
            are what ``classify`` returns.

    Raises:
        ValueError: ``path`` exists, ``model`` is not an image classifier, or
            the card's class names do not match the model.
    """
    import keras
    import tensorflow as tf

    for attribute in ("image_shape", "num_classes", "multi_label"):
        if not hasattr(model, attribute):
            raise ValueError(f"export needs an IterativeResNet (with {attribute!r}), got {type(model).__name__}")
    if os.path.exists(path):
        raise ValueError(f"export target {path} already exists; versions are immutable")
    class_names = card.get("class_names") or [str(k) for k in range(model.num_classes)]
    serve, classify = serving_functions(model, class_names)
    archive = keras.export.ExportArchive()
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
    write_json_atomic(os.path.join(path, METADATA_FILE), card, sort_keys=True)
