"""The run directory: the one module that knows its file names and layout.

A run directory holds

    config.json          every setting (`TrainConfig`), written before training starts
    history.json         per-epoch metrics, rewritten after every epoch
    checkpoints/epoch-N/ model.keras (weights + optimizer state) and state.json,
                         each epoch written to a temporary folder and renamed
                         into place, so a kill at any moment leaves the last
                         complete epoch intact
    model.keras          the final model
    metrics.json         test-set loss and accuracy of the final model
    eval.json            optional: an ``iterconv eval --json`` document

`iterconv_keras.training` fills it, `iterconv_keras.zoo.card` and
`iterconv_keras.loading` read it; both take the names from here. The atomic
checkpoint (write to ``.tmp-*``, fsync, rename) follows the usual
write-then-rename pattern; `clean_stale_temporaries` removes what a kill left.

This module imports no Keras or TensorFlow at module level (``zoo show`` reads
run cards without them): checkpoints are written through the model's own
``save`` and read back by `restore_training_state`, which imports Keras when called.
"""

import json
import os
import shutil
import tempfile
import time

from iterconv_keras.config import TrainConfig
from iterconv_keras.errors import IntegrityError, UsageError
from iterconv_keras.fsutil import check_writable, write_json_atomic

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
# The evaluation document saved beside a run (``iterconv eval --out RUN/eval.json``).
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
KEEP_CHECKPOINTS = 2
_TMP_PREFIX = ".tmp-"


def default_run_dir(config):
    """``runs/<time>-<dataset>-<variant>-l<coupling>[-sn<c>][-a<alpha>][-indep]-s<seed>``."""
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


# Where a run trains, not what it computes (the step is the same on any number of
# replicas, up to the order of floating-point sums): a resume may change them.
PLACEMENT_SETTINGS = ("strategy", "devices")


def check_resume(config, stored, given, spell=None):
    """Refuse a resume whose explicitly given settings differ from the stored run's.

    A resumed run continues with the settings in its ``config.json``; a setting
    given for the resume that says otherwise would be silently dropped, so it is
    refused instead.

    Args:
        config: the validated `TrainConfig` passed for the resume.
        stored: the run's `TrainConfig` (`load_run_config`).
        given: names of the settings the caller chose explicitly (the CLI: the
            options on its command line; the Python API: `explicit_settings`).
            ``out`` and the `PLACEMENT_SETTINGS` are never compared.
        spell: optional ``{name: how the caller spells it}`` for the message
            (the CLI's ``--option`` names); default the setting's name.

    Raises:
        UsageError: naming every differing setting with both values.
    """
    spell = spell or {}
    fields = set(TrainConfig.field_names()) - {"out", *PLACEMENT_SETTINGS}
    differing = [
        f"{spell.get(name, name)} {getattr(config, name)!r} differs from the run's {getattr(stored, name)!r}"
        for name in sorted(set(given) & fields)
        if getattr(config, name) != getattr(stored, name)
    ]
    if differing:
        raise UsageError(f"--resume: {'; '.join(differing)}; a resumed run keeps its settings")


def explicit_settings(config):
    """Names of the settings of an unvalidated ``config`` that differ from `TrainConfig`'s defaults.

    What a Python caller asked for: ``TrainConfig(out=run, coupling=0.5)`` gives
    ``["coupling", "out"]``. Read before `TrainConfig.validate` fills defaults in.
    """
    default = TrainConfig()
    return [name for name in TrainConfig.field_names() if getattr(config, name) != getattr(default, name)]


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
            if os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, STATE_FILE)):
                epochs.append(int(name[6:]))
    return sorted(epochs)


def checkpoint_path(out, epoch):
    """The folder of epoch ``epoch``'s checkpoint (``checkpoints/epoch-NNNN``)."""
    return os.path.join(out, CHECKPOINT_DIR, f"epoch-{epoch:04d}")


def checkpoint_files(path):
    """``(model file, state file)`` of the checkpoint folder ``path``."""
    return os.path.join(path, MODEL_FILE), os.path.join(path, STATE_FILE)


def save_checkpoint(model, out, epoch, history):
    """Write ``checkpoints/epoch-<epoch>`` atomically and prune old ones.

    Everything is written into a temporary folder, synced, then renamed into
    place: a kill before the rename leaves only a ``.tmp-*`` folder that
    `checkpoint_epochs` ignores and `clean_stale_temporaries` removes.
    """
    folder = os.path.join(out, CHECKPOINT_DIR)
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder)
    try:
        os.chmod(tmp, 0o755)
        model_file, state_file = checkpoint_files(tmp)
        model.save(model_file)
        write_json_atomic(state_file, {"epochs_completed": epoch, "history": history})
        _fsync_dir(tmp)
        final = checkpoint_path(out, epoch)
        _remove(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        _remove(tmp)
        raise
    for old in checkpoint_epochs(out)[:-KEEP_CHECKPOINTS]:
        _remove(checkpoint_path(out, old))


def restore_training_state(model, path):
    """Load weights and optimizer state saved by `save_checkpoint` into ``model``."""
    import keras

    import iterconv_keras.models.metrics  # noqa: F401  (registers ExactSetAccuracy)

    try:
        saved = keras.saving.load_model(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same integrity error
        raise IntegrityError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for target, source in zip(model.weights, saved.weights, strict=True):
        target.assign(source)
    with model.distribute_strategy.scope():  # the slots mirror the variables they belong to
        model.optimizer.build(model.trainable_variables)
    for target, source in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        target.assign(source)


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
                if name.startswith(_TMP_PREFIX):
                    _remove(os.path.join(parent, name))


def final_tmp_path(out):
    """Where the final model is written before it is renamed to ``model.keras``."""
    return os.path.join(out, f"{_TMP_PREFIX}final.keras")


def write_final(out, save_model, metrics, history):
    """Write the final ``model.keras`` (atomically, via ``save_model(path)``), ``metrics.json``, ``history.json``."""
    tmp = final_tmp_path(out)
    save_model(tmp)
    os.replace(tmp, os.path.join(out, MODEL_FILE))
    write_json_atomic(os.path.join(out, METRICS_FILE), metrics)
    write_json_atomic(os.path.join(out, HISTORY_FILE), history)


def write_history(out, history):
    """Rewrite ``history.json`` (after every epoch)."""
    write_json_atomic(os.path.join(out, HISTORY_FILE), history)
