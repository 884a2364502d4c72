"""The model card: one schema for what a model is, how it was trained and how it scored.

A zoo version stores its card as ``assets.extra/metadata.json``; a training
run's card is assembled from its ``config.json`` (the recipe), ``metrics.json``
(test metrics) and ``eval.json`` (an ``iterconv eval --json`` document: indices,
occlusion, the Lipschitz summary). `iterconv_keras.loading.LoadedModel.card` is
a `ModelCard` whatever the model was loaded from. After timm's
``PretrainedCfg`` (one typed schema for every weight source).

This module imports no TensorFlow: ``iterconv zoo show`` reads cards cheaply.
"""

import dataclasses
import math
import os
from typing import Any

from iterconv_keras.data.classes import class_names_for
from iterconv_keras.errors import IntegrityError
from iterconv_keras.fsutil import read_json_if_present
from iterconv_keras.runs import CONFIG_FILE, EVAL_FILE, METRICS_FILE, MODEL_FILE
from iterconv_keras.zoo import savedmodel

CARD_SCHEMA = 1
# The index numbers a card keeps; the curves are bulky and stay in the eval document.
_INDEX_KEYS = ("recurrence", "recurrence_median", "divergence", "convergence", "effective_parameters", "parameters",
               "per_stage")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a model is, how it was trained and how it scored (``metadata.json``).

    One field per key of the card; a field without a known value is None, so
    every card has the same keys. The five cards committed with the zoo read
    unchanged (`from_json`), so their checksums stay valid.

    Args:
        schema: card format version (`CARD_SCHEMA`).
        name: zoo name, or None outside the zoo.
        created: ISO-8601 UTC time of the export, or None before export.
        source: where the exported model came from (a run directory, a
            ``.keras`` file, ``NAME@N``), for provenance.
        dataset: training dataset name, or None when unknown.
        image_shape: ``[H, W, C]`` of the input images.
        num_classes: K, the number of outputs.
        multi_label: True for sigmoid outputs (Digitclutter: several digits).
        class_names: K names, in output order (what ``classify`` returns).
        recipe: the training run's ``config.json`` as a plain dict, keys as the
            run wrote them (older runs say ``schedule`` for the learning-rate
            schedule), or None.
        variant: architecture name of the variants table, or None.
        architecture: ``{"class_name", "config"}`` of the Keras model.
        coupling: soft gradient coupling lambda.
        constraint: ``{"lipschitz": c or None, "spectral_norm": the run's flag}``.
        parameters: trainable parameters (batch-norm moving statistics are not learned).
        effective_parameters: the effective number of parameters from the
            indices, or None.
        metrics: the training run's final test metrics (``accuracy``,
            ``loss``, ``examples``, ...); an evaluation's accuracy and loss
            fill in where the run has none.
        indices: the index summary of the evaluation (recurrence, divergence,
            convergence, per stage) and ``examples``, the number of test
            images that evaluation ran on (it may differ from ``metrics``'
            ``examples``, the training run's test set), or None.
        occlusion_auc: area under the occlusion curve (of the same
            evaluation, on ``indices["examples"]`` images when both were
            computed), or None.
        signatures: the SavedModel's signatures (see `savedmodel.signature_summary`).
        probabilities: ``"softmax"`` or ``"sigmoid"``.
        libraries: versions of the libraries that wrote the export, or None.
        lipschitz: the certified Lipschitz summary of the evaluation
            (``indices.lipschitz`` of ``eval.json``: per-block bounds, the
            bound c, and ``max_certified``), or None.
        projection: set when export projected a constrained model onto its
            bound (on a copy): ``{"per_conv_bound", "max_conv_norm_before",
            "max_conv_norm_after", "iterations"}``, power-iteration estimates of
            the convolutions' operator norms; the metrics and indices were
            measured before it. None when nothing was projected.
        extra: keys of a card that this version of iterconv does not know,
            kept so that reading and writing a card loses nothing.

    Example:
        >>> card = ModelCard.read("zoo/fashion-mnist-small/1/assets.extra/metadata.json")
        >>> card.dataset, card.metrics["accuracy"]
        ('fashion_mnist', 0.8823000192642212)
    """

    schema: int = CARD_SCHEMA
    name: str | None = None
    created: str | None = None
    source: str | None = None
    dataset: str | None = None
    image_shape: list | None = None
    num_classes: int | None = None
    multi_label: bool | None = None
    class_names: list | None = None
    recipe: dict | None = None
    variant: str | None = None
    architecture: dict | None = None
    coupling: float | None = None
    constraint: dict | None = None
    parameters: int | None = None
    effective_parameters: float | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    indices: dict | None = None
    occlusion_auc: float | None = None
    signatures: dict | None = None
    probabilities: str | None = None
    libraries: dict | None = None
    lipschitz: dict | None = None
    projection: dict | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- constructors

    @classmethod
    def from_model(cls, model, *, recipe=None, metrics=None, evaluation=None, source=None, name=None):
        """The card of ``model`` with what is known of its training and evaluation.

        Args:
            model: an `IterativeResNet` (``image_shape``, ``num_classes``,
                ``multi_label``, ``get_config``, ``trainable_variables``).
            recipe: the run's ``config.json`` (dict) or None.
            metrics: the run's ``metrics.json`` (dict) or None.
            evaluation: an ``iterconv eval --json`` document (dict) or None;
                supplies the indices, effective parameters, occlusion AUC and
                the Lipschitz summary, and the accuracy and loss when
                ``metrics`` lacks them.
            source: provenance (a path or reference).
            name: zoo name, if any.
        """
        recipe = dict(recipe or {})
        metrics = dict(metrics or {})
        evaluation = dict(evaluation or {})
        config = model.get_config()
        dataset = recipe.get("dataset") or metrics.get("dataset") or evaluation.get("dataset")
        eval_indices = evaluation.get("indices") or {}
        # The model's own setting is the truth; the run's config is the fallback for
        # models saved before the constraint existed.
        bound = config["lipschitz"] if "lipschitz" in config else recipe.get("lipschitz")
        image_shape = [int(d) for d in model.image_shape]
        return cls(
            name=name,
            source=source,
            dataset=dataset,
            image_shape=image_shape,
            num_classes=int(model.num_classes),
            multi_label=bool(model.multi_label),
            class_names=class_names_for(dataset, int(model.num_classes)),
            recipe=recipe or None,
            variant=recipe.get("variant"),
            architecture={"class_name": type(model).__name__, "config": config},
            coupling=float(config.get("coupling", recipe.get("coupling", 0.0))),
            # The run's flag says whether --spectral-norm was on.
            constraint={"lipschitz": bound, "spectral_norm": recipe.get("spectral_norm")},
            parameters=int(sum(math.prod(v.shape) for v in model.trainable_variables)),
            effective_parameters=eval_indices.get("effective_parameters"),
            metrics=_final_metrics(metrics, evaluation),
            indices=_index_summary(eval_indices, evaluation.get("examples")),
            occlusion_auc=(evaluation.get("occlusion") or {}).get("auc"),
            signatures=savedmodel.signature_summary(image_shape, int(model.num_classes)),
            probabilities="sigmoid" if model.multi_label else "softmax",
            lipschitz=_lipschitz_summary(eval_indices.get("lipschitz")),
        )

    @classmethod
    def from_run_dir(cls, run_dir, model=None):
        """The card of a finished training run (``config.json``, ``metrics.json``, ``eval.json``).

        Args:
            run_dir: the run directory.
            model: the run's model if already loaded; else its ``model.keras``
                is loaded.

        Raises:
            ModelNotFound: the run has no ``model.keras`` (and no ``model`` was given).
            IntegrityError: one of the JSON files exists but cannot be read.
        """
        if model is None:
            from iterconv_keras.models.saving import load_keras

            model = load_keras(os.path.join(run_dir, MODEL_FILE))
        return cls.from_model(
            model,
            recipe=read_json_if_present(os.path.join(run_dir, CONFIG_FILE)),
            metrics=read_json_if_present(os.path.join(run_dir, METRICS_FILE)),
            evaluation=read_json_if_present(os.path.join(run_dir, EVAL_FILE)),
            source=os.path.abspath(run_dir),
        )

    @classmethod
    def from_json(cls, document):
        """The card of a ``metadata.json`` document (a dict).

        Keys this version does not know are kept in `extra`; missing keys are None.

        Raises:
            ValueError: ``document`` is not a JSON object, or was written by a
                newer card schema.
        """
        if not isinstance(document, dict):
            raise ValueError(f"a model card is a JSON object, got {type(document).__name__}: {document!r:.80}")
        schema = document.get("schema", CARD_SCHEMA)
        if not isinstance(schema, int) or schema > CARD_SCHEMA:
            raise ValueError(f"model card schema must be an integer <= {CARD_SCHEMA}, got {schema!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in document.items() if k in known}
        if values.get("metrics") is None:
            values["metrics"] = {}
        return cls(**values, extra={k: v for k, v in document.items() if k not in known})

    @classmethod
    def read(cls, path):
        """The card stored at ``path`` (a version's ``metadata.json``).

        Raises:
            IntegrityError: the file is missing, not JSON or not a card; the
                message names the file.
        """
        if not os.path.isfile(path):
            raise IntegrityError(f"cannot read the model card {path}: the file does not exist")
        try:
            return cls.from_json(read_json_if_present(path))
        except ValueError as exc:
            raise IntegrityError(f"cannot read the model card {path}: {exc}") from exc

    # -- output

    def to_json(self):
        """The card as a JSON document (a dict; `from_json` reads it back equal)."""
        document = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **document}

    def replace(self, **changes):
        """A copy with ``changes`` applied (the card itself is immutable)."""
        return dataclasses.replace(self, **changes)

    def setting(self, key):
        """A training setting of the recipe (``clutter_digits``, ``data_dir``, ...), or None."""
        return (self.recipe or {}).get(key)

    def summary(self):
        """``(label, value)`` rows for a human-readable view (``iterconv zoo show``)."""
        indices = self.indices or {}
        bound = (self.constraint or {}).get("lipschitz")
        projection = self.projection or {}
        rows = [
            ("created", self.created),
            ("source", self.source),
            ("dataset", self.dataset),
            ("variant", self.variant),
            ("image shape", "x".join(map(str, self.image_shape or [])) or None),
            ("classes", f"{self.num_classes} ({self.probabilities})"),
            ("coupling", self.coupling),
            ("lipschitz bound", bound),
            ("certified Lip(f), max", (self.lipschitz or {}).get("max_certified")),
            ("projected at export", _projection_text(projection) if projection else None),
            ("parameters", self.parameters),
            ("effective parameters", self.effective_parameters),
            *((f"test {k}", v) for k, v in self.metrics.items()),
            # The indices may come from an evaluation on other images than the test metrics.
            ("evaluation examples", indices.get("examples")),
            *((f"{k} index", indices.get(k)) for k in ("recurrence", "divergence", "convergence")),
            ("occlusion AUC", self.occlusion_auc),
            ("recipe", ", ".join(f"{k}={v}" for k, v in sorted(self.recipe.items())) if self.recipe else None),
            ("libraries", ", ".join(f"{k} {v}" for k, v in (self.libraries or {}).items()) or None),
        ]
        return rows


def library_versions():
    """Versions of the libraries that write an export (for reproducibility)."""
    import platform

    import keras
    import numpy
    import tensorflow as tf

    import iterconv_keras

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "iterconv": iterconv_keras.__version__,
    }


def _final_metrics(metrics, evaluation):
    # The training runner's test metrics first; an eval document fills what is missing.
    result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("accuracy", "loss"):
        if key not in result and isinstance(evaluation.get(key), (int, float)):
            result[key] = evaluation[key]
    return result


def _index_summary(eval_indices, examples):
    # The card keeps the index numbers and how many images they were measured on.
    summary = {k: eval_indices[k] for k in _INDEX_KEYS if k in eval_indices}
    if summary and isinstance(examples, int) and not isinstance(examples, bool):
        summary["examples"] = examples
    return summary or None


def _lipschitz_summary(lipschitz):
    # The evaluation's per-block certified bounds, with their maximum for a one-number view.
    if not isinstance(lipschitz, dict):
        return None
    summary = dict(lipschitz)
    values = [v for v in _flatten(summary.get("certified")) if isinstance(v, (int, float))]
    if values and "max_certified" not in summary:
        summary["max_certified"] = max(values)
    return summary


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _projection_text(projection):
    return (f"conv norms {projection.get('max_conv_norm_before'):.4g} -> {projection.get('max_conv_norm_after'):.4g}"
            f" (per-conv bound {projection.get('per_conv_bound'):.4g})")
