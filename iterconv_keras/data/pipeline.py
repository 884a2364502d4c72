"""``tf.data`` input pipelines for training and evaluation.

Every training batch is a pure function of (seed, epoch, step), so a run resumed
at epoch e sees exactly the batches an uninterrupted run sees from epoch e on:

- a fixed training set is visited in a stateless shuffle seeded by (seed, epoch)
  (`training_batches`), optionally augmented by a random translation (zero padding
  and cropping) and a horizontal flip drawn statelessly from (seed, epoch, step),
  the CIFAR recipe (He et al. 2016, after Lee et al. 2015);
- a generated dataset with fresh data trains on new images every epoch
  (`fresh_training_batches`), drawn from ``DatasetSplits.train_stream(epoch)``,
  whose seed is a function of (seed, epoch) (`generated.fresh_train_seed`).

Images stay uint8 until they are batched and are scaled to [0, 1] per batch (the
model normalises inside), which keeps a 50k-image dataset at a quarter of the
float size and the per-step work to one gather and one cast.
"""

import numpy as np
import tensorflow as tf

# Batches the fresh-data pipeline keeps ready ahead of training: two 4,096-image
# stream blocks at batch 128. Making one block takes ~0.2 s on one core; the train
# step of the `small` variant takes ~3 s to consume it, so the buffer never drains.
FRESH_BUFFER_BATCHES = 64
# Folded into the (seed, epoch, step) key so augmentation draws never share a key
# with anything else seeded by (seed, epoch).
_AUGMENT_KEY = 0x61756721


def _scale(images):
    return tf.cast(images, tf.float32) * (1.0 / 255.0)


def steps_per_epoch(n, batch_size):
    """Full batches of ``batch_size`` in ``n`` training images, or ``ValueError`` when there are none."""
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} images)")
    return steps


def augmentation_draws(seed, epoch, step, batch, pad):
    """The random translation and flip of every image of one training batch.

    A pure function of (seed, epoch, step): stateless random numbers from a key
    folded from them, so a resumed run draws what an uninterrupted run draws.

    Args:
        seed, epoch, step: ints (or int tensors) naming the batch.
        batch: number of images.
        pad: translation range in pixels.

    Returns:
        ``(offsets, flips)``: int32 ``[batch, 2]`` top-left corner (row, column) of
        each crop in the padded image, uniform in ``0..2 * pad``; bool ``[batch]``,
        flip horizontally (probability 1/2).
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))
    key = tf.random.experimental.stateless_fold_in(key, _AUGMENT_KEY)
    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=tf.random.experimental.stateless_fold_in(key, 0), minval=0, maxval=2 * pad + 1,
        dtype=tf.int32,
    )
    flips = tf.random.stateless_uniform(
        [batch], seed=tf.random.experimental.stateless_fold_in(key, 1), minval=0, maxval=2, dtype=tf.int32
    )
    return offsets, tf.equal(flips, 1)


def augment(images, offsets, flips, pad):
    """Translate by zero padding and cropping, then flip horizontally where ``flips``.

    Args:
        images: ``[B, H, W, C]`` images (any dtype; padding is 0, black).
        offsets, flips: from `augmentation_draws`; offset ``pad`` is no shift.
        pad: pixels of padding on each side.

    Returns:
        ``[B, H, W, C]``: image i is ``pad(images[i])[r:r + H, c:c + W]`` with
        ``(r, c) = offsets[i]``, mirrored left-right when ``flips[i]``.
    """
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[None]
    cols = offsets[:, 1:] + tf.range(width)[None]
    cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    return tf.where(flips[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


def training_batches(x, y, *, batch_size, seed, initial_epoch, epochs, augment_pad=None):
    """Shuffled batches for epochs ``initial_epoch .. epochs - 1``, one after another.

    Args:
        x: uint8 images ``[N, H, W, C]``.
        y: labels ``[N]`` or ``[N, K]``.
        batch_size: images per batch; the last incomplete batch of an epoch is
            dropped so every step has the same shape (no retracing).
        seed: int, with the epoch number the seed of that epoch's permutation.
        initial_epoch: first epoch to produce (0 for a new run).
        epochs: one past the last epoch.
        augment_pad: None (no augmentation) or int > 0: translate every image by up
            to this many pixels and flip it horizontally with probability 1/2
            (`augmentation_draws`, `augment`).

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
        batches = tf.reshape(order[: steps * batch_size], [steps, batch_size])
        return tf.data.Dataset.from_tensor_slices(batches).enumerate().map(lambda step, idx: (epoch, step, idx))

    def load(epoch, step, idx):
        batch = tf.gather(images, idx)
        if augment_pad:
            batch = augment(batch, *augmentation_draws(seed, epoch, step, batch_size, augment_pad), augment_pad)
        return _scale(batch), tf.gather(labels, idx)

    dataset = (
        tf.data.Dataset.range(initial_epoch, epochs)
        .flat_map(epoch_batches)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset, steps


def rebatch(chunks, batch_size, steps):
    """Cut ``(images, labels)`` chunks of any sizes into ``steps`` batches of ``batch_size``.

    Yields the first ``steps * batch_size`` images in order, and stops drawing
    chunks as soon as it has them.
    """
    held_x = held_y = None
    produced = 0
    for x, y in chunks:
        held_x = x if held_x is None else np.concatenate([held_x, x])
        held_y = y if held_y is None else np.concatenate([held_y, y])
        while len(held_x) >= batch_size and produced < steps:
            yield held_x[:batch_size], held_y[:batch_size]
            held_x, held_y = held_x[batch_size:], held_y[batch_size:]
            produced += 1
        if produced == steps:
            return
    if produced < steps:
        raise ValueError(f"the stream ended after {produced} of {steps} batches")


def fresh_training_batches(stream, *, batch_size, steps, initial_epoch, epochs, image_shape, label_spec):
    """Batches of new images every epoch, made ahead of training in a tf.data thread.

    Args:
        stream: ``stream(epoch)`` yields that epoch's ``(images uint8, labels)``
            chunks (`datasets.DatasetSplits.train_stream`); epoch e's batches are its
            first ``steps * batch_size`` images, in order (they are independent
            draws, so there is nothing to shuffle).
        batch_size, steps: images per batch and batches per epoch.
        initial_epoch, epochs: the epochs to produce, ``initial_epoch .. epochs - 1``.
        image_shape: ``(H, W, C)``.
        label_spec: ``(shape per image, dtype)`` of the labels, e.g. ``((10,), tf.float32)``.

    Returns:
        a ``tf.data.Dataset`` of ``(images float32 in [0, 1], labels)``.
    """
    label_shape, label_dtype = label_spec

    def batches():
        for epoch in range(initial_epoch, epochs):
            yield from rebatch(stream(epoch), batch_size, steps)

    signature = (
        tf.TensorSpec([batch_size, *image_shape], tf.uint8),
        tf.TensorSpec([batch_size, *label_shape], label_dtype),
    )
    return (
        tf.data.Dataset.from_generator(batches, output_signature=signature)
        .prefetch(FRESH_BUFFER_BATCHES)  # the generator runs ahead in a background thread
        .map(lambda images, labels: (_scale(images), labels))
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluation_batches(x, y=None, *, batch_size=256, replicas=1):
    """Batches in the original order, scaled to [0, 1]; labels when given.

    Args:
        x, y: images and (optional) labels.
        batch_size: images per batch at most.
        replicas: replicas the batches are split over (a ``tf.distribute`` strategy's
            ``num_replicas_in_sync``). The batch size becomes a multiple of it: Keras
            learns its input shapes by reducing the first batch across replicas, and
            a first batch that does not split evenly fails there
            ("AddN must have the same size and shape"). Only the last batch may be
            uneven; every example is still evaluated once.

    Raises:
        ValueError: fewer examples than replicas.
    """
    n = len(x)
    batch_size = min(batch_size, n)
    batch_size -= batch_size % replicas
    if batch_size < 1:
        raise ValueError(f"{n} evaluation example(s) cannot be split over {replicas} replicas; "
                         f"use at least {replicas}")
    if y is None:
        dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch_size).map(_scale)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).map(
            lambda a, b: (_scale(a), b)
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
