"""Load a ``.keras`` file written by iterconv: the one low-level reader.

Both format owners that hold a ``.keras`` file (a training run's
``model.keras`` and a zoo version's ``assets.extra/model.keras``) load it
through `load_keras`; `iterconv_keras.loading` decides which file a user's
reference names. Keras finds a custom class only through its registry
(``register_keras_serializable``), so the modules that register iterconv's
classes are imported first.
"""

import os

from iterconv_keras.errors import IntegrityError, ModelNotFound


def load_keras(path, compile=False):
    """Load the Keras model at ``path`` with every iterconv class registered.

    Args:
        path: a ``.keras`` file.
        compile: restore the training configuration too (default False: the
            indices, evaluation and export need only the forward pass).

    Returns:
        The Keras model (an `IterativeResNet` for files iterconv wrote).

    Raises:
        ModelNotFound: there is no file at ``path`` (exit code 4).
        IntegrityError: the file exists but is not a loadable Keras archive
            (exit code 5); the message names the file.

    Example:
        >>> model = load_keras("runs/demo/model.keras")
    """
    if not os.path.isfile(path):
        raise ModelNotFound(f"model file {path} does not exist")
    import keras

    # Registers IterativeResNet and its layers, and the exact-set metric a compiled
    # Digitclutter model refers to.
    import iterconv_keras.models.metrics  # noqa: F401
    import iterconv_keras.models.resnet  # noqa: F401

    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is the same user error
        raise IntegrityError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
