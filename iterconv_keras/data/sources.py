"""Where datasets come from: the names, the file-dataset table, search roots, locating files.

The standard library only (no numpy, no TensorFlow), so the command line can list
the dataset names and ``iterconv data info`` can say what is available in
milliseconds. Nothing is ever downloaded: file datasets are searched for in the
explicit ``data_dir``, ``$ITERCONV_DATA_DIR``, ``~/.keras/datasets``,
``~/tensorflow_datasets`` and ``/usr/share/datasets`` (Debian's
``dataset-fashion-mnist`` installs there); a missing one raises `DatasetNotAvailable`
(exit code 3) naming every place looked and how to get the files. Reading the files
found is `iterconv_keras.data.readers`' job.
"""

import dataclasses
import os

from iterconv_keras import errors

DATASET_NAMES = ("digitclutter", "digitdebris", "mnist", "fashion_mnist", "cifar10", "cifar100")
GENERATED_NAMES = ("digitclutter", "digitdebris")
ENV_VAR = "ITERCONV_DATA_DIR"
# Default sizes of the generated sets (Digitclutter and debris): generated in about a
# second, large enough for the small models to learn (the original used about 100k
# train / 10k test). Here, not in `generated`, so `iterconv train --help` can state them.
CLUTTER_SIZES = {"train": 20_000, "validation": 2_000, "test": 5_000}
# Validation carved from train for file datasets: 10 %, at most this many images
# (`datasets.load`).
MAX_DEFAULT_VALIDATION = 5_000


def canonical_name(name):
    """The dataset name ``name`` spells: one of `DATASET_NAMES`, or ``name`` unchanged.

    Zoo names spell datasets with hyphens (``fashion-mnist-small``), so the hyphenated
    spelling of a name is accepted too: ``canonical_name("fashion-mnist")`` is
    ``"fashion_mnist"``. An unknown name comes back as it was, for the caller to refuse.
    """
    underscored = name.replace("-", "_") if isinstance(name, str) else name
    return underscored if underscored in DATASET_NAMES else name


@dataclasses.dataclass(frozen=True)
class FileDataset:
    """One row of the file-dataset table: what a dataset's files hold and where to look.

    Attributes:
        name: dataset name (a key of `FILE_DATASETS`).
        shape: ``(H, W, C)`` of its images.
        num_classes: number of classes.
        folders: sub-folders of a search root that may hold its files.
        tfds_name: its tensorflow-datasets name (a prepared directory is read too).
        how_to_get: the "to get it" part of the message when it is missing.
        split_sizes: ``(train, test)`` images of its official splits (what
            ``iterconv train --help`` states as the defaults).
    """

    name: str
    shape: tuple
    num_classes: int
    folders: tuple
    tfds_name: str
    how_to_get: str
    split_sizes: tuple


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)
FILE_DATASETS = {
    "mnist": FileDataset(
        "mnist",
        (28, 28, 1),
        10,
        ("mnist", "MNIST/raw"),
        "mnist",
        f"put the IDX files ({_MNIST_FILES}, from http://yann.lecun.com/exdb/mnist/ or the mirror "
        "https://storage.googleapis.com/cvdf-datasets/mnist/) or keras' mnist.npz "
        "(https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz) in --data-dir, "
        "or prepare it with `tfds build mnist --data_dir DIR` on a machine with internet",
        (60_000, 10_000),
    ),
    "fashion_mnist": FileDataset(
        "fashion_mnist",
        (28, 28, 1),
        10,
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        "fashion_mnist",
        "on Debian/Ubuntu `apt install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
        f"or put the IDX files ({_MNIST_FILES}, from https://github.com/zalandoresearch/fashion-mnist) "
        "in --data-dir or DIR/fashion-mnist",
        (60_000, 10_000),
    ),
    "cifar10": FileDataset(
        "cifar10",
        (32, 32, 3),
        10,
        ("cifar-10-batches-py",),
        "cifar10",
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into --data-dir "
        "(it creates cifar-10-batches-py/), or prepare it with `tfds build cifar10 --data_dir DIR`",
        (50_000, 10_000),
    ),
    "cifar100": FileDataset(
        "cifar100",
        (32, 32, 3),
        100,
        ("cifar-100-python",),
        "cifar100",
        "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into --data-dir "
        "(it creates cifar-100-python/), or prepare it with `tfds build cifar100 --data_dir DIR`",
        (50_000, 10_000),
    ),
}


def _user_roots(data_dir=None):
    roots = []
    if data_dir:
        roots.append(os.fspath(data_dir))
    if os.environ.get(ENV_VAR):
        if not os.path.isdir(os.environ[ENV_VAR]):
            # Set on purpose, so a typo must not fall back silently to the usual places (as --data-dir).
            raise errors.UsageError(f"${ENV_VAR} names {os.environ[ENV_VAR]!r}, which is not a directory: "
                                    f"fix or unset it")
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


def locate(name, data_dir=None):
    """Find a file dataset: ``(format, location)`` or ``(None, places looked)``."""
    spec = FILE_DATASETS[name]
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


def not_available(name, looked):
    """The `DatasetNotAvailable` for a dataset not found: every place ``looked``, and how to get it."""
    places = "; ".join(dict.fromkeys(looked))
    return errors.DatasetNotAvailable(
        f"dataset {name!r} not found (nothing is downloaded). Looked in: {places}. "
        f"To get it: {FILE_DATASETS[name].how_to_get}; or point --data-dir / ${ENV_VAR} at the folder."
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
    for name, spec in FILE_DATASETS.items():
        fmt, where = locate(name, data_dir)
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
