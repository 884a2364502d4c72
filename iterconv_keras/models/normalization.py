"""The batch normalisations of the blocks, and their Lipschitz gains at inference.

- `FusedBatchNormalization`: Keras' `BatchNormalization` computed by TensorFlow's
  fused kernel. Keras 3 implements the layer on the TensorFlow backend with
  separate ops (``tf.nn.moments`` and ``tf.nn.batch_normalization``): about ten
  passes over each feature map forward and backward. ``FusedBatchNormV3`` does
  the same in one op each way, and oneDNN has a kernel for it; on the ``small``
  variant this made a whole training step faster (``docs/performance.md``). The
  function is the same (batch statistics in training with Keras' biased variance
  for the moving average, moving statistics at inference); only rounding differs.
- `GainCappedBatchNormalization`: batch normalisation whose per-channel gain is
  capped, so a Lipschitz-constrained residual function can bound it
  (``docs/lipschitz.md``; Behrmann et al., ICML 2019, constrain the whole
  residual function in the same spirit).
- `inference_gains`: the per-channel gains any of them applies at inference,
  the Lipschitz constant that a certificate of ``Lip(f)`` multiplies in.
"""

import keras
import numpy as np
import tensorflow as tf

from iterconv_keras.models._checks import positive_number


# The class is deliberately named BatchNormalization: Keras' .keras format stores
# the weights of layers held in lists under the snake-cased class name
# ("layers/batch_normalization"), so the name keeps files saved with Keras' own
# layer loadable (tests/test_normalization.py). It is registered as
# "iterconv>FusedBatchNormalization".
@keras.saving.register_keras_serializable(package="iterconv", name="FusedBatchNormalization")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` through ``tf.raw_ops.FusedBatchNormV3``.

    Takes the fused path for NHWC feature maps (rank 4, ``axis=-1``) in the
    layer's compute dtype (float32, or bfloat16 / float16 under a mixed policy:
    the kernel keeps the statistics, scale and offset in float32, as Keras'
    layer does) without mask, renorm or cross-replica synchronisation; anything
    else falls back to Keras' own implementation, so the layer accepts every
    `keras.layers.BatchNormalization` argument and input.

    Args:
        **kwargs: `keras.layers.BatchNormalization` arguments (``momentum``,
            ``epsilon``, ``name``, ...).

    Example:
        >>> norm = FusedBatchNormalization(momentum=0.9)
        >>> y = norm(keras.ops.ones((2, 4, 4, 3)), training=True)
    """

    def _fusable(self, inputs, mask):
        return (
            mask is None
            and not self.renorm
            and not self.synchronized
            and self.axis in (-1, 3)
            and len(inputs.shape) == 4
            and inputs.dtype == self.compute_dtype
            and self.compute_dtype in _FUSED_DTYPES
        )

    def call(self, inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        ones = tf.ones_like(self.moving_mean)
        scale = self.gamma if self.scale else ones
        offset = self.beta if self.center else tf.zeros_like(ones)
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset, mean=empty, variance=empty,
                epsilon=self.epsilon, is_training=True, data_format="NHWC",
            )
            # The kernel returns the Bessel-corrected variance; Keras averages
            # the biased one, so undo the correction to keep the same statistics.
            count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
            variance = variance * ((count - 1.0) / tf.maximum(count, 1.0))
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
            return outputs
        outputs, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False, data_format="NHWC",
        )
        return outputs


FusedBatchNormalization = BatchNormalization
# Feature-map dtypes of TensorFlow's fused kernels (statistics, scale and offset are float32).
_FUSED_DTYPES = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="iterconv")
class GainCappedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation whose per-channel gain ``|gamma| / sqrt(var + eps)`` is at most ``max_gain``.

    The gain actually applied is ``clip(gamma / sqrt(var + eps), -max_gain, max_gain)``,
    with the moving variance at inference and the batch variance in training (so
    training sees the same function family as inference).
    At inference the layer is affine with Lipschitz constant ``<= max_gain`` by
    construction, whatever the moving statistics are; ``gamma`` itself is not
    modified, so coupled blocks keep identical trainable weights while their
    moving statistics differ (docs/method.md, "Soft gradient coupling"). Where the cap binds, the
    layer no longer amplifies small activations to unit variance.

    Args:
        max_gain: float > 0, the cap on the per-channel gain. Default 1.0.
        **kwargs: `keras.layers.BatchNormalization` arguments (``momentum``,
            ``synchronized``, ``name``, ...); only ``axis=-1``, no ``renorm``.

    Example:
        >>> norm = GainCappedBatchNormalization(max_gain=1.0, momentum=0.9)
    """

    def __init__(self, max_gain=1.0, **kwargs):
        super().__init__(**kwargs)
        self.max_gain = positive_number(max_gain, "max_gain")
        if self.renorm:
            raise ValueError(f"GainCappedBatchNormalization does not support renorm, got renorm={self.renorm!r}")
        if self.axis != -1:
            raise ValueError(f"GainCappedBatchNormalization normalises the last axis only, got axis={self.axis!r}")

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and self._fusable(inputs, mask):
            return self._fused_training_call(inputs)
        # Same statistics and updates as BatchNormalization.call (without renorm);
        # only the scale is capped before the affine map.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = keras.ops.cast(inputs, compute_dtype)
        moving_mean = keras.ops.cast(self.moving_mean, compute_dtype)
        moving_variance = keras.ops.cast(self.moving_variance, compute_dtype)
        if training and self.trainable:
            mean, variance = self._moments(inputs, mask)
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            mean, variance = moving_mean, moving_variance
        # tf.nn.batch_normalization's own arithmetic (so the layer is BatchNormalization
        # bitwise where the cap does not bind) with a clip of the gain in between.
        gain = keras.ops.rsqrt(variance + self.epsilon)
        if self.scale:
            gain = gain * keras.ops.cast(self.gamma, compute_dtype)
        gain = keras.ops.clip(gain, -self.max_gain, self.max_gain)
        offset = -mean * gain
        if self.center:
            offset = keras.ops.cast(self.beta, compute_dtype) + offset
        outputs = inputs * gain + offset
        return keras.ops.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask):
        return (mask is None and not self.synchronized and len(inputs.shape) == 4
                and inputs.dtype == self.compute_dtype and self.compute_dtype in _FUSED_DTYPES)

    def _fused_training_call(self, inputs):
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        outputs, mean, variance = _capped_batch_norm(inputs, gamma, beta, self.epsilon, self.max_gain)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs

    def inference_gains(self):
        """Per-channel gains applied at inference, as a NumPy array."""
        variance = np.asarray(self.moving_variance, dtype=np.float64)
        scale = np.sqrt(variance + self.epsilon)
        gamma = np.asarray(self.gamma, dtype=np.float64) if self.scale else np.ones_like(variance)
        return np.minimum(np.abs(gamma) / scale, self.max_gain)

    def get_config(self):
        config = super().get_config()
        config["max_gain"] = self.max_gain
        return config


def _capped_batch_norm(x, gamma, beta, epsilon, max_gain):
    """Training-mode gain-capped batch norm on TensorFlow's fused kernels.

    Forward: one ``FusedBatchNormV3`` (scale 1) gives ``xhat`` and the batch
    statistics; ``y = xhat * clip(gamma / std, +-max_gain) * std + beta``.
    Backward: ``FusedBatchNormGradV3`` gives batch norm's gradient for the applied
    scale; in channels where the cap binds the scale is ``max_gain * std``, which
    depends on x through std, so the function there is ``max_gain * (x - mean) +
    beta`` and the term batch norm's gradient subtracts for std must be added
    back: ``dx += gain * xhat * sum(dy * xhat) / n``, and ``dgamma = 0``. This is
    the exact gradient of the capped function without a separate
    ``tf.nn.moments`` pass (tests/test_normalization.py compares it with the
    separate-ops layer).

    A 16-bit ``x`` (a mixed dtype policy) is normalised in float32 and ``y`` and
    ``dx`` are rounded to its dtype at the end: the gradient adds back a term
    batch norm's gradient subtracted, a cancellation that 16-bit kernel outputs
    would turn into percent-size errors. For float32 the casts are identities.

    Returns:
        ``(y, batch_mean, biased_batch_variance)``.
    """
    empty = tf.constant([], tf.float32)

    @tf.custom_gradient
    def capped(x16, gamma, beta):
        x = tf.cast(x16, tf.float32)
        ones = tf.ones_like(gamma)
        xhat, mean, corrected, saved_mean, saved_variance, reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=ones, offset=tf.zeros_like(gamma), mean=empty, variance=empty,
            epsilon=epsilon, is_training=True, data_format="NHWC",
        )
        # The statistics from the documented outputs, not the reserve spaces (which
        # hold the inverse variance under cuDNN); the kernel's variance is
        # Bessel-corrected, batch norm normalises with the biased one.
        count = tf.cast(tf.size(x) // tf.size(gamma), tf.float32)
        variance = corrected * ((count - 1.0) / tf.maximum(count, 1.0))
        std = tf.sqrt(variance + epsilon)
        gain = tf.clip_by_value(gamma / std, -max_gain, max_gain)
        binds = tf.cast(tf.abs(gamma / std) > max_gain, tf.float32)
        scale = gain * std
        y = xhat * scale + beta

        def grad(dy, dmean, dvariance):
            # The batch statistics returned beside y feed only the moving averages,
            # which are not differentiated (as in Keras' layer).
            del dmean, dvariance
            dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.cast(dy, tf.float32), x=x, scale=scale, reserve_space_1=saved_mean,
                reserve_space_2=saved_variance, reserve_space_3=reserve, epsilon=epsilon, data_format="NHWC",
                is_training=True,
            )
            dx = dx + xhat * (binds * gain * dscale / count)
            return tf.cast(dx, x16.dtype), (1.0 - binds) * dscale, doffset

        return (tf.cast(y, x16.dtype), tf.identity(mean), tf.identity(variance)), grad

    # Tensors, not variables: the custom gradient then covers gamma and beta directly.
    return capped(tf.convert_to_tensor(x), tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


def inference_gains(layer):
    """Per-channel gains ``|gamma| / sqrt(moving_var + eps)`` a normalisation layer applies at inference.

    At inference batch normalisation is the affine map ``x -> gain * x + offset``
    per channel (with the sign of gamma), so its Lipschitz constant is the largest
    gain. `GainCappedBatchNormalization` caps the gains at ``max_gain``; an
    identity layer (``norm="none"``) has gain 1.

    Args:
        layer: a `keras.layers.BatchNormalization` (or subclass) or `keras.layers.Identity`.

    Returns:
        NumPy float64 array of per-channel gains (one element ``[1.0]`` for an identity).
    """
    if isinstance(layer, GainCappedBatchNormalization):
        return layer.inference_gains()
    if isinstance(layer, keras.layers.BatchNormalization):
        variance = np.asarray(layer.moving_variance, dtype=np.float64)
        gamma = np.asarray(layer.gamma, dtype=np.float64) if layer.scale else np.ones_like(variance)
        return np.abs(gamma) / np.sqrt(variance + layer.epsilon)
    if isinstance(layer, keras.layers.Identity):
        return np.ones(1)
    raise ValueError(f"no inference gain known for layer {layer.name!r} of type {type(layer).__name__}")
