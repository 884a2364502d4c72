"""Evaluate a model: accuracy, indices of iterative convergence, occlusion robustness.

The Python API behind ``iterconv eval`` (notebooks get the same document):

    >>> from iterconv_keras import datasets, evaluation
    >>> splits = datasets.load("digitclutter")
    >>> report = evaluation.evaluate(model, splits, limit=1000)
    >>> report["indices"]["recurrence"], report["occlusion"]["auc"]

The returned dict is the ``iterconv eval --json`` document described in docs/indices.md
(``split``, ``examples``, ``accuracy``, ``loss``, ``indices``, ``occlusion``;
``model`` and ``dataset`` when given), with NaN (undefined) values as None.
See ``docs/indices.md`` for every number's definition (Lippl, Peters &
Kriegeskorte, PLoS One 19(3): e0293440, 2024; our operationalisation).
"""

import dataclasses
import math

import numpy as np

from iterconv_keras.analysis import indices as indices_lib
from iterconv_keras.analysis import occlusion as occlusion_lib
from iterconv_keras.analysis.programs import StagePrograms


@dataclasses.dataclass
class EvalData:
    """The examples an evaluation runs on.

    Attributes:
        x: images ``[N, H, W, C]``, uint8 or float in [0, 1].
        y: labels ``[N]`` or multi-hot ``[N, K]``.
        num_classes: K.
        multi_label: True for multi-hot labels (Digitclutter).
        mean: per-channel mean in [0, 1] units (the occlusion fill).
        name: dataset name, or None.
        split: which split ``x`` is (``"test"``).
        info: where the examples come from (the dataset's ``info``), or None.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    multi_label: bool
    mean: tuple
    name: str = None
    split: str = "test"
    info: dict = None


def as_eval_data(data, *, num_classes=None, multi_label=None, mean=None, name=None, split="test"):
    """Wrap a `datasets.DatasetSplits` (its test split) or an ``(x, y)`` pair as `EvalData`.

    For arrays, ``multi_label`` defaults to ``y.ndim == 2``, ``num_classes`` to
    ``y.shape[1]`` or ``max(y) + 1`` and ``mean`` to the images' own mean.
    """
    if isinstance(data, EvalData):
        return data
    if hasattr(data, "x_test"):
        return EvalData(data.x_test, data.y_test, data.num_classes, data.multi_label, tuple(data.mean),
                        data.name, "test", data.info)
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError(f"data must be DatasetSplits or an (images, labels) pair, got {type(data).__name__}") from None
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"need images [N, H, W, C] and labels [N] or [N, K], got shapes {x.shape} and {y.shape}")
    multi = bool(y.ndim == 2) if multi_label is None else bool(multi_label)
    if num_classes is None:
        num_classes = int(y.shape[1]) if y.ndim == 2 else int(y.max()) + 1
    if mean is None:
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        mean = tuple(float(m) for m in x.reshape(-1, x.shape[-1]).mean(axis=0) / scale)
    return EvalData(x, y, num_classes, multi, tuple(mean), name, split)


def check_compatible(model, data):
    """Raise ValueError when ``model`` cannot be evaluated on ``data`` (an `EvalData`).

    Compares image shape, number of classes and single- vs multi-label outputs,
    naming both sides.
    """
    image_shape = tuple(int(d) for d in data.x.shape[1:])
    problems = []
    if tuple(model.image_shape) != image_shape:
        problems.append(f"the model takes images of shape {tuple(model.image_shape)} but the dataset has {image_shape}")
    if model.num_classes != data.num_classes:
        problems.append(f"the model has {model.num_classes} outputs but the dataset has {data.num_classes} classes")
    if bool(model.multi_label) != bool(data.multi_label):
        kinds = {True: "multi-label (sets of classes)", False: "single-label"}
        problems.append(
            f"the model is {kinds[bool(model.multi_label)]} but the dataset is {kinds[bool(data.multi_label)]}"
        )
    if problems:
        name = data.name or "the dataset"
        raise ValueError(f"model and dataset {name!r} do not fit: " + "; ".join(problems))


def evaluate(
    model,
    data,
    *,
    indices=True,
    occlusion=True,
    limit=None,
    batch_size=256,
    extra_iterations=indices_lib.DEFAULT_EXTRA_ITERATIONS,
    tolerance=indices_lib.DEFAULT_TOLERANCE,
    levels=occlusion_lib.DEFAULT_LEVELS,
    occlusion_seed=occlusion_lib.DEFAULT_SEED,
    clutter=None,
    debris=None,
    jit_compile=False,
    progress=None,
    model_reference=None,
):
    """Evaluate ``model`` on the test split: the ``iterconv eval`` document.

    Args:
        model: an `IterativeResNet`.
        data: `datasets.DatasetSplits` (its test split is used), `EvalData`, or
            an ``(images, labels)`` pair.
        indices: bool, compute the indices of iterative convergence. Default True.
        occlusion: bool, compute occlusion robustness. Default True.
        limit: optional int, evaluate the first ``limit`` test examples only.
        batch_size: examples per compiled call. Default 256.
        extra_iterations: K of the divergence index (K_max for convergence).
        tolerance: RI skip tolerance in nats (see `indices.compute_indices`).
        levels: occlusion levels, starting with 0.0.
        occlusion_seed: seed of the occlusion masks. Default 0.
        clutter: bool, add the 2..5-digit clutter sweep; default: when the data
            are Digitclutter (not for its debris variant, a single-label task).
        debris: bool, add the 10/30/50-fragment debris sweep; default: when the
            data are ``digitdebris``.
        jit_compile: compile the model pieces with XLA. Default False (see `StagePrograms`).
        progress: optional callable ``progress(done, total)`` in batches.
        model_reference: optional string stored under ``"model"``.

    Returns:
        dict described in docs/indices.md; absent sections were not requested.

    Example:
        >>> import iterconv_keras as ick
        >>> from iterconv_keras.data import datasets
        >>> model = ick.load_model("digitclutter-small")
        >>> report = ick.evaluate(model, datasets.load("digitclutter"), limit=1000)
        >>> report["indices"]["recurrence"], report["occlusion"]["auc"]

    Raises:
        ValueError: the model and the data do not fit (shape, classes, labels),
            or bad arguments.
    """
    # Every setting is checked before the first batch: a bad level must not cost the index suite.
    extra_iterations = indices_lib.validate_extra_iterations(extra_iterations)
    levels = occlusion_lib.validate_levels(levels)
    if not float(tolerance) >= 0.0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    data = as_eval_data(data)
    check_compatible(model, data)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        data = dataclasses.replace(data, x=data.x[:limit], y=data.y[:limit])
    clutter = data.name == "digitclutter" if clutter is None else bool(clutter)
    debris = data.name == "digitdebris" if debris is None else bool(debris)
    n = int(data.x.shape[0])
    batch_size = min(batch_size, n)
    tracker = _Progress(progress, _planned_batches(n, batch_size, indices, occlusion, clutter, debris, levels))
    programs = StagePrograms(model, jit_compile=jit_compile)

    document = {}
    if model_reference is not None:
        document["model"] = model_reference
    if data.name is not None:
        document["dataset"] = data.name
    document.update({"split": data.split, "examples": n})
    if indices:
        result = indices_lib.compute_indices(
            model, data.x, data.y, extra_iterations=extra_iterations, tolerance=tolerance,
            batch_size=batch_size, programs=programs, progress=tracker,
        )
        document.update(accuracy=result["accuracy"], loss=result["loss"], indices=result["indices"])
    if occlusion:
        sweep = occlusion_lib.occlusion_sweep(
            model, data.x, data.y, data.mean, levels=levels, seed=occlusion_seed,
            batch_size=batch_size, programs=programs, progress=tracker,
        )
        section = {"levels": sweep["levels"], "accuracy": sweep["accuracy"], "auc": sweep["auc"], "loss": sweep["loss"]}
        if clutter:
            section["clutter"] = occlusion_lib.clutter_sweep(
                model, n, batch_size=batch_size, programs=programs, progress=tracker
            )
        if debris:
            section["debris"] = occlusion_lib.debris_sweep(
                model, n, batch_size=batch_size, programs=programs, progress=tracker
            )
        section["iterations"] = occlusion_lib.iteration_sweep(
            model, data.x, data.y, data.mean, seed=occlusion_seed, batch_size=batch_size,
            programs=programs, progress=tracker,
        )
        section["settings"] = {"seed": sweep["seed"], "patch_size": sweep["patch_size"], "fill": list(data.mean)}
        document.setdefault("accuracy", sweep["accuracy"][0])
        document.setdefault("loss", sweep["loss"][0])
        document["occlusion"] = section
    if "accuracy" not in document:
        accuracy, loss = programs.accuracy_and_loss(data.x, data.y, batch_size, progress=tracker)
        document.update(accuracy=accuracy, loss=loss)
    # Keep the documented key order: the summary first, then the sections.
    ordered = {k: document[k] for k in ("model", "dataset", "split", "examples", "accuracy", "loss") if k in document}
    ordered.update({k: v for k, v in document.items() if k not in ordered})
    tracker.finish()
    return json_safe(ordered)


def _planned_batches(n, batch_size, indices, occlusion, clutter, debris, levels):
    per_pass = math.ceil(n / batch_size)
    total = per_pass if indices else (0 if occlusion else per_pass)
    if occlusion:
        total += per_pass * len(levels)
        total += per_pass * 2 * len(occlusion_lib.DEFAULT_ITERATIONS)
        if clutter:
            total += per_pass * len(occlusion_lib.CLUTTER_DIGITS)
        if debris:
            total += per_pass * len(occlusion_lib.DEBRIS_FRAGMENTS)
    return total


class _Progress:
    """Adapts ``progress(done, total)`` to the evaluators' ``progress(step)``."""

    def __init__(self, callback, total):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, step):
        self.done += step
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)

    def finish(self):
        if self.callback is not None and self.done < self.total:
            self.callback(self.total, self.total)


def json_safe(value):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_for_model(model, metadata, *, dataset=None, data_dir=None, limit=None):
    """The test data a model is evaluated on (the CLI's dataset defaults), as `EvalData`.

    Occluded patches are filled with the model's own ``input_mean``: the training-set
    mean it normalises its inputs with, so no training set is loaded or generated
    for it (review S5).

    A model whose training recorded a ``test_size`` (``iterconv train
    --test-size N``) is evaluated on that same test subset, so its card's test
    metrics and its indices describe the same images; ``limit`` overrides it
    (the first ``limit`` images of the whole test split), and so does a
    ``dataset`` other than the recorded one. See `recorded_test_size`.

    Args:
        model: the model (its ``multi_label`` decides Digitclutter when nothing else
            does; its ``input_mean`` is the occlusion fill).
        metadata: the run's ``config.json`` or the zoo version's ``metadata.json``
            (whose training settings sit under ``"recipe"``).
        dataset: name overriding the metadata's ``"dataset"``.
        data_dir: folder overriding the metadata's ``"data_dir"``.
        limit: only this many test images are needed (generated sets make only those).

    Returns:
        `EvalData` of the test split.
    """
    from iterconv_keras.data import classes, datasets, generated, sources

    test_size = recorded_test_size(metadata, dataset, limit)
    name = dataset or metadata.get("dataset")
    if name is None:
        if not model.multi_label:
            raise ValueError(
                "the model carries no dataset in its metadata (a bare .keras file?): pass --dataset NAME"
            )
        name = "digitclutter"
    if data_dir is not None and name not in sources.FILE_DATASETS:
        # Generated sets read no files: a folder passed for one would be silently ignored.
        whose = f"dataset {name!r}" if dataset else f"{name!r}, the model's dataset"
        raise ValueError(f"data_dir applies to the file datasets ({', '.join(sources.FILE_DATASETS)}) only, "
                         f"got data_dir {data_dir!r} for {whose}")
    data_dir = data_dir or _setting(metadata, "data_dir")  # a zoo card keeps it under "recipe"
    fill = tuple(float(m) for m in model.input_mean)
    if name in sources.GENERATED_NAMES:
        # The set the model was trained for: its digit or fragment count comes from the metadata.
        digits = int(_setting(metadata, "clutter_digits") or metadata.get("n_digits") or 3)
        fragments = int(_setting(metadata, "debris_fragments") or generated.DEFAULT_DEBRIS_FRAGMENTS)
        data_file = _setting(metadata, "data_file")
        if data_file is not None:
            # A run trained on a data file is tested on that file's test split, carved as in training.
            sizes = {key: _setting(metadata, key) for key in ("train_size", "validation_size", "test_size")}
            splits = datasets.load(name, clutter_digits=digits, debris_fragments=fragments, data_file=data_file,
                                   **sizes)
            return dataclasses.replace(as_eval_data(splits), mean=fill)
        # Generated on demand and prefix-stable: the first `limit` test images are the
        # test split's whatever its size, so only those are made.
        count = limit or test_size or generated.CLUTTER_SIZES["test"]
        if name == "digitclutter":
            x, y, info = generated.clutter_test_set(digits, count)
        else:
            x, y, info = generated.debris_test_set(fragments, count)
        num_classes = len(classes.DATASET_CLASS_NAMES[name])  # the ten digits
        return EvalData(x, y, num_classes, name == "digitclutter", fill, name, "test", info)
    splits = datasets.load(name, data_dir=data_dir, test_size=test_size)  # training's own test subsample
    return dataclasses.replace(as_eval_data(splits), mean=fill)


def recorded_test_size(metadata, dataset=None, limit=None):
    """The ``test_size`` a model's training tested on, if evaluation should use it, else None.

    Args:
        metadata: the run's ``config.json`` or a zoo card (``"recipe"``).
        dataset: the dataset asked for; a different one than the recorded
            dataset gets its whole test split (the run's size says nothing about it).
        limit: the evaluation's ``limit``; given, it overrides the recorded size.
    """
    if limit is not None or (dataset is not None and dataset != metadata.get("dataset")):
        return None
    return _setting(metadata, "test_size")


def _setting(metadata, key):
    """A training setting from a run's config.json or a zoo card's recipe, or None."""
    if metadata.get(key) is not None:
        return metadata[key]
    return (metadata.get("recipe") or {}).get(key)
