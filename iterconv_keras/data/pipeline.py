"""``tf.data`` input pipelines for training and evaluation.

The training order is a pure function of (seed, epoch): each epoch's
permutation comes from a stateless shuffle seeded by both, so a run resumed at
epoch e sees exactly the batches an uninterrupted run sees from epoch e on.
Images stay uint8 in memory and are scaled to [0, 1] per batch (the model
normalises inside), which keeps a 50k-image dataset at a quarter of the float
size and the per-step work to one gather and one cast.
"""

import tensorflow as tf


def _scale(images):
    return tf.cast(images, tf.float32) * (1.0 / 255.0)


def steps_per_epoch(n, batch_size):
    """Full batches of ``batch_size`` in ``n`` training images, or ``ValueError`` when there are none."""
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} images)")
    return steps


def training_batches(x, y, *, batch_size, seed, initial_epoch, epochs):
    """Shuffled batches for epochs ``initial_epoch .. epochs - 1``, one after another.

    Args:
        x: uint8 images ``[N, H, W, C]``.
        y: labels ``[N]`` or ``[N, K]``.
        batch_size: images per batch; the last incomplete batch of an epoch is
            dropped so every step has the same shape (no retracing).
        seed: int, with the epoch number the seed of that epoch's permutation.
        initial_epoch: first epoch to produce (0 for a new run).
        epochs: one past the last epoch.

    Returns:
        ``(dataset, steps_per_epoch)``.
    """
    n = int(x.shape[0])
    steps = steps_per_epoch(n, batch_size)
    images = tf.constant(x)
    labels = tf.constant(y)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order[: steps * batch_size]).batch(batch_size)

    dataset = (
        tf.data.Dataset.range(initial_epoch, epochs)
        .flat_map(epoch_batches)
        .map(lambda idx: (_scale(tf.gather(images, idx)), tf.gather(labels, idx)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset, steps


def evaluation_batches(x, y=None, *, batch_size=256):
    """Batches in the original order, scaled to [0, 1]; labels when given."""
    if y is None:
        dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch_size).map(_scale)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).map(
            lambda a, b: (_scale(a), b)
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
