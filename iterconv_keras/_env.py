"""Process environment for TensorFlow, applied before TensorFlow is imported.

oneDNN roughly doubles CPU training throughput on AVX2 machines where
TensorFlow leaves it off by default (measured in ``docs/performance.md``).
A value the user has already set is respected.
"""

import contextlib
import os

_DEFAULTS = {
    "KERAS_BACKEND": "tensorflow",
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # TensorFlow's C++ log lines (a failed CUDA probe on every CPU-only start)
    # drown the CLI's own output; set TF_CPP_MIN_LOG_LEVEL=0 to see them again.
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def configure():
    """Set iterconv's environment defaults without overriding the user's."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the duration (native libraries only).

    TensorFlow's native code logs a few lines at import through absl before
    any log level applies; the CLI wraps its TensorFlow import in this so the
    user sees one clear line per problem. Python-level errors raised inside
    still propagate (they are reported after the descriptor is restored).
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") not in ("2", "3"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """Import TensorFlow (and Keras) with the import-time native log lines hidden."""
    configure()
    with native_stderr_silenced():
        import keras  # noqa: F401
        import tensorflow as tf
    return tf
