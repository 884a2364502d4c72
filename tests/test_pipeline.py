"""Training input pipelines: fresh generated data every epoch, augmentation, resume."""

import numpy as np
import pytest
import tensorflow as tf

from iterconv_keras.data import datasets, debris, digitclutter, generated, pipeline


def _bytes(images):
    """The uint8 images a batch scaled to [0, 1] was made from."""
    return np.rint(np.asarray(images) * 255).astype(np.uint8)


def _epochs(dataset, steps, epochs):
    """Split a multi-epoch dataset into per-epoch (uint8 images, labels) arrays."""
    batches = [(_bytes(x), np.asarray(y)) for x, y in dataset]
    assert len(batches) == steps * epochs
    return [
        (np.concatenate([x for x, _ in batches[e * steps:(e + 1) * steps]]),
         np.concatenate([y for _, y in batches[e * steps:(e + 1) * steps]]))
        for e in range(epochs)
    ]


# -- fresh data --------------------------------------------------------------------------


def test_fresh_seed_is_a_pure_function_apart_from_every_fixed_split_seed():
    seed = generated.fresh_train_seed
    assert seed("digitclutter", 3, 5, 2) == seed("digitclutter", 3, 5, 2)
    variants = {seed("digitclutter", 3, 5, 2), seed("digitclutter", 3, 5, 3), seed("digitclutter", 3, 6, 2),
                seed("digitclutter", 4, 5, 2), seed("digitdebris", 3, 5, 2)}
    assert len(variants) == 5
    fixed = {generated.clutter_seed(split, n) for split in generated.CLUTTER_SEEDS for n in range(2, 6)}
    fixed |= {generated.debris_seed(split, n) for split in generated.DEBRIS_SEEDS for n in debris.FRAGMENT_COUNTS}
    fresh = {seed(name, level, s, e) for name, level in (("digitclutter", 3), ("digitdebris", 10))
             for s in range(3) for e in range(20)}
    assert len(fresh) == 120 and not fresh & fixed
    assert all(2**63 <= value < 2**64 for value in fresh)


def _fresh_run(name, level, seed, train_size, batch_size, initial_epoch, epochs):
    kwargs = {"clutter_digits": level} if name == "digitclutter" else {"debris_fragments": level}
    splits = datasets.load(name, train_size=train_size, validation_size=20, test_size=20, seed=seed,
                           fresh_data=True, **kwargs)
    steps = pipeline.steps_per_epoch(train_size, batch_size)
    dataset = pipeline.fresh_training_batches(
        splits.train_stream, batch_size=batch_size, steps=steps, initial_epoch=initial_epoch, epochs=epochs,
        image_shape=splits.input_shape, label_spec=(splits.y_train.shape[1:], tf.as_dtype(splits.y_train.dtype)),
    )
    return splits, _epochs(dataset, steps, epochs - initial_epoch)


def test_fresh_epochs_are_the_generator_output_for_the_derived_seed():
    # 4,200 images span two 4,096-image stream blocks, and 100 does not divide 4,096:
    # a batch straddles the block boundary (the dropped tail is tested below).
    splits, epochs = _fresh_run("digitclutter", 3, 7, 4200, 100, 0, 2)
    for epoch, (x, y) in enumerate(epochs):
        expected = digitclutter.generate(3, 4200, generated.fresh_train_seed("digitclutter", 3, 7, epoch))
        np.testing.assert_array_equal(x, expected.images)
        np.testing.assert_array_equal(y, expected.labels)
    # x_train (its statistics normalise the model's input) is epoch 0's set.
    np.testing.assert_array_equal(splits.x_train, epochs[0][0])
    # Two epochs are different images, and neither is the fixed training or validation set.
    assert (epochs[0][0] != epochs[1][0]).any(axis=(1, 2, 3)).mean() > 0.99
    fixed = datasets.load("digitclutter", train_size=100, validation_size=20, test_size=20)
    assert not np.array_equal(fixed.x_train[:100], splits.x_train[:100])
    np.testing.assert_array_equal(fixed.x_val, splits.x_val)  # validation stays the fixed set


def test_fresh_debris_epochs_and_the_dropped_tail():
    _, epochs = _fresh_run("digitdebris", 10, 2, 250, 64, 1, 3)  # 3 batches, 58 images dropped
    for epoch, (x, y) in zip((1, 2), epochs, strict=True):
        expected = debris.generate(10, 250, generated.fresh_train_seed("digitdebris", 10, 2, epoch))
        np.testing.assert_array_equal(x, expected.images[:192])
        np.testing.assert_array_equal(y, expected.labels[:192])
        assert y.dtype == np.int64


def test_fresh_resume_sees_what_an_uninterrupted_run_sees():
    _, whole = _fresh_run("digitclutter", 3, 1, 300, 64, 0, 3)
    _, resumed = _fresh_run("digitclutter", 3, 1, 300, 64, 2, 3)
    np.testing.assert_array_equal(resumed[0][0], whole[2][0])
    np.testing.assert_array_equal(resumed[0][1], whole[2][1])


def test_fresh_data_is_refused_for_file_datasets(tmp_path):
    with pytest.raises(ValueError, match="fresh_data needs a generated dataset.*got 'mnist'"):
        datasets.load("mnist", data_dir=tmp_path, fresh_data=True)


def test_rebatch_cuts_chunks_of_any_size_in_order():
    x = np.arange(17)[:, None]
    chunks = [(x[:5], x[:5, 0]), (x[5:8], x[5:8, 0]), (x[8:], x[8:, 0])]
    batches = list(pipeline.rebatch(iter(chunks), 4, 4))
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches])[:, 0], np.arange(16))
    assert [len(b) for b, _ in batches] == [4] * 4
    # Stops drawing chunks once it has its batches.
    drawn = []

    def counting():
        for chunk in chunks:
            drawn.append(len(chunk[0]))
            yield chunk

    assert len(list(pipeline.rebatch(counting(), 2, 2))) == 2 and drawn == [5]
    with pytest.raises(ValueError, match="ended after 4 of 5 batches"):
        list(pipeline.rebatch(iter(chunks), 4, 5))


# -- augmentation --------------------------------------------------------------------------


def _numpy_augment(images, offsets, flips, pad):
    """Independent oracle: pad with zeros, crop at the offsets, then mirror."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offsets)])
    out[flips] = out[flips][:, :, ::-1]
    return out


def test_augmentation_draws_are_deterministic_seeded_and_cover_the_range():
    offsets, flips = (np.asarray(a) for a in pipeline.augmentation_draws(3, 1, 7, 4096, 3))
    again = [np.asarray(a) for a in pipeline.augmentation_draws(3, 1, 7, 4096, 3)]
    np.testing.assert_array_equal(offsets, again[0])
    np.testing.assert_array_equal(flips, again[1])
    assert set(np.unique(offsets)) == set(range(7))  # 0..2 * pad: shifts of -3..3 pixels
    assert abs(flips.mean() - 0.5) < 0.05 and abs(offsets.mean() - 3) < 0.2
    for other in ((4, 1, 7), (3, 2, 7), (3, 1, 8)):
        moved = np.asarray(pipeline.augmentation_draws(*other, 4096, 3)[0])
        assert (moved != offsets).mean() > 0.5


def test_augment_is_a_translated_and_flipped_copy():
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    offsets, flips = (np.asarray(a) for a in pipeline.augmentation_draws(11, 0, 0, 64, 3))
    assert flips.any() and not flips.all() and (offsets != 3).any()
    out = np.asarray(pipeline.augment(tf.constant(images), offsets, flips, 3))
    np.testing.assert_array_equal(out, _numpy_augment(images, offsets, flips, 3))
    # Offset (pad, pad) without a flip is the identity.
    same = pipeline.augment(tf.constant(images[:2]), tf.fill([2, 2], 3), tf.constant([False, False]), 3)
    np.testing.assert_array_equal(np.asarray(same), images[:2])


def test_augmented_training_batches_match_the_numpy_recipe_and_resume():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 200).astype(np.int64)
    common = {"batch_size": 32, "seed": 4, "epochs": 2}
    plain, steps = pipeline.training_batches(x, y, initial_epoch=0, **common)
    augmented, _ = pipeline.training_batches(x, y, initial_epoch=0, augment_pad=4, **common)
    resumed, _ = pipeline.training_batches(x, y, initial_epoch=1, augment_pad=4, **common)
    plain, augmented, resumed = list(plain), list(augmented), list(resumed)
    assert len(augmented) == 2 * steps
    for index, ((px, py), (ax, ay)) in enumerate(zip(plain, augmented, strict=True)):
        epoch, step = divmod(index, steps)
        offsets, flips = (np.asarray(a) for a in pipeline.augmentation_draws(4, epoch, step, 32, 4))
        source = _bytes(px)  # the images in the order without augmentation
        np.testing.assert_array_equal(_bytes(ax), _numpy_augment(source, offsets, flips, 4))
        np.testing.assert_array_equal(np.asarray(ay), np.asarray(py))
    for (rx, _), (ax, _) in zip(resumed, augmented[steps:], strict=True):
        np.testing.assert_array_equal(np.asarray(rx), np.asarray(ax))
