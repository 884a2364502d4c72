"""FusedBatchNormalization computes Keras' BatchNormalization (only rounding differs)."""

import keras
import numpy as np
import tensorflow as tf

from iterconv_keras.models.blocks import make_norm
from iterconv_keras.models.normalization import FusedBatchNormalization


def _pair(channels=3):
    reference = keras.layers.BatchNormalization(momentum=0.9)
    fused = FusedBatchNormalization(momentum=0.9)
    for layer in (reference, fused):
        layer.build((None, 5, 5, channels))
        layer.gamma.assign([0.5, 2.0, -1.0])
        layer.beta.assign([0.1, 0.2, 0.3])
    return reference, fused


def test_training_output_gradients_and_moving_statistics_match_keras():
    reference, fused = _pair()
    x = tf.random.stateless_normal((8, 5, 5, 3), seed=(1, 2)) * 3.0 + 1.0
    results = []
    for layer in (reference, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(y))  # a non-trivial upstream gradient
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # Training output really is batch-normalised: per channel mean beta, std |gamma|.
    y = results[1][0].numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), [0.1, 0.2, 0.3], atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), [0.5, 2.0, 1.0], rtol=2e-3)


def test_inference_uses_moving_statistics_like_keras():
    reference, fused = _pair()
    for layer in (reference, fused):
        layer.moving_mean.assign([1.0, -1.0, 0.0])
        layer.moving_variance.assign([1.0, 4.0, 0.25])
    x = tf.random.stateless_normal((4, 5, 5, 3), seed=(3, 4))
    expected = (x.numpy() - [1.0, -1.0, 0.0]) / np.sqrt(np.array([1.0, 4.0, 0.25]) + 1e-3) * [0.5, 2.0, -1.0]
    expected += [0.1, 0.2, 0.3]
    np.testing.assert_allclose(fused(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused(x).numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-6)


def test_unfusable_input_falls_back_to_keras():
    layer = FusedBatchNormalization()
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)  # rank 2
    reference = keras.layers.BatchNormalization()
    np.testing.assert_array_equal(layer(x, training=True).numpy(), reference(x, training=True).numpy())


def test_make_norm_uses_it_and_config_round_trips():
    layer = make_norm("batch", 0.9, "n")
    assert isinstance(layer, FusedBatchNormalization)
    assert not isinstance(make_norm("sync_batch", 0.9, "n"), FusedBatchNormalization)
    config = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is FusedBatchNormalization and restored.get_config() == layer.get_config()


def test_gain_capped_fused_training_path_has_the_capped_function_and_its_gradient():
    from iterconv_keras.models.normalization import GainCappedBatchNormalization

    fused, reference = GainCappedBatchNormalization(max_gain=1.0), GainCappedBatchNormalization(max_gain=1.0)
    reference._fusable = lambda inputs, mask: False  # the separate-ops arithmetic as the oracle
    x = tf.random.stateless_normal((8, 5, 5, 3), seed=(5, 6)) * 3.0 + 1.0  # batch std ~3
    results = []
    for layer in (fused, reference):
        layer.build(x.shape)
        layer.gamma.assign([0.5, 20.0, -9.0])  # channels 2 and 3 bind the cap, channel 1 does not
        layer.beta.assign([0.1, 0.2, 0.3])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(y))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # Where the cap binds the output's std is exactly max_gain times the input's.
    y = results[0][0].numpy()
    np.testing.assert_allclose(y.std(axis=(0, 1, 2))[1:], x.numpy().std(axis=(0, 1, 2))[1:], rtol=1e-4)


def test_files_saved_with_keras_batch_norm_still_load(tmp_path):
    # Models trained before the fused layer existed hold Keras' own BatchNormalization;
    # their weights must load into today's model and give the same predictions.
    from iterconv_keras.loading import load_model
    from iterconv_keras.models import blocks
    from iterconv_keras.models import resnet as model_module
    from iterconv_keras.models.variants import create_model

    def keras_norm(norm, momentum, name, max_gain=None, dtype=None):
        return keras.layers.BatchNormalization(momentum=momentum, name=name, dtype=dtype)

    keras.utils.set_random_seed(4)
    original = blocks.make_norm
    blocks.make_norm = model_module.make_norm = keras_norm
    try:
        old = create_model("tiny", (12, 12, 1), 5)
    finally:
        blocks.make_norm = model_module.make_norm = original
    assert type(old.stem_norm) is keras.layers.BatchNormalization
    x = np.random.default_rng(0).random((3, 12, 12, 1), dtype=np.float32)
    expected = np.asarray(old(x))
    old.save(tmp_path / "old.keras")

    loaded = load_model(str(tmp_path / "old.keras"))
    assert isinstance(loaded.stem_norm, FusedBatchNormalization)
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=1e-5, atol=1e-6)
