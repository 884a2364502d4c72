"""Test configuration shared by the whole suite.

TensorFlow is imported once per process here, after iterconv's environment
defaults are set, and the single physical CPU is split into two logical
devices so `tf.distribute.MirroredStrategy` can be tested without a GPU (this
must happen before TensorFlow initialises its runtime).
"""

import iterconv_keras  # noqa: F401  (sets TF environment defaults before TF loads)

import keras
import numpy as np
import pytest
import tensorflow as tf

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

    A single instance: several strategies in one process can collide in their
    collective-op keys.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
