"""Offline datasets: MNIST, Fashion-MNIST, CIFAR-10/100 from local files, and Digitclutter.

Nothing is ever downloaded. File datasets are read from standard formats (IDX
``*-ubyte[.gz]`` for the MNIST family, the CIFAR python pickle batches, keras ``.npz``
caches, prepared tensorflow-datasets directories), searched for in: the explicit
``data_dir``, ``$ITERCONV_DATA_DIR``, ``~/.keras/datasets``, ``~/tensorflow_datasets``
and ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` installs there). A
missing dataset raises `DatasetNotAvailable` (exit code 3) with every place looked
and how to get the files; an unreadable file raises it too, naming the file.

Digitclutter (Spoerer, McClure & Kriegeskorte 2017, Front. Psychol. 8:1551) and its
debris variant ``digitdebris`` (one digit among 10, 30 or 50 digit fragments) are
generated with fixed dataset seeds, independent of the training seed, so their test
sets are the same in every run (see `CLUTTER_SEEDS`, `DEBRIS_SEEDS`). With
``fresh_data`` their training set is drawn anew every epoch from a seed that is a
pure function of (training seed, epoch) (`fresh_train_seed`).

Images stay uint8 ``[N, H, W, C]``; models normalise inside with ``mean``/``std``.
"""

import dataclasses
import gzip
import os
import pickle

import numpy as np

from iterconv_keras import errors

DATASET_NAMES = ("digitclutter", "digitdebris", "mnist", "fashion_mnist", "cifar10", "cifar100")
GENERATED_NAMES = ("digitclutter", "digitdebris")
ENV_VAR = "ITERCONV_DATA_DIR"
# Default Digitclutter sizes: generated in about a second, large enough for the small
# models to learn (the original used about 100k train / 10k test).
CLUTTER_SIZES = {"train": 20_000, "validation": 2_000, "test": 5_000}
# Fixed seeds per split; the digit count is mixed in so n-digit sets are independent.
CLUTTER_SEEDS = {"train": 2017_1, "validation": 2017_2, "test": 2017_3}
# Debris sets use the same sizes and their own seeds, the fragment count mixed in.
DEBRIS_SEEDS = {"train": 2017_11, "validation": 2017_12, "test": 2017_13}
DEFAULT_DEBRIS_FRAGMENTS = 10
# Validation carved from train for file datasets: 10 %, at most this many images,
# always the same images (this seed, not the training seed), so runs with different
# seeds are compared on one validation set and train on the same remaining images.
MAX_DEFAULT_VALIDATION = 5_000
VALIDATION_SPLIT_SEED = 0
# Tags that keep the fresh-data seeds of the two generators apart (see `fresh_train_seed`).
_FRESH_TAGS = {"digitclutter": 2017_5, "digitdebris": 2017_15}
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
        name: dataset name (one of `DATASET_NAMES`).
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


@dataclasses.dataclass(frozen=True)
class _FileDataset:
    name: str
    shape: tuple  # (H, W, C)
    num_classes: int
    folders: tuple  # sub-folders (of a search root) that may hold the files
    tfds_name: str
    how_to_get: str


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)
_FILE_DATASETS = {
    "mnist": _FileDataset(
        "mnist",
        (28, 28, 1),
        10,
        ("mnist", "MNIST/raw"),
        "mnist",
        f"put the IDX files ({_MNIST_FILES}, from http://yann.lecun.com/exdb/mnist/ or the mirror "
        "https://storage.googleapis.com/cvdf-datasets/mnist/) or keras' mnist.npz "
        "(https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz) in --data-dir, "
        "or prepare it with `tfds build mnist --data_dir DIR` on a machine with internet",
    ),
    "fashion_mnist": _FileDataset(
        "fashion_mnist",
        (28, 28, 1),
        10,
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        "fashion_mnist",
        "on Debian/Ubuntu `apt install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
        f"or put the IDX files ({_MNIST_FILES}, from https://github.com/zalandoresearch/fashion-mnist) "
        "in --data-dir or DIR/fashion-mnist",
    ),
    "cifar10": _FileDataset(
        "cifar10",
        (32, 32, 3),
        10,
        ("cifar-10-batches-py",),
        "cifar10",
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into --data-dir "
        "(it creates cifar-10-batches-py/), or prepare it with `tfds build cifar10 --data_dir DIR`",
    ),
    "cifar100": _FileDataset(
        "cifar100",
        (32, 32, 3),
        100,
        ("cifar-100-python",),
        "cifar100",
        "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into --data-dir "
        "(it creates cifar-100-python/), or prepare it with `tfds build cifar100 --data_dir DIR`",
    ),
}


def _user_roots(data_dir=None):
    roots = []
    if data_dir:
        roots.append(os.fspath(data_dir))
    if os.environ.get(ENV_VAR):
        roots.append(os.environ[ENV_VAR])
    return roots


def search_roots(data_dir=None):
    """Folders searched, in order: ``data_dir``, ``$ITERCONV_DATA_DIR``, usual places."""
    roots = _user_roots(data_dir) + [
        os.path.expanduser("~/.keras/datasets"),
        os.path.expanduser("~/tensorflow_datasets"),
        "/usr/share/datasets",
    ]
    unique = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


# --------------------------------------------------------------------------- locate


def _idx_path(folder, stem):
    # MNIST's own names use hyphens; some mirrors write "train-images.idx3-ubyte".
    for name in (f"{stem}.gz", stem, f"{stem.replace('-idx', '.idx')}.gz", stem.replace("-idx", ".idx")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _find_idx(folder):
    stems = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    paths = {key: _idx_path(folder, stem) for key, stem in stems.items()}
    return paths if all(paths.values()) else None


def _find_cifar(folder, name):
    files = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    if name == "cifar100":
        files = ["train", "test"]
    paths = [os.path.join(folder, f) for f in files]
    return paths if all(os.path.isfile(p) for p in paths) else None


def _tfds_prepared(root, tfds_name):
    if not os.path.isdir(os.path.join(root, tfds_name)):
        return False  # cheap check first: importing tensorflow_datasets takes seconds
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(tfds_name, data_dir=root).is_prepared()
    except Exception:  # noqa: BLE001 - an unreadable builder dir is simply "not prepared"
        return False


def _locate(name, data_dir=None):
    """Find a file dataset: ``(format, location)`` or ``(None, places looked)``."""
    spec = _FILE_DATASETS[name]
    looked = []
    user_roots = _user_roots(data_dir)
    for root in search_roots(data_dir):
        # MNIST and Fashion-MNIST share file names, so loose IDX files at the top of
        # a folder count only where the user pointed us, never in the usual places.
        folders = ("",) + spec.folders if root in user_roots and name not in ("cifar10", "cifar100") else spec.folders
        for sub in folders:
            folder = os.path.join(root, sub) if sub else root
            looked.append(folder)
            if name in ("cifar10", "cifar100"):
                found = _find_cifar(folder, name)
                if found:
                    return "cifar-pickle", found
            else:
                found = _find_idx(folder)
                if found:
                    return "idx", found
        for npz in (f"{name}.npz", f"{name.replace('_', '-')}.npz"):
            path = os.path.join(root, npz)
            looked.append(path)
            if os.path.isfile(path):
                return "npz", path
        looked.append(os.path.join(root, spec.tfds_name) + " (tensorflow-datasets)")
        if _tfds_prepared(root, spec.tfds_name):
            return "tfds", root
    return None, looked


def _not_available(name, looked):
    places = "; ".join(dict.fromkeys(looked))
    return errors.DatasetNotAvailable(
        f"dataset {name!r} not found (nothing is downloaded). Looked in: {places}. "
        f"To get it: {_FILE_DATASETS[name].how_to_get}; or point --data-dir / ${ENV_VAR} at the folder."
    )


# --------------------------------------------------------------------------- readers


def _read_bytes(path):
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        with open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise errors.DatasetNotAvailable(
            f"cannot read {path}: {exc} (truncated or corrupt; re-obtain the file)"
        ) from exc


def read_idx(path):
    """Read an IDX file (``.gz`` or raw) of unsigned bytes into an array.

    Args:
        path: file path.

    Raises:
        DatasetNotAvailable: bad magic number, unsupported type, or a size that does
            not match the header (truncated or padded file).
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise errors.DatasetNotAvailable(f"{path} is not an IDX file (bad magic number {data[:4].hex()!r})")
    if data[2] != 0x08:
        raise errors.DatasetNotAvailable(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise errors.DatasetNotAvailable(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise errors.DatasetNotAvailable(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file has "
            f"{len(data) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, lists and dicts.

    The CIFAR batches are pickles; refusing every other global keeps a tampered
    file from running code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path, label_key):
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise errors.DatasetNotAvailable(f"cannot read CIFAR batch {path}: {exc} (truncated or corrupt)") from exc
    if not isinstance(batch, dict):
        raise errors.DatasetNotAvailable(f"{path}: not a CIFAR batch (a {type(batch).__name__}, expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise errors.DatasetNotAvailable(f"{path}: CIFAR batch lacks 'data' or {label_key!r} (keys {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise errors.DatasetNotAvailable(
            f"{path}: CIFAR data has shape {data.shape} {data.dtype}, expected [N, 3072] uint8"
        )
    if labels.shape != (data.shape[0],):
        raise errors.DatasetNotAvailable(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images"
        )
    # Rows are channel-major 3x32x32 planes.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _load_cifar(paths, name):
    label_key = "fine_labels" if name == "cifar100" else "labels"
    parts = [_read_cifar_batch(p, label_key) for p in paths]
    train, test = parts[:-1], parts[-1]
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test[0],
        test[1],
    )


def _load_idx(paths):
    return tuple(read_idx(paths[k]) for k in ("x_train", "y_train", "x_test", "y_test"))


def _load_npz(path):
    import zipfile

    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        # numpy would suggest allow_pickle=True for a non-zip file: never what is meant here.
        raise errors.DatasetNotAvailable(f"cannot read {path}: not a .npz (zip) archive (truncated or corrupt)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise errors.DatasetNotAvailable(f"{path}: missing arrays {sorted(missing)} (has {archive.files})")
            return tuple(archive[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except errors.DatasetNotAvailable:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors come in many types
        raise errors.DatasetNotAvailable(f"cannot read {path}: {exc} (truncated or corrupt)") from exc


def load_tfds_arrays(tfds_name, data_dir):
    """Read a prepared tensorflow-datasets dataset into numpy (never downloads)."""
    import tensorflow_datasets as tfds

    arrays = []
    for split in ("train", "test"):
        dataset = tfds.load(tfds_name, split=split, data_dir=data_dir, download=False)
        # Batched iteration rather than batch_size=-1: the latter aborted TensorFlow
        # 2.21 with std::length_error on generator-backed datasets here.
        images, labels = [], []
        for batch in tfds.as_numpy(dataset.batch(8192)):
            images.append(np.asarray(batch["image"]))
            labels.append(np.asarray(batch["label"]))
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return tuple(arrays)


def _checked(name, arrays, where):
    spec = _FILE_DATASETS[name]
    x_train, y_train, x_test, y_test = arrays
    out = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = np.asarray(x)
        if x.ndim == 3 and spec.shape[2] == 1:
            x = x[..., None]
        if x.dtype != np.uint8 or x.shape[1:] != spec.shape:
            raise errors.DatasetNotAvailable(
                f"{where}: {split} images have shape {x.shape} {x.dtype}, "
                f"expected [N, {', '.join(map(str, spec.shape))}] uint8"
            )
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise errors.DatasetNotAvailable(f"{where}: {y.shape[0]} {split} labels for {x.shape[0]} images")
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise errors.DatasetNotAvailable(
                f"{where}: {split} labels outside 0..{spec.num_classes - 1} (min {y.min()}, max {y.max()})"
            )
        out += [x, y]
    return tuple(out)


def _load_file_dataset(name, data_dir):
    fmt, where = _locate(name, data_dir)
    if fmt is None:
        raise _not_available(name, where)
    if fmt == "idx":
        arrays, source = _load_idx(where), os.path.dirname(where["x_train"])
    elif fmt == "cifar-pickle":
        arrays, source = _load_cifar(where, name), os.path.dirname(where[0])
    elif fmt == "npz":
        arrays, source = _load_npz(where), where
    else:
        arrays, source = load_tfds_arrays(_FILE_DATASETS[name].tfds_name, where), where
    return _checked(name, arrays, source), fmt, source


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
        validation_size = min(MAX_DEFAULT_VALIDATION, n // 10)
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


# --------------------------------------------------------------------------- clutter


def clutter_seed(split, n_digits):
    """The fixed dataset seed of a Digitclutter split for n digits."""
    return CLUTTER_SEEDS[split] * 10 + int(n_digits)


def clutter_test_set(n_digits, count=CLUTTER_SIZES["test"], seed=None):
    """An n-digit Digitclutter test set, for occlusion evaluation across digit counts.

    Args:
        n_digits: int, 2..5 digits per image.
        count: int, number of images (default 5,000).
        seed: optional int; default is the fixed test seed of `clutter_seed`, the same
            set that `load("digitclutter", clutter_digits=n_digits)` uses as test.

    Returns:
        ``(images uint8 [N, 32, 32, 1], labels float32 [N, 10], info dict)``.
    """
    from iterconv_keras.data import digitclutter

    seed = clutter_seed("test", n_digits) if seed is None else seed
    clutter = digitclutter.generate(n_digits, count, seed)
    return clutter.images, clutter.labels, clutter.info


def debris_test_set(n_fragments, count=CLUTTER_SIZES["test"]):
    """A debris test set with n fragments, for evaluation across debris levels.

    The set that `load("digitdebris", debris_fragments=n_fragments)` uses as test
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


def _generated(name, clutter_digits, debris_fragments, train_size, validation_size, test_size, fresh):
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


def _from_file(name, data_file, level, train_size, validation_size, test_size):
    """Arrays, classes, provenance of a generated set read from ``data_file`` (see `load`)."""
    from iterconv_keras.data import setfile

    read = setfile.load_npz(data_file, dataset=name, level=level)
    sizes = file_split_sizes(len(read.images), train_size, validation_size, test_size)
    bounds = np.cumsum([0, sizes["test"], sizes["validation"], sizes["train"]])
    parts = [(read.images[a:b], read.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    (x_test, y_test), (x_val, y_val), (x_train, y_train) = parts
    info = {"data_file": os.path.abspath(data_file), "recipe": read.info, "sizes": sizes}
    source = f"file {data_file}: {name}, seed {read.info.get('seed')}"
    return (x_train, y_train, x_val, y_val, x_test, y_test), 10, name == "digitclutter", source, info


def load(
    name,
    *,
    data_dir=None,
    train_size=None,
    validation_size=None,
    test_size=None,
    seed=0,
    clutter_digits=3,
    debris_fragments=DEFAULT_DEBRIS_FRAGMENTS,
    fresh_data=False,
    data_file=None,
):
    """Load a dataset offline, with a validation split carved deterministically from train.

    Args:
        name: one of `DATASET_NAMES`.
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
            (`CLUTTER_SEEDS`, `DEBRIS_SEEDS`).
        clutter_digits: digits per Digitclutter image, 2..5 (default 3).
        debris_fragments: fragments per ``digitdebris`` image, 10, 30 or 50 (default 10).
        fresh_data: bool, generated sets only: draw ``train_size`` new training images
            every epoch from `fresh_train_seed` (seed, epoch); ``x_train`` holds epoch
            0's and ``train_stream(epoch)`` yields any epoch's. Default False.
        data_file: generated sets only: a file written by ``iterconv data`` (see
            `iterconv_keras.data.setfile`) to read instead of generating. Its first
            ``test_size`` images are the test split, the next ``validation_size`` the
            validation split, then ``train_size`` training images (`file_split_sizes`).
            The file must hold ``name``'s set with ``clutter_digits`` digits or
            ``debris_fragments`` fragments.

    Returns:
        `DatasetSplits`.

    Raises:
        ValueError: unknown name, bad sizes, or ``fresh_data`` for a file dataset.
        DatasetNotAvailable: files missing (the message lists every place looked and
            how to obtain them) or unreadable.
        IntegrityError: ``data_file`` is malformed or holds another set.

    Reference for Digitclutter and its debris variant: Spoerer, McClure &
    Kriegeskorte (2017), Front. Psychol. 8:1551.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    train_size = _check_size("train_size", train_size)
    validation_size = _check_size("validation_size", validation_size)
    test_size = _check_size("test_size", test_size)
    stream = None
    if fresh_data and name not in GENERATED_NAMES:
        raise ValueError(f"fresh_data needs a generated dataset ({', '.join(GENERATED_NAMES)}), got {name!r}")
    if data_file is not None:
        if name not in GENERATED_NAMES or fresh_data:
            raise ValueError(f"data_file holds a generated set ({', '.join(GENERATED_NAMES)}) and gives a fixed "
                             f"training set; got dataset {name!r}{' with fresh_data' if fresh_data else ''}")
        level = clutter_digits if name == "digitclutter" else debris_fragments
        arrays, num_classes, multi_label, source, info = _from_file(
            name, data_file, level, train_size, validation_size, test_size
        )
        x_train, y_train, x_val, y_val, x_test, y_test = arrays
    elif name in GENERATED_NAMES:
        fresh = {"seed": _check_size("seed", seed)} if fresh_data else None
        arrays, num_classes, multi_label, source, info, stream = _generated(
            name, clutter_digits, debris_fragments, train_size, validation_size, test_size, fresh
        )
        x_train, y_train, x_val, y_val, x_test, y_test = arrays
    else:
        (x_train, y_train, x_test, y_test), fmt, source = _load_file_dataset(name, data_dir)
        x_train, y_train, x_val, y_val = _split_train(x_train, y_train, train_size, validation_size, seed)
        x_test, y_test = _subsample_test(x_test, y_test, test_size)
        num_classes, multi_label = _FILE_DATASETS[name].num_classes, False
        info = {"format": fmt, "validation_split_seed": VALIDATION_SPLIT_SEED, "train_subsample_seed": int(seed),
                "test_subsample_seed": TEST_SUBSAMPLE_SEED}
    mean, std = channel_stats(x_train)
    return DatasetSplits(
        name, x_train, y_train, x_val, y_val, x_test, y_test, num_classes, multi_label, mean, std, source, info,
        stream,
    )


def available(data_dir=None):
    """What can be loaded, from where: one dict per dataset (for ``iterconv data info``).

    Keys: ``name``, ``available`` (bool), ``where`` (location or the places looked),
    ``format``, ``how_to_get``. Files are located, not parsed.
    """
    rows = [
        {
            "name": name,
            "available": True,
            "where": f"on the fly (iterconv_keras.data.{module})",
            "format": "generated",
            "how_to_get": "nothing to get: generated deterministically from fixed seeds",
        }
        for name, module in zip(GENERATED_NAMES, ("digitclutter", "debris"), strict=True)
    ]
    for name, spec in _FILE_DATASETS.items():
        fmt, where = _locate(name, data_dir)
        if fmt == "idx":
            where = os.path.dirname(where["x_train"])
        elif fmt == "cifar-pickle":
            where = os.path.dirname(where[0])
        elif fmt is None:
            where = list(dict.fromkeys(where))
        rows.append(
            {"name": name, "available": fmt is not None, "where": where, "format": fmt, "how_to_get": spec.how_to_get}
        )
    return rows
