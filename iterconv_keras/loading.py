"""Resolve a ``MODEL`` reference of the command line to a Keras model.

A reference is, in the order tried (interfaces.md):

1. a run directory of ``iterconv train`` (holds ``model.keras``),
2. a ``.keras`` file,
3. a version directory of the zoo (holds ``assets.extra/model.keras``),
4. a zoo reference ``NAME`` or ``NAME@VERSION`` (see `iterconv_keras.zoo`).
"""

import dataclasses
import os

from iterconv_keras.errors import ModelNotFound
from iterconv_keras.fsutil import read_json_if_present

RUN_MODEL_FILE = "model.keras"
ZOO_MODEL_FILE = os.path.join("assets.extra", "model.keras")
ZOO_METADATA_FILE = os.path.join("assets.extra", "metadata.json")


@dataclasses.dataclass
class LoadedModel:
    """A model with where it came from.

    Attributes:
        model: the Keras model (an `IterativeResNet`).
        reference: the reference as the user gave it.
        kind: ``"run"``, ``"keras_file"``, ``"zoo_version"`` or ``"zoo"``.
        path: the ``.keras`` file that was loaded.
        metadata: the run's ``config.json`` or the zoo version's ``metadata.json``
            (empty when there is none).
    """

    model: object
    reference: str
    kind: str
    path: str
    metadata: dict


def load_model(reference, *, zoo_root=None):
    """Load the model named by ``reference``.

    Args:
        reference: run directory, ``.keras`` file, zoo version directory or
            ``NAME[@VERSION]``.
        zoo_root: zoo directory for zoo references (default: see `zoo.resolve_root`).

    Raises:
        ModelNotFound: nothing matches the reference (exit code 4).
    """
    reference = str(reference)
    if os.path.isdir(reference):
        if os.path.isfile(os.path.join(reference, RUN_MODEL_FILE)):
            metadata = read_json_if_present(os.path.join(reference, "config.json"))
            return _from_file(reference, "run", os.path.join(reference, RUN_MODEL_FILE), metadata)
        if os.path.isfile(os.path.join(reference, ZOO_MODEL_FILE)):
            metadata = read_json_if_present(os.path.join(reference, ZOO_METADATA_FILE))
            return _from_file(reference, "zoo_version", os.path.join(reference, ZOO_MODEL_FILE), metadata)
        raise ModelNotFound(
            f"{reference} is a directory but holds neither {RUN_MODEL_FILE} (a finished "
            f"training run) nor {ZOO_MODEL_FILE} (a zoo version)"
        )
    if reference.endswith(".keras"):
        if not os.path.isfile(reference):
            raise ModelNotFound(f"model file {reference} does not exist")
        return _from_file(reference, "keras_file", reference, {})
    if os.sep in reference or reference.startswith("."):
        raise ModelNotFound(f"no model at {reference}: not a run directory, .keras file or zoo version")
    from iterconv_keras import zoo

    entry = zoo.load_entry(reference, root=zoo_root)
    return LoadedModel(entry.model, reference, "zoo", entry.model_path, entry.metadata)


def _from_file(reference, kind, path, metadata):
    import keras

    import iterconv_keras.models.metrics  # noqa: F401
    import iterconv_keras.models.resnet  # noqa: F401  (registers the custom classes)

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is the same user error
        from iterconv_keras.errors import IntegrityError

        raise IntegrityError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    return LoadedModel(model, reference, kind, path, metadata)
