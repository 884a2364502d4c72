"""Load a model from any reference: the one dispatcher.

A reference is one of

1. a run directory of ``iterconv train`` (holds ``model.keras``),
2. a ``.keras`` file,
3. a version directory of the zoo (holds ``assets.extra/model.keras``),
4. a zoo reference ``NAME`` or ``NAME@VERSION`` (checksums verified first).

The format owners read their own files: run-directory names come from the
training run's module, the version layout from `iterconv_keras.zoo.savedmodel`,
the card from `iterconv_keras.zoo.card`, and every ``.keras`` file is read by
`iterconv_keras.models.saving.load_keras`. This module imports them; none of
them imports it (no cycle).

A bare word such as ``digits`` can name both a local directory and a zoo
model. The rule: ``NAME@N`` is always the zoo; anything with a path separator,
a leading ``.`` or a ``.keras`` suffix is always a path; a bare ``NAME`` is the
directory when it holds a model, the zoo model otherwise, and an error
(exit 2) when it is both, naming the two ways to say which one is meant
(``./NAME`` or ``NAME@N``).
"""

import dataclasses
import os

from iterconv_keras import zoo as zoo_lib
from iterconv_keras.errors import ModelNotFound, UsageError
from iterconv_keras.models.saving import load_keras
from iterconv_keras.runs import MODEL_FILE as RUN_MODEL_FILE
from iterconv_keras.runs import checkpoint_epochs
from iterconv_keras.zoo.card import ModelCard
from iterconv_keras.zoo.savedmodel import METADATA_FILE as ZOO_METADATA_FILE
from iterconv_keras.zoo.savedmodel import MODEL_FILE as ZOO_MODEL_FILE


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a loaded model came from.

    Attributes:
        reference: the reference as the user gave it.
        kind: ``"run"``, ``"keras_file"``, ``"zoo_version"`` or ``"zoo"``.
        path: the ``.keras`` file that was loaded.
        name: zoo name (``"zoo"`` only), else None.
        version: zoo version (``"zoo"`` only), else None.
    """

    reference: str
    kind: str
    path: str
    name: str | None = None
    version: int | None = None

    @property
    def source(self):
        """``NAME@N`` for a zoo model, else the absolute path the user named."""
        if self.kind == "zoo":
            return f"{self.name}@{self.version}"
        return os.path.abspath(self.reference)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model with its card and where it came from.

    Attributes:
        model: the Keras model (an `IterativeResNet`).
        card: its `ModelCard`: the zoo version's stored card, a run's card
            assembled from its files, or for a bare ``.keras`` file a card made
            from the model alone (no dataset, recipe or metrics).
        provenance: a `Provenance`.
    """

    model: object
    card: ModelCard
    provenance: Provenance


def load(reference, *, zoo=None):
    """Load the model named by ``reference`` with its card and provenance.

    Args:
        reference: run directory, ``.keras`` file, zoo version directory or
            ``NAME[@VERSION]`` (see the module docstring for how a bare name is read).
        zoo: zoo directory for zoo references (default: ``$ITERCONV_ZOO``, then
            the repository's ``zoo/``).

    Returns:
        A `LoadedModel`.

    Raises:
        ModelNotFound: nothing matches the reference (exit code 4).
        IntegrityError: a zoo file fails its checksum, or a file does not load (exit 5).
        UsageError: a bare name is both a local model directory and a zoo model (exit 2).

    Example:
        >>> loaded = load("fashion-mnist-small")
        >>> loaded.card.dataset, loaded.provenance.source
        ('fashion_mnist', 'fashion-mnist-small@1')
    """
    reference = os.fspath(reference)
    if looks_like_path(reference):  # runs/lr@1e-3 is a path too: '@' makes a zoo reference only in a bare name
        return _load_path(reference)
    bare_name = "@" not in reference
    local_model = bare_name and _holds_model(reference)
    if bare_name and not zoo_lib.contains(reference, zoo):
        if local_model or os.path.exists(reference):
            return _load_path(reference)
    elif local_model:
        raise UsageError(
            f"{reference!r} is both a local directory holding a model and a model of the zoo at "
            f"{zoo_lib.resolve_root(zoo)}: write ./{reference} for the directory or {reference}@N for the zoo model"
        )
    try:
        name, version, version_dir = zoo_lib.verified(reference, zoo)
    except ValueError as exc:  # not even a well-formed zoo name: say what was looked for
        if bare_name and not os.path.exists(reference):
            raise ModelNotFound(f"no model at {reference}: no such file or directory, and {exc}") from exc
        raise
    path = os.path.join(version_dir, ZOO_MODEL_FILE)
    return LoadedModel(load_keras(path), _zoo_card(version_dir), Provenance(reference, "zoo", path, name, version))


def load_model(reference, *, zoo=None):
    """The Keras model named by ``reference`` (run dir, ``.keras`` file, zoo version dir, ``NAME[@N]``).

    Zoo models are checked against their checksums first. See `load` for the
    card and provenance.

    Example:
        >>> import iterconv_keras
        >>> model = iterconv_keras.load_model("fashion-mnist-small")   # newest version, verified
        >>> model = iterconv_keras.load_model("runs/demo")              # a training run
    """
    return load(reference, zoo=zoo).model


def looks_like_path(reference):
    """Whether ``reference`` is read as a path, never as a zoo name (a separator, a leading '.', '.keras')."""
    return (os.sep in reference or (os.altsep or os.sep) in reference or reference.startswith(".")
            or reference.endswith(".keras"))


def _holds_model(directory):
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, f)) for f in (RUN_MODEL_FILE, ZOO_MODEL_FILE)
    )


def _load_path(reference):
    if os.path.isdir(reference):
        run_model = os.path.join(reference, RUN_MODEL_FILE)
        if os.path.isfile(run_model):
            model = load_keras(run_model)
            return LoadedModel(model, ModelCard.from_run_dir(reference, model), Provenance(reference, "run", run_model))
        zoo_model = os.path.join(reference, ZOO_MODEL_FILE)
        if os.path.isfile(zoo_model):
            provenance = Provenance(reference, "zoo_version", zoo_model)
            return LoadedModel(load_keras(zoo_model), _zoo_card(reference), provenance)
        epochs = checkpoint_epochs(reference)
        # A run stopped before its end has checkpoints but no model: say how to finish it.
        interrupted = (f"; it holds checkpoints up to epoch {epochs[-1]}: interrupted? resume with "
                       f"`iterconv train --resume --out {reference}`") if epochs else ""
        raise ModelNotFound(
            f"{reference} is a directory but holds neither {RUN_MODEL_FILE} (a finished "
            f"training run) nor {ZOO_MODEL_FILE} (a zoo version){interrupted}"
        )
    if reference.endswith(".keras"):
        model = load_keras(reference)
        return LoadedModel(model, ModelCard.from_model(model, source=os.path.abspath(reference)),
                           Provenance(reference, "keras_file", reference))
    raise ModelNotFound(f"no model at {reference}: not a run directory, .keras file or zoo version")


def _zoo_card(version_dir):
    return ModelCard.read(os.path.join(version_dir, ZOO_METADATA_FILE))
