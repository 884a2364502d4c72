"""Test configuration shared by the whole suite.

TensorFlow is imported once per process here, after iterconv's environment
defaults are set, and the single physical CPU is split into two logical
devices so `tf.distribute.MirroredStrategy` can be tested without a GPU (this
must happen before TensorFlow initialises its runtime).
"""

import os

# The exact oracles (full SVDs of explicit matrices) run in NumPy's OpenBLAS. On the two
# shared cores its threads spin against TensorFlow's and each other: a 576-square SVD took
# 1.9 s with threads, 0.05 s with one. One thread, set before NumPy loads (the user's
# own setting wins); it changes how fast the oracles are computed, not what they compute.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402  (after the thread setting)
import numpy as np  # noqa: E402
import pytest
import tensorflow as tf

import iterconv_keras  # noqa: F401  (sets TF environment defaults before TF loads)

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """Seed Python, NumPy and TensorFlow; returns the seed."""
    keras.utils.set_random_seed(1234)
    return 1234


def random_images(n, shape=(16, 16, 1), seed=0):
    """Uniform [0, 1] float32 images."""
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One two-replica MirroredStrategy for the session (over the two logical CPUs).

    A single instance, the one ``iterconv train --strategy mirrored --devices 2``
    uses in this process: several strategies in one process can collide in
    their collective-op keys.
    """
    from iterconv_keras import distribution

    return distribution.place("mirrored", devices=2, environ={}).strategy


def check_seeded_generator(generate):
    """The determinism contract of the generated datasets (Digitclutter, debris).

    ``generate(count, seed)`` returns a dataclass of arrays plus ``info``: the same
    seed must give the same bytes in every array, another seed other images, and a
    smaller count a prefix of a larger one across the 4096-image stream blocks.
    """
    import dataclasses

    def arrays(result):
        return {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "info"}

    a, b, other = arrays(generate(600, 7)), arrays(generate(600, 7)), arrays(generate(600, 8))
    assert all(a[name].tobytes() == b[name].tobytes() for name in a)
    assert (a["images"] != other["images"]).any(axis=(1, 2, 3)).mean() > 0.99
    big, small = arrays(generate(4200, 7)), arrays(generate(4100, 7))
    for name in a:
        np.testing.assert_array_equal(big[name][:600], a[name])
        np.testing.assert_array_equal(big[name][:4100], small[name])


def exact_set_accuracy(logits, labels):
    """Independent oracle for multi-label accuracy: right when the top n logits are the n labels."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    n = int(round(float(labels[0].sum())))
    predicted = np.zeros_like(labels)
    np.put_along_axis(predicted, np.argsort(-logits, axis=1)[:, :n], 1.0, axis=1)
    return float(np.mean(np.all(predicted == labels, axis=1)))


def one_error_line(result, code):
    """The one ``iterconv: error:`` line of a failed CLI run (click's CliRunner result) with exit ``code``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iterconv: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
