"""Generated datasets: Digitclutter and its debris variant as train / validation / test splits.

Digitclutter (Spoerer, McClure & Kriegeskorte 2017, Front. Psychol. 8:1551) and its
debris variant ``digitdebris`` (one digit among 10, 30 or 50 digit fragments) are
generated with fixed dataset seeds, independent of the training seed, so their test
sets are the same in every run (see `CLUTTER_SEEDS`, `DEBRIS_SEEDS`). With
``fresh_data`` their training set is drawn anew every epoch from a seed that is a
pure function of (training seed, epoch) (`fresh_train_seed`). A set written by
``iterconv data`` can stand in for the generator (`read_data_file`).
"""

import os

import numpy as np

from iterconv_keras.data.sources import CLUTTER_SIZES  # the default sizes (stdlib table, read by --help)

# Fixed seeds per split; the digit count is mixed in so n-digit sets are independent.
CLUTTER_SEEDS = {"train": 2017_1, "validation": 2017_2, "test": 2017_3}
# Debris sets use the same sizes and their own seeds, the fragment count mixed in.
DEBRIS_SEEDS = {"train": 2017_11, "validation": 2017_12, "test": 2017_13}
DEFAULT_DEBRIS_FRAGMENTS = 10
# Tags that keep the fresh-data seeds of the two generators apart (see `fresh_train_seed`).
_FRESH_TAGS = {"digitclutter": 2017_5, "digitdebris": 2017_15}


def clutter_seed(split, n_digits):
    """The fixed dataset seed of a Digitclutter split for n digits."""
    return CLUTTER_SEEDS[split] * 10 + int(n_digits)


def clutter_test_set(n_digits, count=CLUTTER_SIZES["test"], seed=None):
    """An n-digit Digitclutter test set, for occlusion evaluation across digit counts.

    Args:
        n_digits: int, 2..5 digits per image.
        count: int, number of images (default 5,000).
        seed: optional int; default is the fixed test seed of `clutter_seed`, the same
            set that `datasets.load("digitclutter", clutter_digits=n_digits)` uses as test.

    Returns:
        ``(images uint8 [N, 32, 32, 1], labels float32 [N, 10], info dict)``.
    """
    from iterconv_keras.data import digitclutter

    seed = clutter_seed("test", n_digits) if seed is None else seed
    clutter = digitclutter.generate(n_digits, count, seed)
    return clutter.images, clutter.labels, clutter.info


def debris_test_set(n_fragments, count=CLUTTER_SIZES["test"]):
    """A debris test set with n fragments, for evaluation across debris levels.

    The set that `datasets.load("digitdebris", debris_fragments=n_fragments)` uses as test
    (the fixed seed of `debris_seed`).

    Args:
        n_fragments: 10, 30 or 50.
        count: int, number of images (default 5,000).

    Returns:
        ``(images uint8 [N, 32, 32, 1], labels int64 [N], info dict)``.
    """
    from iterconv_keras.data import debris

    generated = debris.generate(n_fragments, count, debris_seed("test", n_fragments))
    return generated.images, generated.labels, generated.info


def fresh_train_seed(name, level, seed, epoch):
    """The generator seed of epoch ``epoch``'s training set when training on fresh data.

    A pure function of (dataset, digit or fragment count ``level``, training seed,
    epoch), so a resumed run sees exactly the images an uninterrupted one sees. Its top
    bit (2**63) is set, which no fixed split seed (`clutter_seed`, `debris_seed`) has,
    so no epoch reuses the stream of the validation or test images.

    Args:
        name: ``"digitclutter"`` or ``"digitdebris"``.
        level: digits per image (Digitclutter) or fragments per image (debris).
        seed: the training seed (>= 0).
        epoch: 0-based epoch number.

    Returns:
        int in [2**63, 2**64).
    """
    state = np.random.SeedSequence([_FRESH_TAGS[name], int(level), int(seed), int(epoch)]).generate_state(2)
    return (1 << 63) | ((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def _generated_sets(make, seed_of, train_size, validation_size, test_size, fresh_seed=None):
    """Generate train / validation / test with ``make(count, seed)`` at the fixed split seeds.

    With ``fresh_seed`` (a function of the epoch) the training set is epoch 0's.
    """
    sizes = {
        "train": CLUTTER_SIZES["train"] if train_size is None else train_size,
        "validation": CLUTTER_SIZES["validation"] if validation_size is None else validation_size,
        "test": CLUTTER_SIZES["test"] if test_size is None else test_size,
    }
    seeds = {split: seed_of(split) for split in sizes}
    if fresh_seed is not None:
        seeds["train"] = fresh_seed(0)
    sets = {split: make(count, seeds[split]) for split, count in sizes.items()}
    info = dict(sets["train"].info)
    info.pop("seed")
    info["seeds"] = seeds
    info["sizes"] = sizes
    if fresh_seed is not None:
        info["fresh_data"] = "training images drawn anew each epoch, seed datasets.fresh_train_seed(seed, epoch)"
    return sets, info


def _fresh_stream(blocks, count, fresh_seed):
    """``stream(epoch)``: epoch ``epoch``'s ``count`` training images, in stream blocks."""

    def stream(epoch):
        return blocks(count, fresh_seed(epoch))

    return stream


def _load_clutter(n_digits, train_size, validation_size, test_size, fresh_seed=None):
    from iterconv_keras.data import digitclutter

    if isinstance(n_digits, bool) or not isinstance(n_digits, (int, np.integer)) or not 2 <= n_digits <= 5:
        raise ValueError(f"clutter_digits must be an integer in 2..5, got {n_digits!r}")
    return _generated_sets(
        lambda count, seed: digitclutter.generate(n_digits, count, seed),
        lambda split: clutter_seed(split, n_digits), train_size, validation_size, test_size, fresh_seed,
    )


def debris_seed(split, n_fragments):
    """The fixed dataset seed of a debris split for n fragments."""
    return DEBRIS_SEEDS[split] * 100 + int(n_fragments)


def _load_debris(n_fragments, train_size, validation_size, test_size, fresh_seed=None):
    from iterconv_keras.data import debris

    debris.validate_fragments(n_fragments, "debris_fragments")
    return _generated_sets(
        lambda count, seed: debris.generate(n_fragments, count, seed),
        lambda split: debris_seed(split, n_fragments), train_size, validation_size, test_size, fresh_seed,
    )


def generate_splits(name, clutter_digits, debris_fragments, train_size, validation_size, test_size, fresh):
    """Arrays, classes, provenance and (with ``fresh``) the training stream of a generated dataset."""
    from iterconv_keras.data import debris, digitclutter

    level = clutter_digits if name == "digitclutter" else debris_fragments

    def epoch_seed(epoch):
        return fresh_train_seed(name, level, fresh["seed"], epoch)

    fresh_seed = epoch_seed if fresh else None
    if name == "digitclutter":
        sets, info = _load_clutter(clutter_digits, train_size, validation_size, test_size, fresh_seed)
        multi_label, source = True, f"generated: Digitclutter {clutter_digits} digits (seeds {info['seeds']})"

        def blocks(count, seed):
            return digitclutter.generate_blocks(clutter_digits, count, seed)
    else:
        sets, info = _load_debris(debris_fragments, train_size, validation_size, test_size, fresh_seed)
        multi_label = False
        source = f"generated: Digitclutter debris, 1 digit and {debris_fragments} fragments (seeds {info['seeds']})"

        def blocks(count, seed):
            return debris.generate_blocks(debris_fragments, count, seed)
    arrays = tuple(a for split in ("train", "validation", "test") for a in (sets[split].images, sets[split].labels))
    stream = _fresh_stream(blocks, info["sizes"]["train"], fresh_seed) if fresh else None
    return arrays, 10, multi_label, source, info, stream


def file_split_sizes(count, train_size=None, validation_size=None, test_size=None):
    """``{"test", "validation", "train"}`` image counts carved from a data file of ``count`` images.

    The test images come first, then validation, then train: generated sets are
    prefix-stable, so the test split of a file is the generator's first images
    for the file's seed. Defaults: test 20 % and validation 10 % of the file,
    train the rest.

    Raises:
        ValueError: the sizes need more images than the file holds, or leave no training image.
    """
    test = count // 5 if test_size is None else test_size
    validation = count // 10 if validation_size is None else validation_size
    rest = count - test - validation
    train = rest if train_size is None else train_size
    if test < 1 or train < 1 or train > rest:
        raise ValueError(
            f"a data file of {count} images cannot give {test} test, {validation} validation and "
            f"{train if train_size is not None else 'at least 1'} training images; pass smaller sizes or a larger file"
        )
    return {"test": test, "validation": validation, "train": train}


def read_data_file(name, data_file, level, train_size, validation_size, test_size):
    """Arrays, classes, provenance of a generated set read from ``data_file`` (see `datasets.load`)."""
    from iterconv_keras.data import setfile

    read = setfile.load_npz(data_file, dataset=name, level=level)
    sizes = file_split_sizes(len(read.images), train_size, validation_size, test_size)
    bounds = np.cumsum([0, sizes["test"], sizes["validation"], sizes["train"]])
    parts = [(read.images[a:b], read.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    (x_test, y_test), (x_val, y_val), (x_train, y_train) = parts
    info = {"data_file": os.path.abspath(data_file), "recipe": read.info, "sizes": sizes}
    source = f"file {data_file}: {name}, seed {read.info.get('seed')}"
    return (x_train, y_train, x_val, y_val, x_test, y_test), 10, name == "digitclutter", source, info

