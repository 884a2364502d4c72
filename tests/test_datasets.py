"""Offline loaders on tiny files written in each real format, and their error paths."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from iterconv_keras import errors
from iterconv_keras.data import datasets, generated, sources

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No real ~/.keras or $ITERCONV_DATA_DIR leaks into the tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    return home


def _idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(folder, n_train=50, n_test=20, compress=True, seed=0):
    """Tiny MNIST-format files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if compress:
            with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as handle:
                handle.write(data)
        else:
            with open(os.path.join(folder, stem), "wb") as handle:
                handle.write(data)
    return arrays


def write_cifar(folder, hundred=False, per_batch=6, seed=0):
    """Tiny CIFAR python-pickle batches (bytes keys, channel-major rows as published)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        labels = rng.integers(0, 100 if hundred else 10, per_batch).tolist()
        batch = {b"data": data, b"batch_label": name.encode()}
        if hundred:
            batch[b"fine_labels"] = labels
            batch[b"coarse_labels"] = [label // 5 for label in labels]
        else:
            batch[b"labels"] = labels
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = (images, np.array(labels))
    return written


def _same_rows(a, b):
    key = lambda x: sorted(map(bytes, x.reshape(x.shape[0], -1)))  # noqa: E731
    return key(a) == key(b)


def test_idx_gz_loads_with_deterministic_validation_split(tmp_path):
    written = write_idx(tmp_path / "mnist")
    split = datasets.load("mnist", data_dir=tmp_path, seed=3)
    assert split.input_shape == (28, 28, 1) and split.num_classes == 10 and not split.multi_label
    assert split.x_train.shape[0] == 45 and split.x_val.shape[0] == 5  # 10 % by default
    assert split.y_train.dtype == np.int64
    # Train and validation partition the written train set, with labels attached.
    x_all = np.concatenate([split.x_train, split.x_val])[..., 0]
    assert _same_rows(x_all, written["train-images-idx3-ubyte"])
    lookup = {
        bytes(x): y
        for x, y in zip(written["train-images-idx3-ubyte"], written["train-labels-idx1-ubyte"], strict=True)
    }
    assert all(lookup[bytes(x[..., 0])] == y for x, y in zip(split.x_train, split.y_train, strict=True))
    np.testing.assert_array_equal(split.x_test[..., 0], written["t10k-images-idx3-ubyte"])
    again = datasets.load("mnist", data_dir=tmp_path, seed=3)
    np.testing.assert_array_equal(again.x_val, split.x_val)
    # The validation split is fixed (not by the training seed): every seed is validated
    # on the same images and, without --train-size, trains on the same rest.
    other = datasets.load("mnist", data_dir=tmp_path, seed=4)
    np.testing.assert_array_equal(other.x_val, split.x_val)
    np.testing.assert_array_equal(other.x_train, split.x_train)
    assert split.info["validation_split_seed"] == datasets.VALIDATION_SPLIT_SEED
    # mean/std are the per-channel statistics of x_train in [0, 1] units.
    np.testing.assert_allclose(split.mean, [split.x_train.mean() / 255], rtol=1e-9)
    np.testing.assert_allclose(split.std, [split.x_train.std() / 255], rtol=1e-9)


def test_sizes_subsample_and_bad_sizes_echo(tmp_path):
    write_idx(tmp_path, compress=False)  # raw IDX at the top of an explicit data_dir
    split = datasets.load("mnist", data_dir=tmp_path, train_size=10, validation_size=7, test_size=4)
    assert (split.x_train.shape[0], split.x_val.shape[0], split.x_test.shape[0]) == (10, 7, 4)
    with pytest.raises(ValueError, match="got 44"):
        datasets.load("mnist", data_dir=tmp_path, train_size=44, validation_size=7)
    with pytest.raises(ValueError, match="got 21"):
        datasets.load("mnist", data_dir=tmp_path, test_size=21)
    with pytest.raises(ValueError, match="got -1"):
        datasets.load("mnist", data_dir=tmp_path, validation_size=-1)


def test_train_subsample_follows_the_seed_within_the_fixed_rest(tmp_path):
    write_idx(tmp_path / "mnist")
    full = datasets.load("mnist", data_dir=tmp_path, validation_size=10)
    a = datasets.load("mnist", data_dir=tmp_path, validation_size=10, train_size=20, seed=0)
    b = datasets.load("mnist", data_dir=tmp_path, validation_size=10, train_size=20, seed=1)
    np.testing.assert_array_equal(a.x_val, full.x_val)
    np.testing.assert_array_equal(b.x_val, full.x_val)
    rest = {bytes(x) for x in full.x_train}
    assert {bytes(x) for x in a.x_train} <= rest and {bytes(x) for x in b.x_train} <= rest
    assert not _same_rows(a.x_train, b.x_train)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="the real Fashion-MNIST is not installed")
def test_fashion_mnist_trains_on_the_whole_split_minus_validation():
    from iterconv_keras.data.readers import read_idx

    split = datasets.load("fashion_mnist", data_dir=FASHION_DIR, seed=2)
    assert (len(split.x_train), len(split.x_val), len(split.x_test)) == (55_000, 5_000, 10_000)
    # Train and validation partition the file's 60,000 images (by index: the set has
    # duplicate images, so compare multisets of rows).
    written = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    assert _same_rows(np.concatenate([split.x_train, split.x_val])[..., 0], written)
    other = datasets.load("fashion_mnist", data_dir=FASHION_DIR, seed=5)
    np.testing.assert_array_equal(other.x_val, split.x_val)


def test_env_var_and_keras_home_are_searched(tmp_path, monkeypatch, isolated_home):
    write_idx(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "env"))
    assert datasets.load("fashion_mnist").source == str(tmp_path / "env" / "fashion-mnist")
    monkeypatch.delenv(sources.ENV_VAR)
    write_idx(isolated_home / ".keras" / "datasets" / "mnist")
    assert datasets.load("mnist").source.startswith(str(isolated_home))


def test_an_env_var_naming_no_folder_is_a_usage_error_not_a_silent_fallback(tmp_path, monkeypatch):
    # The real Fashion-MNIST may be installed in a usual place: without the check, a typo in
    # $ITERCONV_DATA_DIR would silently load that instead.
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "typo"))
    with pytest.raises(errors.UsageError, match=r"\$ITERCONV_DATA_DIR names '.*typo', which is not a directory"):
        datasets.load("fashion_mnist")
    assert datasets.load("digitclutter", train_size=4, validation_size=0, test_size=4).x_test.shape[0] == 4


def test_cifar10_pickles_channel_layout(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    split = datasets.load("cifar10", data_dir=tmp_path, validation_size=0)
    assert split.input_shape == (32, 32, 3) and split.x_train.shape[0] == 30
    # Batches are concatenated in order, so rows line up with what was written (HWC).
    np.testing.assert_array_equal(split.x_train[:6], written["data_batch_1"][0])
    np.testing.assert_array_equal(split.y_train[6:12], written["data_batch_2"][1])
    np.testing.assert_array_equal(split.x_test, written["test_batch"][0])
    assert len(split.mean) == 3


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar(tmp_path / "cifar-100-python", hundred=True, per_batch=20)
    split = datasets.load("cifar100", data_dir=tmp_path, validation_size=0)
    assert split.num_classes == 100
    np.testing.assert_array_equal(split.y_test, written["test"][1])


def test_keras_npz_cache(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 30, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    split = datasets.load("mnist", data_dir=tmp_path, validation_size=0)
    assert split.info["format"] == "npz"
    np.testing.assert_array_equal(split.x_test[..., 0], arrays["x_test"])


def test_prepared_tfds_dir(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    (tmp_path / "mnist").mkdir()
    monkeypatch.setattr(sources, "_tfds_prepared", lambda root, name: root == str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        split = datasets.load("mnist", data_dir=tmp_path, validation_size=2)
    assert split.info["format"] == "tfds" and split.source == str(tmp_path)
    assert split.x_train.shape == (10, 28, 28, 1) and split.x_test.shape[0] == 12
    # The real check: an unprepared builder dir is "not prepared", never downloaded.
    monkeypatch.undo()
    assert sources._tfds_prepared(str(tmp_path), "mnist") is False


@pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"real Fashion-MNIST not installed at {FASHION_DIR} (apt install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    split = datasets.load("fashion_mnist", validation_size=0)
    assert split.source == FASHION_DIR
    assert split.x_train.shape == (60000, 28, 28, 1) and split.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(split.y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(split.y_test, minlength=10), [1000] * 10)
    default = datasets.load("fashion_mnist", train_size=100, test_size=50)
    assert default.x_val.shape[0] == 5000  # 10 % capped at 5,000


def _rewrite_gz(path, data):
    with gzip.open(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated_gz", "truncated or corrupt"),
        ("short_data", "IDX header says shape"),
        ("bad_magic", "bad magic number"),
        ("label_count", "labels for"),
        ("label_range", "labels outside"),
    ],
)
def test_corrupt_idx_files(tmp_path, damage, message):
    written = write_idx(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    if damage == "truncated_gz":
        images.write_bytes(images.read_bytes()[:200])
    elif damage == "short_data":
        _rewrite_gz(images, _idx_bytes(written["train-images-idx3-ubyte"])[:-10])
    elif damage == "bad_magic":
        _rewrite_gz(images, b"\x12\x34" + _idx_bytes(written["train-images-idx3-ubyte"])[2:])
    elif damage == "label_count":
        _rewrite_gz(labels, _idx_bytes(written["train-labels-idx1-ubyte"][:-1]))
    else:
        _rewrite_gz(labels, _idx_bytes(np.full(50, 10, np.uint8)))
    with pytest.raises(errors.DatasetNotAvailable, match=message):
        datasets.load("mnist", data_dir=tmp_path)


def test_corrupt_and_hostile_cifar_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(errors.DatasetNotAvailable, match="data_batch_3"):
        datasets.load("cifar10", data_dir=tmp_path)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": []}))
    with pytest.raises(errors.DatasetNotAvailable, match="not allowed"):
        datasets.load("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(errors.DatasetNotAvailable, match="2 labels for 4 images"):
        datasets.load("cifar10", data_dir=tmp_path)


def test_npz_wrong_shape_and_missing_keys(tmp_path):
    np.savez(
        tmp_path / "mnist.npz",
        x_train=np.zeros((4, 32, 32), np.uint8), y_train=np.zeros(4),
        x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2),
    )
    with pytest.raises(errors.DatasetNotAvailable, match=r"expected \[N, 28, 28, 1\]"):
        datasets.load("mnist", data_dir=tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(errors.DatasetNotAvailable, match="missing arrays"):
        datasets.load("mnist", data_dir=tmp_path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="'imagenet'.*digitclutter, digitdebris, mnist, fashion_mnist, cifar10, cifar100"
    ):
        datasets.load("imagenet")


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch, isolated_home):
    (tmp_path / "envdir").mkdir()
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "envdir"))
    with pytest.raises(errors.DatasetNotAvailable) as caught:
        datasets.load("cifar10", data_dir=tmp_path / "given")
    message = str(caught.value)
    assert caught.value.exit_code == 3
    for place in (
        tmp_path / "given", tmp_path / "envdir",
        isolated_home / ".keras" / "datasets", isolated_home / "tensorflow_datasets",
    ):
        assert str(place) in message
    assert "cifar-10-python.tar.gz" in message and "nothing is downloaded" in message


def test_available_reports_each_dataset(tmp_path):
    write_idx(tmp_path / "mnist")
    rows = {row["name"]: row for row in sources.available(tmp_path)}
    assert set(rows) == set(sources.DATASET_NAMES)
    assert rows["digitclutter"]["available"] and rows["digitdebris"]["available"]
    assert rows["mnist"]["available"] and rows["mnist"]["where"] == str(tmp_path / "mnist")
    assert not rows["cifar10"]["available"] and str(tmp_path) in " ".join(rows["cifar10"]["where"])


def test_digitclutter_uses_fixed_seeds_independent_of_training_seed():
    a = datasets.load("digitclutter", train_size=200, validation_size=50, test_size=100, seed=0)
    b = datasets.load("digitclutter", train_size=200, validation_size=50, test_size=100, seed=9)
    assert a.multi_label and a.num_classes == 10 and a.input_shape == (32, 32, 1)
    assert a.y_train.shape == (200, 10) and a.y_train.dtype == np.float32
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert np.all(a.y_test.sum(axis=1) == 3)
    # Splits come from different seeds, so they share no images.
    assert not _same_rows(a.x_val, a.x_test[:50])
    assert a.info["font_file"] == "DejaVuSans-Bold.ttf" and a.info["n_digits"] == 3
    x4, y4, info = generated.clutter_test_set(4, 100)
    c = datasets.load("digitclutter", clutter_digits=4, train_size=10, validation_size=0, test_size=100)
    np.testing.assert_array_equal(x4, c.x_test)
    assert np.all(y4.sum(axis=1) == 4) and info["n_digits"] == 4
    with pytest.raises(ValueError, match="got 6"):
        datasets.load("digitclutter", clutter_digits=6)


def test_digitdebris_uses_fixed_seeds_independent_of_training_seed():
    from iterconv_keras.data import debris

    a = datasets.load("digitdebris", debris_fragments=10, train_size=200, validation_size=50, test_size=100, seed=0)
    b = datasets.load("digitdebris", debris_fragments=10, train_size=200, validation_size=50, test_size=100, seed=9)
    assert not a.multi_label and a.num_classes == 10 and a.input_shape == (32, 32, 1)
    assert a.y_train.shape == (200,) and a.y_train.dtype == np.int64
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    expected = debris.generate(10, 100, seed=generated.debris_seed("test", 10))
    np.testing.assert_array_equal(a.x_test, expected.images)
    np.testing.assert_array_equal(a.y_test, expected.labels)
    # Splits come from different seeds, so they share no images; other fragment counts
    # and Digitclutter have their own seeds too.
    assert not _same_rows(a.x_val, a.x_test[:50])
    seeds = {generated.debris_seed(split, n) for split in generated.DEBRIS_SEEDS for n in debris.FRAGMENT_COUNTS}
    seeds |= {generated.clutter_seed(split, n) for split in generated.CLUTTER_SEEDS for n in range(2, 6)}
    assert len(seeds) == 3 * 3 + 3 * 4
    assert a.info["n_fragments"] == 10 and a.info["seeds"]["test"] == generated.debris_seed("test", 10)
    assert "debris" in a.source and "10 fragments" in a.source
    default = datasets.load("digitdebris", train_size=10, validation_size=0, test_size=5)
    assert default.info["n_fragments"] == 10
    for bad in (20, 30.0, True):
        with pytest.raises(ValueError, match=f"debris_fragments must be one of 10, 30, 50.*got {bad!r}"):
            datasets.load("digitdebris", debris_fragments=bad)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="the real Fashion-MNIST is not installed")
def test_the_stated_split_sizes_are_those_of_the_real_files():
    # The table's (train, test) sizes, which `iterconv train --help` states, against the IDX
    # headers of the installed files (big-endian counts after the magic number).
    counts = []
    for split in ("train", "t10k"):
        with gzip.open(os.path.join(FASHION_DIR, f"{split}-labels-idx1-ubyte.gz")) as f:
            counts.append(struct.unpack(">II", f.read(8))[1])
    assert tuple(counts) == sources.FILE_DATASETS["fashion_mnist"].split_sizes == (60_000, 10_000)
