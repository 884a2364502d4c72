"""Process environment for TensorFlow, applied before TensorFlow is imported.

oneDNN roughly doubles CPU training throughput on AVX2 machines where
TensorFlow leaves it off by default (measured in ``docs/performance.md``).
A value the user has already set is respected.
"""

import os

_DEFAULTS = {
    "KERAS_BACKEND": "tensorflow",
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # TensorFlow's C++ INFO/WARNING lines drown the CLI's own output.
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def configure():
    """Set iterconv's environment defaults without overriding the user's."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
