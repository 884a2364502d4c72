"""Readers of the real file formats of the file datasets, one function per format.

- IDX (``*-ubyte[.gz]``, MNIST and Fashion-MNIST): `read_idx`, `read_idx_files`;
- the CIFAR python pickle batches: `read_cifar_batches` (a restricted unpickler);
- keras' ``.npz`` caches (``mnist.npz``): `read_keras_npz`;
- a prepared tensorflow-datasets directory: `read_tfds`.

`read_file_dataset` locates a dataset (`iterconv_keras.data.sources`), reads it with
the reader of its format and checks the arrays against the dataset's table row. An
unreadable or malformed file raises `DatasetNotAvailable` (exit code 3) naming the file.
The ``.npz`` files iterconv itself writes (generated sets) are
`iterconv_keras.data.setfile`'s.
"""

import gzip
import os
import pickle

import numpy as np

from iterconv_keras import errors
from iterconv_keras.data import sources


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


def read_cifar_batches(paths, name):
    """``(x_train, y_train, x_test, y_test)`` from the CIFAR batch files ``paths`` (test batch last)."""
    label_key = "fine_labels" if name == "cifar100" else "labels"
    parts = [_read_cifar_batch(p, label_key) for p in paths]
    train, test = parts[:-1], parts[-1]
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test[0],
        test[1],
    )


def read_idx_files(paths):
    """``(x_train, y_train, x_test, y_test)`` from the four IDX files of ``paths`` (keyed by those names)."""
    return tuple(read_idx(paths[k]) for k in ("x_train", "y_train", "x_test", "y_test"))


def read_keras_npz(path):
    """``(x_train, y_train, x_test, y_test)`` from a keras dataset cache such as ``mnist.npz``."""
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


def read_tfds(tfds_name, data_dir):
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
    """The four arrays as uint8 ``[N, H, W, C]`` images and int64 labels, or an error naming ``where``."""
    spec = sources.FILE_DATASETS[name]
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


def read_file_dataset(name, data_dir):
    """Locate file dataset ``name`` and read it with the reader of its format.

    Args:
        name: a key of `sources.FILE_DATASETS`.
        data_dir: folder searched first, or None (see `sources.search_roots`).

    Returns:
        ``((x_train, y_train, x_test, y_test), format, source)``, checked against the
        table row: uint8 ``[N, H, W, C]`` images, int64 labels in range.

    Raises:
        DatasetNotAvailable: not found (every place looked, how to get it) or unreadable.
    """
    fmt, where = sources.locate(name, data_dir)
    if fmt is None:
        raise sources.not_available(name, where)
    if fmt == "idx":
        arrays, source = read_idx_files(where), os.path.dirname(where["x_train"])
    elif fmt == "cifar-pickle":
        arrays, source = read_cifar_batches(where, name), os.path.dirname(where[0])
    elif fmt == "npz":
        arrays, source = read_keras_npz(where), where
    else:
        arrays, source = read_tfds(sources.FILE_DATASETS[name].tfds_name, where), where
    return _checked(name, arrays, source), fmt, source

