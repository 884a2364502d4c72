"""Digitclutter and digit debris as registered tensorflow-datasets builders.

Importing this module registers ``digitclutter`` (configs ``2digits`` .. ``5digits``)
and ``digitdebris`` (``10fragments``, ``30fragments``, ``50fragments``) with
tensorflow-datasets; ``import iterconv_keras`` does not, so that stays cheap. Their
splits are exactly the images ``iterconv train`` generates for the same seeds and
sizes, and building them downloads nothing::

    import iterconv_keras.data.tfds_builders  # noqa: F401
    import tensorflow_datasets as tfds

    tfds.builder("digitclutter/3digits", data_dir=DIR).download_and_prepare()
    test = tfds.load("digitclutter/3digits", split="test", data_dir=DIR)

Small sets (for tests) are configs with other sizes, named after them, e.g.
``DigitclutterConfig(n_digits=3, train_size=8, validation_size=4, test_size=16)``
is ``digitclutter/3digits_train8_validation4_test16``. See docs/scaling.md for the
``tfds build`` commands.

Reference: Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551.
"""

from iterconv_keras.data.tfds_builders.clutter import Digitclutter, DigitclutterConfig
from iterconv_keras.data.tfds_builders.debris import Digitdebris, DigitdebrisConfig

__all__ = ["Digitclutter", "DigitclutterConfig", "Digitdebris", "DigitdebrisConfig"]
