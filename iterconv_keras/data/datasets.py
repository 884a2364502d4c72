"""Offline datasets: MNIST, Fashion-MNIST, CIFAR-10/100 from local files, and Digitclutter.

`load` is the one way in: it returns a dataset's train / validation / test arrays
(`DatasetSplits`) with a validation split carved deterministically from train and
per-channel statistics (`channel_stats`). Nothing is ever downloaded. The work is
done by the modules beside this one:

- `iterconv_keras.data.sources`: dataset names, the file-dataset table, where files
  are searched for, "how to get it" messages, `available` (standard library only);
- `iterconv_keras.data.readers`: one reader per file format (IDX, CIFAR pickles,
  keras ``.npz`` caches, prepared tensorflow-datasets);
- `iterconv_keras.data.generated`: Digitclutter and debris splits at fixed seeds,
  fresh training data per epoch, sets read from an ``iterconv data`` file.

Images stay uint8 ``[N, H, W, C]``; models normalise inside with ``mean``/``std``.
"""

import dataclasses

import numpy as np

from iterconv_keras.data import generated, readers, sources

# Names the documentation of 0.1 pointed users to, kept importable from here.
from iterconv_keras.data.generated import (  # noqa: F401
    DEBRIS_SEEDS,
    clutter_test_set,
    debris_test_set,
    fresh_train_seed,
)

# Validation carved from train for file datasets: 10 %, at most `sources.MAX_DEFAULT_VALIDATION`
# images, always the same images (this seed, not the training seed), so runs with different
# seeds are compared on one validation set and train on the same remaining images.
VALIDATION_SPLIT_SEED = 0
# Random translation for augmentation, in pixels of padding on each side: the CIFAR
# recipe's 4 px at 32x32; 3 px at 28x28 for Fashion-MNIST, whose items are scaled to
# fill the frame (two thirds touch the top or bottom edge), so a shift cuts the object
# itself rather than background (a full 3 px shift cuts 6.8 % of an item's ink on
# average, 4 px 10 %). Datasets not listed are never augmented (horizontal flips
# change digits).
AUGMENT_PADS = {"fashion_mnist": 3, "cifar10": 4, "cifar100": 4}
# Test subsamples use this seed, never the training seed, so they match across runs.
TEST_SUBSAMPLE_SEED = 0


@dataclasses.dataclass
class DatasetSplits:
    """Train / validation / test arrays of one dataset, plus normalisation statistics.

    Attributes:
        name: dataset name (one of `sources.DATASET_NAMES`).
        x_train, x_val, x_test: uint8 ``[N, H, W, C]`` images (validation may be empty).
        y_train, y_val, y_test: int64 ``[N]`` class ids, or float32 ``[N, K]`` multi-hot
            when ``multi_label``.
        num_classes: number of classes K.
        multi_label: True for Digitclutter (sigmoid outputs, exact-set accuracy);
            False for the debris variant (one target digit, softmax).
        mean, std: per-channel statistics of ``x_train`` in [0, 1] units.
        source: where the data came from, or how they were generated.
        info: extra provenance (font and seeds for generated sets, file format ...).
        train_stream: None for a fixed training set; with fresh data, a callable
            ``train_stream(epoch)`` that yields epoch ``epoch``'s training set as
            ``(images, labels)`` chunks (``x_train`` then holds epoch 0's images).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    multi_label: bool
    mean: tuple
    std: tuple
    source: str
    info: dict
    train_stream: object = None

    @property
    def input_shape(self):
        """``(H, W, C)`` of the images."""
        return tuple(int(d) for d in self.x_train.shape[1:])


# --------------------------------------------------------------------------- splits


def _check_size(label, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{label} must be a non-negative integer or None, got {value!r}")
    return int(value)


def _split_train(x, y, train_size, validation_size, seed):
    """Carve a validation split from train by `VALIDATION_SPLIT_SEED`, then subsample the rest by ``seed``.

    ``train_size`` None keeps the whole rest: the training split minus validation.
    """
    n = x.shape[0]
    if validation_size is None:
        validation_size = min(sources.MAX_DEFAULT_VALIDATION, n // 10)
    if validation_size > n:
        raise ValueError(f"validation_size must be at most the {n} training images, got {validation_size}")
    rest = n - validation_size
    if train_size is not None and train_size > rest:
        raise ValueError(
            f"train_size must be at most {rest} (train images left after {validation_size} for validation), "
            f"got {train_size}"
        )
    order = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(n)
    val = np.sort(order[:validation_size])
    train = order[validation_size:]
    if train_size is not None:
        train = train[np.random.default_rng(seed).permutation(rest)[:train_size]]
    train = np.sort(train)
    return x[train], y[train], x[val], y[val]


def _subsample_test(x, y, test_size):
    if test_size is None:
        return x, y
    if test_size > x.shape[0]:
        raise ValueError(f"test_size must be at most the {x.shape[0]} test images, got {test_size}")
    keep = np.sort(np.random.default_rng(TEST_SUBSAMPLE_SEED).permutation(x.shape[0])[:test_size])
    return x[keep], y[keep]


def channel_stats(x, chunk=8192):
    """Per-channel mean and std of uint8 images in [0, 1] units, exact integer sums."""
    channels = x.shape[-1]
    total = np.zeros(channels, np.int64)
    squares = np.zeros(channels, np.int64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].reshape(-1, channels).astype(np.int64)
        total += part.sum(axis=0)
        squares += (part * part).sum(axis=0)
    count = max(1, x.size // channels)
    mean = total / count
    var = np.maximum(squares / count - mean**2, 0.0)
    return tuple(float(m / 255.0) for m in mean), tuple(float(np.sqrt(v) / 255.0) for v in var)


def load(
    name,
    *,
    data_dir=None,
    train_size=None,
    validation_size=None,
    test_size=None,
    seed=0,
    clutter_digits=3,
    debris_fragments=generated.DEFAULT_DEBRIS_FRAGMENTS,
    fresh_data=False,
    data_file=None,
):
    """Load a dataset offline, with a validation split carved deterministically from train.

    Args:
        name: one of `sources.DATASET_NAMES`.
        data_dir: optional folder searched first (then ``$ITERCONV_DATA_DIR``, then
            ``~/.keras/datasets``, ``~/tensorflow_datasets``, ``/usr/share/datasets``).
        train_size: optional number of training images (a subsample by ``seed``; for
            generated sets the number generated, default 20,000).
        validation_size: validation images; default 10 % of train capped at 5,000 for
            file datasets, 2,000 for generated sets.
        test_size: optional test subsample (fixed seed, comparable across runs); for
            generated sets the number generated, default 5,000.
        seed: int, chooses the train subsample of file datasets (the validation split
            is always the same, `VALIDATION_SPLIT_SEED`). Generated sets use it only
            with ``fresh_data``: otherwise their data come from fixed seeds
            (`generated.CLUTTER_SEEDS`, `generated.DEBRIS_SEEDS`).
        clutter_digits: digits per Digitclutter image, 2..5 (default 3).
        debris_fragments: fragments per ``digitdebris`` image, 10, 30 or 50 (default 10).
        fresh_data: bool, generated sets only: draw ``train_size`` new training images
            every epoch from `generated.fresh_train_seed` (seed, epoch); ``x_train`` holds epoch
            0's and ``train_stream(epoch)`` yields any epoch's. Default False.
        data_file: generated sets only: a file written by ``iterconv data`` (see
            `iterconv_keras.data.setfile`) to read instead of generating. Its first
            ``test_size`` images are the test split, the next ``validation_size`` the
            validation split, then ``train_size`` training images (`generated.file_split_sizes`).
            The file must hold ``name``'s set with ``clutter_digits`` digits or
            ``debris_fragments`` fragments.

    Returns:
        `DatasetSplits`.

    Raises:
        ValueError: unknown name, bad sizes, or ``fresh_data`` for a file dataset.
        DatasetNotAvailable: files missing (the message lists every place looked and
            how to obtain them) or unreadable.
        IntegrityError: ``data_file`` is malformed.
        UsageError: ``data_file`` is intact but holds another set than ``name`` with
            ``clutter_digits`` digits or ``debris_fragments`` fragments.

    Reference for Digitclutter and its debris variant: Spoerer, McClure &
    Kriegeskorte (2017), Front. Psychol. 8:1551.
    """
    if name not in sources.DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sources.DATASET_NAMES)}")
    train_size = _check_size("train_size", train_size)
    validation_size = _check_size("validation_size", validation_size)
    test_size = _check_size("test_size", test_size)
    stream = None
    if fresh_data and name not in sources.GENERATED_NAMES:
        raise ValueError(f"fresh_data needs a generated dataset ({', '.join(sources.GENERATED_NAMES)}), got {name!r}")
    if data_file is not None:
        if name not in sources.GENERATED_NAMES or fresh_data:
            raise ValueError(f"data_file holds a generated set ({', '.join(sources.GENERATED_NAMES)}) and gives a "
                             f"fixed training set; got dataset {name!r}{' with fresh_data' if fresh_data else ''}")
        level = clutter_digits if name == "digitclutter" else debris_fragments
        arrays, num_classes, multi_label, source, info = generated.read_data_file(
            name, data_file, level, train_size, validation_size, test_size
        )
        x_train, y_train, x_val, y_val, x_test, y_test = arrays
    elif name in sources.GENERATED_NAMES:
        fresh = {"seed": _check_size("seed", seed)} if fresh_data else None
        arrays, num_classes, multi_label, source, info, stream = generated.generate_splits(
            name, clutter_digits, debris_fragments, train_size, validation_size, test_size, fresh
        )
        x_train, y_train, x_val, y_val, x_test, y_test = arrays
    else:
        (x_train, y_train, x_test, y_test), fmt, source = readers.read_file_dataset(name, data_dir)
        x_train, y_train, x_val, y_val = _split_train(x_train, y_train, train_size, validation_size, seed)
        x_test, y_test = _subsample_test(x_test, y_test, test_size)
        num_classes, multi_label = sources.FILE_DATASETS[name].num_classes, False
        info = {"format": fmt, "validation_split_seed": VALIDATION_SPLIT_SEED, "train_subsample_seed": int(seed),
                "test_subsample_seed": TEST_SUBSAMPLE_SEED}
    mean, std = channel_stats(x_train)
    return DatasetSplits(
        name, x_train, y_train, x_val, y_val, x_test, y_test, num_classes, multi_label, mean, std, source, info,
        stream,
    )

