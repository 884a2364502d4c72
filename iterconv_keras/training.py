"""Training runs: fit a compiled model resumably, test it, write the run directory.

``train(config)`` starts a run; ``train(config, resume=True)`` continues the
one in ``config.out`` from its last complete epoch. The run directory's layout
and files belong to `iterconv_keras.runs`, the settings to
`iterconv_keras.config`, the compiled model to `iterconv_keras.compiling`.
Every batch (its images, order and augmentation) is a function of (seed,
epoch, step) (see `iterconv_keras.data.pipeline`), so a resumed run sees the
same batches as an uninterrupted one.
"""

import gc
import math
import sys
import time

import keras

from iterconv_keras import compiling, distribution, runs
from iterconv_keras.errors import IntegrityError, IterconvError, UsageError
from iterconv_keras.fsutil import read_json_if_present

__all__ = ["TrainingDiverged", "WorkerLost", "evaluate_test", "train", "training_dataset"]


class TrainingDiverged(IterconvError):
    """The loss became NaN or infinite (exit 1); the last good checkpoint is kept."""

    exit_code = 1


class WorkerLost(IterconvError):
    """A multi-worker run lost another worker (exit 1); every worker resumes with ``--resume``."""

    exit_code = 1


# -- the run ------------------------------------------------------------------------


def train(config, *, resume=False, log=None):
    """Train (or resume) a run and return its summary.

    Args:
        config: a `TrainConfig`; ``config.out`` None picks ``runs/<stamp>-...``.
        resume: continue the run in ``config.out`` from its last complete epoch
            with the settings in its ``config.json``. Settings of ``config`` that
            differ from `TrainConfig`'s defaults must agree with the stored ones
            (`runs.check_resume`): ``TrainConfig(out=run, coupling=0.5)`` on a run
            trained with coupling 0 is refused rather than silently dropped.
        log: callable taking a line of progress text (default: print to stderr).

    Returns:
        dict with ``run_dir`` (the run directory this process wrote; None on a
        multi-worker task other than the chief, which writes none: ``config["out"]``
        is where the chief writes), ``config``, ``epochs_completed``, ``history`` (per
        epoch: metrics, ``seconds`` wall and ``cpu_seconds`` process CPU time),
        ``test`` (loss, accuracy, examples), ``distribution`` (strategy, replicas,
        workers, this process's task, whether it is the chief that writes the run
        directory: `distribution.Placement.describe`) and ``wall_seconds`` /
        ``cpu_seconds`` of this call (a resumed run counts only the resumed part).

    Raises:
        UsageError: bad settings (also one the dataset does not read, such as
            ``clutter_digits`` for Fashion-MNIST: `TrainConfig.check_given_settings_apply`),
            an occupied ``out``, or a resume that changes a setting.
        DatasetNotAvailable, TrainingDiverged.

    Example:
        >>> import iterconv_keras as ick
        >>> summary = ick.train(ick.TrainConfig(coupling=1.0, epochs=10, train_size=100_000, out="runs/rec"))
        >>> summary["test"]["accuracy"]
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = (time.perf_counter(), time.process_time())
    given = runs.explicit_settings(config)
    config.validate()
    if not resume:  # a resume checks what is given against the stored run instead
        config.check_given_settings_apply(given)
    if config.out is None:
        if resume:
            raise UsageError("--resume needs --out RUN_DIR")
        config.out = runs.default_run_dir(config)
    if resume:
        stored = runs.load_run_config(config.out)
        runs.check_resume(config, stored, given)
        for name in runs.PLACEMENT_SETTINGS:  # a resumed run may move to other devices
            if name in given:
                setattr(stored, name, getattr(config, name))
        config = stored.validate()
    elif distribution.writes_run_dir(config.strategy):
        runs.check_new_run_dir(config.out)
    # Before anything runs TensorFlow: logical devices and multi-worker collectives
    # can only be set up before its runtime starts.
    placement = distribution.place(config.strategy, config.devices)
    per_replica = distribution.per_replica_batch(config.batch_size, placement.replicas)

    from iterconv_keras.data import datasets, pipeline

    # Data before the run directory: a missing dataset must leave nothing behind.
    splits = datasets.load(
        config.dataset, data_dir=config.data_dir, train_size=config.train_size,
        validation_size=config.validation_size, test_size=config.test_size,
        seed=config.seed, clutter_digits=config.clutter_digits, debris_fragments=config.debris_fragments,
        fresh_data=config.fresh_data, data_file=config.data_file,
    )
    # Also before the run directory: a run that cannot take one step must not leave
    # a config.json that neither a new run nor --resume can get past.
    steps = pipeline.steps_per_epoch(len(splits.x_train), config.batch_size)
    if 0 < len(splits.x_val) < placement.replicas:
        raise UsageError(f"the validation set has {len(splits.x_val)} image(s), fewer than the {placement.replicas} "
                         f"replicas it is evaluated on; use at least {placement.replicas} or none")
    if placement.chief and resume:
        runs.clean_stale_temporaries(config.out)
    elif placement.chief:
        runs.create_run_dir(config)
    log(f"run directory: {config.out}{'' if placement.chief else ' (written by the chief only)'}")
    log(f"strategy {placement.name}: {placement.replicas} replica(s) of {per_replica} images on "
        f"{placement.workers} worker(s); this process: {placement.task}")
    log(f"dataset {splits.name}: {len(splits.x_train)} train{' (new every epoch)' if config.fresh_data else ''}, "
        f"{len(splits.x_val)} validation, {len(splits.x_test)} test images of shape {splits.input_shape} "
        f"({splits.source}){_augment_note(config)}")
    if config.precision == "mixed_float16" and not _has_gpu():
        log("note: mixed_float16 on a CPU is very slow (no fast float16 convolutions; 0.006x float32 measured, "
            "docs/scaling.md); mixed_bfloat16 is the 16-bit choice for CPUs")

    history, test = _train_here(config, splits, steps, resume, placement, log)
    log(f"test: loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f} on {test['examples']} images")
    return {
        "run_dir": config.out if placement.chief else None,
        "config": config.to_dict(),
        "epochs_completed": len(history),
        "history": history,
        "test": test,
        "distribution": placement.describe(),
        "wall_seconds": round(time.perf_counter() - started[0], 3),
        "cpu_seconds": round(time.process_time() - started[1], 3),
    }


def _train_here(config, splits, steps, resume, placement, log):
    """`_fit_and_test` in this process's run directory; a lost worker becomes `WorkerLost`."""
    try:
        with distribution.run_dir_for_this_task(placement, config.out) as write_dir:
            return _fit_and_test(config, splits, steps, resume, placement, write_dir, log)
    except distribution.COLLECTIVE_FAILURES as exc:
        if placement.workers == 1:
            raise
        lost = distribution.failure_reason(exc)
    # Outside the handler, after collecting what TensorFlow's error held: a thread
    # pool of the strategy left for interpreter exit prints a second error there.
    gc.collect()
    raise WorkerLost(f"{placement.task} lost the other workers ({lost}); restart every worker with --resume "
                     f"--out {config.out}: the run continues from its last complete epoch")


def _fit_and_test(config, splits, steps, resume, placement, write_dir, log):
    """Train the remaining epochs under ``placement``, test, write the run files into ``write_dir``."""
    from iterconv_keras.data import pipeline

    done, history, model = _restore_or_build(config, splits, steps, resume, log, placement.strategy)
    if done < config.epochs:
        dataset = distribution.shard_by_data(training_dataset(config, splits, steps, initial_epoch=done))
        validation = None
        if len(splits.x_val):
            x_val, y_val = evaluation_subset(splits.x_val, splits.y_val, placement.replicas)
            if len(x_val) < len(splits.x_val):
                log(f"validation on the first {len(x_val)} of {len(splits.x_val)} images (a multiple of the "
                    f"{placement.replicas} replicas; the test set is scored whole, on one device)")
            validation = distribution.shard_by_data(
                pipeline.evaluation_batches(x_val, y_val, replicas=placement.replicas)
            )
        guard = _FiniteLossGuard()
        recorder = _EpochRecorder(write_dir, history, guard)
        model.fit(
            dataset, epochs=config.epochs, initial_epoch=done, steps_per_epoch=steps,
            validation_data=validation, callbacks=[guard, recorder], verbose=_verbosity(), shuffle=False,
        )
        if guard.failure:
            raise TrainingDiverged(
                f"loss became {guard.failure['loss']} at epoch {guard.failure['epoch'] + 1}, step "
                f"{guard.failure['step'] + 1}; the last good checkpoint "
                f"(epoch {len(history)}) is kept in {config.out}/{runs.CHECKPOINT_DIR}"
            )
    elif model.lipschitz is not None:
        # Killed after the last checkpoint but before model.keras: the projection that
        # ends fit (IterativeResNet.fit) never ran on these weights.
        from iterconv_keras.models import lipschitz

        lipschitz.enforce(model)
    test = evaluate_test(model, splits)
    runs.write_final(write_dir, model.save, test, history)
    return history, test


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


def _has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _verbosity():
    return 1 if sys.stdout.isatty() or sys.stderr.isatty() else 2


def _restore_or_build(config, splits, steps, resume, log, strategy):
    """Return (epochs completed, history, model compiled under ``strategy``), from a checkpoint if any."""
    with strategy.scope():
        model = compiling.build_and_compile(config, splits, steps)
    epochs = runs.checkpoint_epochs(config.out) if resume else []
    if not epochs:
        return 0, [], model
    path = runs.checkpoint_path(config.out, epochs[-1])
    model_path, state_path = runs.checkpoint_files(path)
    state = read_json_if_present(state_path)
    if not {"epochs_completed", "history"} <= set(state):
        raise IntegrityError(f"checkpoint state {state_path} is missing or incomplete")
    runs.restore_training_state(model, model_path)
    log(f"resuming after epoch {state['epochs_completed']} from {path}")
    return state["epochs_completed"], state["history"], model


def evaluate_test(model, splits):
    """Test loss and accuracy of ``model`` on every test image.

    Under several replicas the model is copied onto one device first: a batch that
    does not split evenly over the replicas (a first batch of 13 images over 2, or a
    last batch of 1 that leaves a replica empty) fails inside Keras, and the test
    metric must count every image once.
    """
    from iterconv_keras.data import pipeline

    if model.distribute_strategy.num_replicas_in_sync > 1:
        model = _one_device_copy(model, splits.multi_label)
    results = model.evaluate(pipeline.evaluation_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True)
    return {
        "dataset": splits.name,
        "split": "test",
        "examples": int(len(splits.x_test)),
        "loss": float(results["loss"]),
        "accuracy": float(results["accuracy"]),
    }


def _one_device_copy(model, multi_label):
    """``model``'s architecture and weights outside its strategy, compiled with the same loss and metric."""
    # Called outside every strategy scope (after fit), so the copy lives on the default device.
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    copy.compile(loss=compiling.make_loss(multi_label), metrics=[compiling.make_accuracy(multi_label)])
    return copy


def evaluation_subset(x, y, replicas):
    """The first ``len(x) - len(x) % replicas`` examples: a set every batch of which splits evenly.

    Validation during training runs under the strategy; a batch that leaves a
    replica empty or uneven fails inside Keras, so up to ``replicas - 1`` images are
    left out of the validation metrics (never out of the test metrics: `evaluate_test`).
    """
    keep = len(x) - len(x) % replicas
    return x[:keep], y[:keep]


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
        runs.save_checkpoint(self.model, self.out, epoch + 1, self.history)
        runs.write_history(self.out, self.history)
