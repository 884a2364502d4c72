"""Batch normalisation computed by TensorFlow's fused kernel.

Keras 3 implements `keras.layers.BatchNormalization` on the TensorFlow backend
with separate ops (``tf.nn.moments`` and ``tf.nn.batch_normalization``): about
ten passes over each feature map forward and backward. ``FusedBatchNormV3`` does
the same in one op each way, and oneDNN has a kernel for it; on the ``small``
variant this made a whole training step faster (``docs/performance.md``). The
function is the same (batch statistics in training with Keras' biased variance
for the moving average, moving statistics at inference); only rounding differs.
"""

import keras
import tensorflow as tf


# The class is deliberately named BatchNormalization: Keras' .keras format stores
# the weights of layers held in lists under the snake-cased class name
# ("layers/batch_normalization"), so the name keeps files saved with Keras' own
# layer loadable (tests/test_normalization.py). It is registered as
# "iterconv>FusedBatchNormalization".
@keras.saving.register_keras_serializable(package="iterconv", name="FusedBatchNormalization")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` through ``tf.raw_ops.FusedBatchNormV3``.

    Takes the fused path for float32 NHWC feature maps (rank 4, ``axis=-1``)
    without mask, renorm or cross-replica synchronisation; anything else falls
    back to Keras' own implementation, so the layer accepts every
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
            and inputs.dtype == tf.float32
            and self.compute_dtype == "float32"
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
