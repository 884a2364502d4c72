"""Training runs: a run directory, resumable checkpoints, history, final model.

A run directory holds

    config.json          every setting, written before training starts
    history.json         per-epoch metrics, rewritten after every epoch
    checkpoints/epoch-N/ model.keras (weights + optimizer state) and state.json,
                         each epoch written to a temporary folder and renamed
                         into place, so a kill at any moment leaves the last
                         complete epoch intact
    model.keras          the final model
    metrics.json         test-set loss and accuracy of the final model

``train(config)`` starts a run; ``train(config, resume=True)`` continues the
one in ``config.out`` from its last complete epoch. Every batch (its images,
order and augmentation) is a function of (seed, epoch, step) (see
`iterconv_keras.data.pipeline`), so a resumed run sees the same batches as an
uninterrupted one.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras

from iterconv_keras.errors import IntegrityError, IterconvError, UsageError
from iterconv_keras.fsutil import check_writable, read_json_if_present, write_json_atomic
from iterconv_keras.models import coupling as coupling_lib

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
DEFAULT_LIPSCHITZ = 0.9
DEFAULT_CONTRACTIVE_LIPSCHITZ = 0.5
SCHEDULES = ("constant", "cosine")
BLOCK_INITS = ("tied", "independent")  # IterativeResNet's block_init
# Settings added after 0.1, with the value that reproduces what a config.json written
# before them meant (fixed data, no augmentation, tied blocks).
_PRE_0_2_VALUES = {"fresh_data": False, "augment": False, "block_init": "tied"}
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


class TrainingDiverged(IterconvError):
    """The loss became NaN or infinite (exit 1); the last good checkpoint is kept."""

    exit_code = 1


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (saved as ``config.json``).

    Args:
        dataset: dataset name (see `iterconv_keras.data.datasets.DATASET_NAMES`).
        variant: architecture name (see `iterconv_keras.models.variants`).
        coupling: soft gradient coupling strength lambda in [0, 1].
        spectral_norm: constrain the residual functions to Lip(f) <= lipschitz. Also
            switched on by `validate` whenever a bound is given or needed (``lipschitz``
            set, a variant that carries one, the contractive residual form): a bound is
            never recorded without being applied.
        lipschitz: the bound c > 0, or None: `DEFAULT_LIPSCHITZ` (the variant's bound
            if it has one; `DEFAULT_CONTRACTIVE_LIPSCHITZ` for contractive blocks) when
            the constraint is on, None when it is off.
        residual_form: ``"plain"`` or ``"contractive"`` (``x <- (1 - alpha) x + alpha g(x)``
            with Lip(g) <= c < 1), or None: the variant's (plain unless it says otherwise).
        alpha: the contractive form's step in (0, 1], or None: the variant's, else 0.5.
            Refused for the plain form.
        epochs: number of epochs (> 0).
        batch_size: images per step (> 0).
        lr: peak learning rate (> 0).
        optimizer: one of `OPTIMIZERS` (``momentum`` is SGD with momentum 0.9).
        weight_decay: decoupled weight decay (>= 0); 0 with ``optimizer="adamw"``
            means AdamW's customary 1e-4 (0 for the other optimizers means none).
        schedule: learning-rate schedule, ``cosine`` (decays to 0 over the run)
            or ``constant``.
        train_size: training images (None: the dataset's default).
        validation_size: validation images (None: the dataset's default).
        test_size: test images for the final evaluation (None: the whole test set,
            or 5,000 generated Digitclutter or debris images).
        clutter_digits: digits per image for Digitclutter (2..5).
        debris_fragments: digit fragments per image for ``digitdebris`` (10, 30 or 50;
            default 10), after Spoerer, McClure & Kriegeskorte (2017).
        fresh_data: generated datasets only: train on ``train_size`` new images every
            epoch, generated from a seed that is a function of (seed, epoch), instead
            of one fixed set. None (default) means on for Digitclutter and debris: a
            generator gives unlimited data at ~5 % of the train step's cost, and a fixed
            20k set is memorised (train 0.76 vs validation 0.655 exact-set accuracy
            after 5 epochs, issue 16). Refused for file datasets.
        augment: random translation (zero padding and cropping, see
            `datasets.AUGMENT_PADS`) and horizontal flip of the training images,
            seeded by (seed, epoch, step). None (default) means on for Fashion-MNIST
            and CIFAR, off otherwise; refused for MNIST and the generated datasets,
            where flips change digits.
        block_init: ``"tied"`` (default, every block of a stage starts as block 0) or
            ``"independent"`` (a conventional ResNet), see `IterativeResNet`.
        seed: seeds initialisation and data order (and fresh data, augmentation).
        data_dir: folder searched first for dataset files.
        jit_compile: compile the train step with XLA.
        out: the run directory.
    """

    dataset: str = "digitclutter"
    variant: str = "small"
    coupling: float = 0.0
    spectral_norm: bool = False
    lipschitz: float | None = None
    residual_form: str | None = None
    alpha: float | None = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.002
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    train_size: int | None = None
    validation_size: int | None = None
    test_size: int | None = None
    clutter_digits: int = 3
    debris_fragments: int = 10
    fresh_data: bool | None = None
    augment: bool | None = None
    block_init: str = "tied"
    seed: int = 0
    data_dir: str | None = None
    jit_compile: bool = False
    out: str | None = None

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting; return self.

        Settings left None (``fresh_data``, ``augment``) are resolved to the
        dataset's default here, so the stored config says what the run did.
        """
        from iterconv_keras.data import datasets, debris
        from iterconv_keras.models import variants

        if self.dataset not in datasets.DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(datasets.DATASET_NAMES)}")
        row = variants.variant_kwargs(self.variant)
        self.coupling = coupling_lib.validate_strength(self.coupling)
        self._resolve_block_settings(row)
        _require(_is_int(self.epochs) and self.epochs > 0, f"epochs must be an integer > 0, got {self.epochs!r}")
        _require(_is_int(self.batch_size) and self.batch_size > 0,
                 f"batch_size must be an integer > 0, got {self.batch_size!r}")
        _require(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
                 f"lr must be a number > 0, got {self.lr!r}")
        _require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
                 f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _require(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.train_size is None or (_is_int(self.train_size) and self.train_size > 0),
                 f"train_size must be an integer > 0, got {self.train_size!r}")
        _require(self.validation_size is None or (_is_int(self.validation_size) and self.validation_size >= 0),
                 f"validation_size must be an integer >= 0, got {self.validation_size!r}")
        _require(self.test_size is None or (_is_int(self.test_size) and self.test_size > 0),
                 f"test_size must be an integer > 0, got {self.test_size!r}")
        _require(_is_int(self.clutter_digits) and 2 <= self.clutter_digits <= 5,
                 f"clutter_digits must be 2..5, got {self.clutter_digits!r}")
        debris.validate_fragments(self.debris_fragments, "debris_fragments")
        _require(self.block_init in BLOCK_INITS, f"block_init must be one of {BLOCK_INITS}, got {self.block_init!r}")
        _require(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        self._resolve_data_options(datasets)
        return self

    def _resolve_data_options(self, datasets):
        generated = self.dataset in datasets.GENERATED_NAMES
        augmentable = self.dataset in datasets.AUGMENT_PADS
        if self.fresh_data is None:
            self.fresh_data = generated
        if self.augment is None:
            self.augment = augmentable
        _require(isinstance(self.fresh_data, bool), f"fresh_data must be true or false, got {self.fresh_data!r}")
        _require(isinstance(self.augment, bool), f"augment must be true or false, got {self.augment!r}")
        _require(not self.fresh_data or generated,
                 f"fresh_data needs a generated dataset ({', '.join(datasets.GENERATED_NAMES)}); "
                 f"dataset {self.dataset!r} is a fixed set of files")
        _require(not self.augment or augmentable,
                 f"augment (translation and horizontal flip) is not available for dataset {self.dataset!r}: "
                 f"flips change digits; it is for {', '.join(datasets.AUGMENT_PADS)}")

    def _resolve_block_settings(self, row):
        """Fill the constraint and residual-form settings from the variant row; refuse contradictions."""
        from iterconv_keras.models import blocks

        if self.residual_form is None:
            self.residual_form = row.get("residual_form", "plain")
        _require(self.residual_form in blocks.RESIDUAL_FORMS,
                 f"residual_form must be one of {blocks.RESIDUAL_FORMS}, got {self.residual_form!r}")
        contractive = self.residual_form == "contractive"
        if self.lipschitz is not None or row.get("lipschitz") is not None or contractive:
            self.spectral_norm = True
        if not self.spectral_norm:
            _require(self.alpha is None, f"alpha applies to residual_form 'contractive' only, got alpha={self.alpha!r}")
            return
        if self.lipschitz is None:
            self.lipschitz = row.get("lipschitz", DEFAULT_CONTRACTIVE_LIPSCHITZ if contractive else DEFAULT_LIPSCHITZ)
        _require(isinstance(self.lipschitz, (int, float)) and not isinstance(self.lipschitz, bool)
                 and math.isfinite(self.lipschitz) and self.lipschitz > 0,
                 f"lipschitz must be a number > 0, got {self.lipschitz!r}")
        if contractive and self.alpha is None:
            self.alpha = row.get("alpha", blocks.DEFAULT_ALPHA)
        self.residual_form, self.alpha = blocks.validate_residual_form(self.residual_form, self.alpha, self.lipschitz)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"config has unknown settings {unknown}")
        values = {**_PRE_0_2_VALUES, **values}
        if "residual_form" not in values and not values.get("spectral_norm"):
            # Configs written before 0.2 record a lipschitz value (the default 0.9, or an
            # ignored --lipschitz) for unconstrained runs; it was never applied.
            values["lipschitz"] = None
        return cls(**values)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition, message):
    if not condition:
        raise ValueError(message)


# -- run directory -------------------------------------------------------------


def default_run_dir(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sn = f"-sn{config.lipschitz:g}" if config.spectral_norm else ""
    if config.residual_form == "contractive":
        sn += f"-a{config.alpha:g}"
    init = "-indep" if config.block_init == "independent" else ""
    return os.path.join(
        "runs", f"{stamp}-{config.dataset}-{config.variant}-l{config.coupling:g}{sn}{init}-s{config.seed}"
    )


def check_new_run_dir(out):
    """Raise `UsageError` unless ``out`` is absent or an empty directory."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"output {out} already exists and is not empty; choose another --out or pass --resume")
    try:
        check_writable(os.path.join(out, CONFIG_FILE))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def create_run_dir(config):
    """Create the run directory and write ``config.json`` (before any training)."""
    try:
        os.makedirs(config.out, exist_ok=True)
        write_json_atomic(os.path.join(config.out, CONFIG_FILE), config.to_dict())
    except OSError as exc:
        raise UsageError(f"cannot write the run directory {config.out}: {exc.strerror or exc}") from exc


def load_run_config(out):
    """The `TrainConfig` stored in run directory ``out``.

    Raises:
        UsageError: ``out`` is not a run directory or its config is unreadable.
    """
    path = os.path.join(out, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {out} is not a run directory (no {CONFIG_FILE})")
    try:
        with open(path) as f:
            config = TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from exc
    config.out = out
    return config.validate()


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def checkpoint_epochs(out):
    """Completed epochs that have a complete checkpoint, ascending."""
    folder = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    epochs = []
    for name in os.listdir(folder):
        if name.startswith("epoch-") and name[6:].isdigit():
            path = os.path.join(folder, name)
            if os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, "state.json")):
                epochs.append(int(name[6:]))
    return sorted(epochs)


def _checkpoint_path(out, epoch):
    return os.path.join(out, CHECKPOINT_DIR, f"epoch-{epoch:04d}")


def save_checkpoint(model, out, epoch, history):
    """Write ``checkpoints/epoch-<epoch>`` atomically and prune old ones."""
    folder = os.path.join(out, CHECKPOINT_DIR)
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
    try:
        os.chmod(tmp, 0o755)
        model.save(os.path.join(tmp, MODEL_FILE))
        write_json_atomic(os.path.join(tmp, "state.json"), {"epochs_completed": epoch, "history": history})
        _fault_point(f"checkpoint:{epoch}")
        _fsync_dir(tmp)
        final = _checkpoint_path(out, epoch)
        _remove(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        _remove(tmp)
        raise
    for old in checkpoint_epochs(out)[:-KEEP_CHECKPOINTS]:
        _remove(_checkpoint_path(out, old))


FAULT_ENV = "ITERCONV_FAULT"


def _fault_point(name):
    """Kill this process with SIGKILL when ``$ITERCONV_FAULT`` names this point.

    Fault injection for the crash tests (``tests/test_faults.py``): it lets a
    test kill training at an exact moment, such as between writing a checkpoint
    and renaming it into place, which a timer cannot hit reliably.
    """
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale_temporaries(out):
    """Remove temporary folders a killed run left behind."""
    folder = os.path.join(out, CHECKPOINT_DIR)
    for parent in (out, folder):
        if os.path.isdir(parent):
            for name in os.listdir(parent):
                if name.startswith(".tmp-"):
                    _remove(os.path.join(parent, name))


# -- model and optimizer ------------------------------------------------------------


def build_and_compile(config, splits, steps_per_epoch):
    """Build the variant for ``splits`` and compile it as ``config`` says."""
    from iterconv_keras.models import variants

    keras.utils.set_random_seed(config.seed)
    overrides = {
        "coupling": config.coupling,
        "multi_label": splits.multi_label,
        "input_mean": splits.mean,
        "input_std": splits.std,
        "block_init": config.block_init,
    }
    if config.spectral_norm:
        overrides["lipschitz"] = config.lipschitz
    if config.residual_form is not None:
        overrides.update(residual_form=config.residual_form, alpha=config.alpha)
    model = variants.build_model(config.variant, splits.input_shape, splits.num_classes, **overrides)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=make_loss(splits.multi_label),
        metrics=[make_accuracy(splits.multi_label)],
        jit_compile=config.jit_compile,
    )
    return model


def make_optimizer(config, steps_per_epoch):
    lr = config.lr
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * steps_per_epoch)
    wd = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, weight_decay=wd)
    if config.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=0.9, weight_decay=wd)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=wd)
    return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay or 1e-4)


def make_loss(multi_label):
    if multi_label:
        return keras.losses.BinaryCrossentropy(from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_accuracy(multi_label):
    """Accuracy named ``accuracy`` in both cases: exact-set accuracy for clutter."""
    from iterconv_keras.models.metrics import ExactSetAccuracy

    if multi_label:
        return ExactSetAccuracy(name="accuracy")
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


# -- the run ------------------------------------------------------------------------


def train(config, *, resume=False, log=None):
    """Train (or resume) a run and return its summary.

    Args:
        config: a `TrainConfig`; ``config.out`` None picks ``runs/<stamp>-...``.
        resume: continue the run in ``config.out`` from its last complete epoch
            (settings are read from its ``config.json``).
        log: callable taking a line of progress text (default: print to stderr).

    Returns:
        dict with ``run_dir``, ``config``, ``epochs_completed``, ``history`` (per
        epoch: metrics, ``seconds`` wall and ``cpu_seconds`` process CPU time),
        ``test`` (loss, accuracy, examples), and ``wall_seconds`` / ``cpu_seconds``
        of this call (a resumed run counts only the resumed part).

    Raises:
        UsageError, DatasetNotAvailable, TrainingDiverged.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = (time.perf_counter(), time.process_time())
    config.validate()
    if config.out is None:
        if resume:
            raise UsageError("--resume needs --out RUN_DIR")
        config.out = default_run_dir(config)
    if resume:
        config = load_run_config(config.out)
    else:
        check_new_run_dir(config.out)

    from iterconv_keras.data import datasets, pipeline

    # Data before the run directory: a missing dataset must leave nothing behind.
    splits = datasets.load(
        config.dataset, data_dir=config.data_dir, train_size=config.train_size,
        validation_size=config.validation_size, test_size=config.test_size,
        seed=config.seed, clutter_digits=config.clutter_digits, debris_fragments=config.debris_fragments,
        fresh_data=config.fresh_data,
    )
    # Also before the run directory: a run that cannot take one step must not leave
    # a config.json that neither a new run nor --resume can get past.
    steps = pipeline.steps_per_epoch(len(splits.x_train), config.batch_size)
    if resume:
        clean_stale_temporaries(config.out)
    else:
        create_run_dir(config)
    log(f"run directory: {config.out}")
    log(f"dataset {splits.name}: {len(splits.x_train)} train{' (new every epoch)' if config.fresh_data else ''}, "
        f"{len(splits.x_val)} validation, {len(splits.x_test)} test images of shape {splits.input_shape} "
        f"({splits.source}){_augment_note(config)}")

    done, history, model = _restore_or_build(config, splits, steps, resume, log)
    if done < config.epochs:
        dataset = training_dataset(config, splits, steps, initial_epoch=done)
        validation = pipeline.evaluation_batches(splits.x_val, splits.y_val) if len(splits.x_val) else None
        guard = _FiniteLossGuard()
        recorder = _EpochRecorder(config.out, history, guard)
        model.fit(
            dataset, epochs=config.epochs, initial_epoch=done, steps_per_epoch=steps,
            validation_data=validation, callbacks=[guard, recorder], verbose=_verbosity(), shuffle=False,
        )
        if guard.failure:
            raise TrainingDiverged(
                f"loss became {guard.failure['loss']} at epoch {guard.failure['epoch'] + 1}, step "
                f"{guard.failure['step'] + 1}; the last good checkpoint "
                f"(epoch {len(history)}) is kept in {config.out}/{CHECKPOINT_DIR}"
            )
    elif model.lipschitz is not None:
        # Killed after the last checkpoint but before model.keras: the projection that
        # ends fit (IterativeResNet.fit) never ran on these weights.
        from iterconv_keras.models import lipschitz

        lipschitz.enforce(model)
    test = evaluate_test(model, splits)
    _save_final(model, config, history, test)
    log(f"test: loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f} on {test['examples']} images")
    return {
        "run_dir": config.out,
        "config": config.to_dict(),
        "epochs_completed": len(history),
        "history": history,
        "test": test,
        "wall_seconds": round(time.perf_counter() - started[0], 3),
        "cpu_seconds": round(time.process_time() - started[1], 3),
    }


def training_dataset(config, splits, steps, *, initial_epoch):
    """The batches of epochs ``initial_epoch .. config.epochs - 1``: fresh, augmented or plain."""
    from iterconv_keras.data import datasets, pipeline

    if config.fresh_data:
        import tensorflow as tf

        label_dtype = tf.float32 if splits.multi_label else tf.int64
        return pipeline.fresh_training_batches(
            splits.train_stream, batch_size=config.batch_size, steps=steps, initial_epoch=initial_epoch,
            epochs=config.epochs, image_shape=splits.input_shape,
            label_spec=(tuple(splits.y_train.shape[1:]), label_dtype),
        )
    pad = datasets.AUGMENT_PADS[config.dataset] if config.augment else None
    dataset, _ = pipeline.training_batches(
        splits.x_train, splits.y_train, batch_size=config.batch_size, seed=config.seed,
        initial_epoch=initial_epoch, epochs=config.epochs, augment_pad=pad,
    )
    return dataset


def _augment_note(config):
    from iterconv_keras.data import datasets

    if not config.augment:
        return ""
    return f"; augmented: translation by up to {datasets.AUGMENT_PADS[config.dataset]} px and horizontal flips"


def _verbosity():
    return 1 if sys.stdout.isatty() or sys.stderr.isatty() else 2


def _restore_or_build(config, splits, steps, resume, log):
    """Return (epochs completed, history, compiled model), from a checkpoint if any."""
    model = build_and_compile(config, splits, steps)
    epochs = checkpoint_epochs(config.out) if resume else []
    if not epochs:
        return 0, [], model
    path = _checkpoint_path(config.out, epochs[-1])
    state_path = os.path.join(path, "state.json")
    state = read_json_if_present(state_path)
    if not {"epochs_completed", "history"} <= set(state):
        raise IntegrityError(f"checkpoint state {state_path} is missing or incomplete")
    restore_training_state(model, os.path.join(path, MODEL_FILE))
    log(f"resuming after epoch {state['epochs_completed']} from {path}")
    return state["epochs_completed"], state["history"], model


def restore_training_state(model, path):
    """Load weights and optimizer state saved by `save_checkpoint` into ``model``."""
    import iterconv_keras.models.metrics  # noqa: F401  (registers ExactSetAccuracy)

    try:
        saved = keras.saving.load_model(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same integrity error
        raise IntegrityError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for target, source in zip(model.weights, saved.weights, strict=True):
        target.assign(source)
    model.optimizer.build(model.trainable_variables)
    for target, source in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        target.assign(source)


def evaluate_test(model, splits):
    from iterconv_keras.data import pipeline

    results = model.evaluate(
        pipeline.evaluation_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True
    )
    return {
        "dataset": splits.name,
        "split": "test",
        "examples": int(len(splits.x_test)),
        "loss": float(results["loss"]),
        "accuracy": float(results["accuracy"]),
    }


def _save_final(model, config, history, test):
    tmp = os.path.join(config.out, ".tmp-final.keras")
    model.save(tmp)
    os.replace(tmp, os.path.join(config.out, MODEL_FILE))
    write_json_atomic(os.path.join(config.out, METRICS_FILE), test)
    write_json_atomic(os.path.join(config.out, HISTORY_FILE), history)


class _FiniteLossGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss and remember where it happened."""

    def __init__(self):
        super().__init__()
        self.failure = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.failure = {"epoch": self._epoch, "step": batch, "loss": float(loss)}
            self.model.stop_training = True


class _EpochRecorder(keras.callbacks.Callback):
    """Append each epoch's metrics to the history and checkpoint the run."""

    def __init__(self, out, history, guard):
        super().__init__()
        self.out = out
        self.history = history
        self.guard = guard
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failure is not None:
            return
        entry = {
            "epoch": epoch + 1,
            "seconds": round(time.perf_counter() - self._start[0], 3),
            # Process CPU time, all threads: what the epoch cost on a shared machine.
            "cpu_seconds": round(time.process_time() - self._start[1], 3),
        }
        entry.update({k: float(v) for k, v in (logs or {}).items()})
        self.history.append(entry)
        save_checkpoint(self.model, self.out, epoch + 1, self.history)
        write_json_atomic(os.path.join(self.out, HISTORY_FILE), self.history)
