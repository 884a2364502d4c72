"""``iterconv train``: train one model into a run directory."""

import click

from iterconv_cli._common import (
    data_dir_option,
    dataset_option,
    emit_json,
    given_options,
    progress_to_stderr,
    report_errors,
)
from iterconv_keras.config import (  # stdlib only: --help stays instant
    BLOCK_INITS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    TrainConfig,
)
from iterconv_keras.data.sources import CLUTTER_SIZES, FILE_DATASETS, MAX_DEFAULT_VALIDATION  # stdlib only
from iterconv_keras.models.variants import list_variants  # a table of keyword rows, no imports


# The default split sizes, as the help states them: the generated sets' from their table;
# the real datasets train on their training split (these sizes) less the validation carved
# from it (10 %, at most MAX_DEFAULT_VALIDATION) and test on their whole test split.
def _names_by_size(which):
    """``{"mnist and fashion_mnist": 60000, ...}``: the real datasets grouped by one of their split sizes."""
    groups = {}
    for spec in FILE_DATASETS.values():
        groups.setdefault(spec.split_sizes[which], []).append(spec.name)
    return {" and ".join(names): size for size, names in groups.items()}


_REAL_TRAIN_SPLITS = _names_by_size(0)
_REAL_TEST_SPLITS = _names_by_size(1)
_REAL_TEST_SPLIT = ", ".join(f"{size:,}" + (f" for {names}" if len(_REAL_TEST_SPLITS) > 1 else "")
                             for names, size in _REAL_TEST_SPLITS.items())
_REAL_VALIDATION = {n: min(MAX_DEFAULT_VALIDATION, n // 10) for n in _REAL_TRAIN_SPLITS.values()}
_GENERATED = "digitclutter and digitdebris"


@click.command("train")
@dataset_option(default="digitclutter", show_default=True,
                help="Dataset to train on (digitclutter and digitdebris are generated offline; fashion-mnist is "
                     "read as fashion_mnist).")
@click.option("--variant", type=click.Choice(list_variants()), default="small", show_default=True,
              help="Architecture: a row of iterconv_keras.list_variants() (docs/method.md).")
@click.option("--coupling", type=float, default=0.0, show_default=True,
              help="Soft gradient coupling lambda in [0, 1] (1 = recurrent ResNet).")
@click.option("--spectral-norm/--no-spectral-norm", default=False, show_default=True,
              help="Lipschitz-constrain the residual functions (also on with --lipschitz, "
                   "--residual-form contractive or a variant with a bound).")
@click.option("--lipschitz", type=float, default=None,
              help="Bound c on Lip(f) (on the branch g of contractive blocks); giving it switches the "
                   "constraint on. Default with the constraint on: 0.9, 0.5 for contractive blocks, or the "
                   "variant's.")
@click.option("--residual-form", type=click.Choice(("plain", "contractive")), default=None,
              help="Block form: plain x + g(x), or contractive (1-alpha) x + alpha g(x) with Lip(g) <= c < 1, "
                   "which converges by construction (switches the constraint on). Default: the variant's.")
@click.option("--alpha", type=float, default=None,
              help="Step of the contractive form, in (0, 1] (default 0.5 or the variant's).")
@click.option("--epochs", type=int, default=5, show_default=True,
              help="Passes over the training set (with fresh data: over --train-size new images each).")
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="Images per training step: the global batch, split evenly over the replicas (--strategy).")
@click.option("--lr", type=float, default=0.002, show_default=True, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="sgd, momentum (SGD with momentum 0.9), adam, or adamw (Adam with decoupled weight decay, "
                   "see --weight-decay).")
@click.option("--weight-decay", type=float, default=None,
              help="Decoupled weight decay; 0 switches it off [default: 1e-4 for adamw, none otherwise].")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="cosine", show_default=True,
              help="Learning-rate schedule (cosine decays to 0 over the run).")
@click.option("--train-size", type=int, default=None,
              help=f"Training images [default: {CLUTTER_SIZES['train']:,} for {_GENERATED} (new ones every epoch "
                   "with fresh data); the rest of the training split for the real datasets: "
                   + ", ".join(f"{n - _REAL_VALIDATION[n]:,} for {names}" for names, n in _REAL_TRAIN_SPLITS.items())
                   + "; the rest of the file with --data-file].")
@click.option("--validation-size", type=int, default=None,
              help=f"Validation images, 0 for none [default: {CLUTTER_SIZES['validation']:,} for {_GENERATED}; "
                   f"10 % of the training split, at most {MAX_DEFAULT_VALIDATION:,}, for the real datasets: "
                   + ", ".join(f"{_REAL_VALIDATION[n]:,} for {names}" for names, n in _REAL_TRAIN_SPLITS.items())
                   + "; 10 % of the file with --data-file].")
@click.option("--test-size", type=int, default=None,
              help=f"Test images for the final evaluation [default: {CLUTTER_SIZES['test']:,} for {_GENERATED}; "
                   f"the whole test split for the real datasets, {_REAL_TEST_SPLIT} images; 20 % of the file with "
                   "--data-file].")
@click.option("--clutter-digits", type=int, default=3, show_default=True,
              help="Digits per image (2..5); digitclutter only.")
@click.option("--debris-fragments", type=int, default=10, show_default=True,
              help="Digit fragments per image (10, 30 or 50); digitdebris only.")
@click.option("--fresh-data/--fixed-data", "fresh_data", default=None,
              help="Generated datasets: train on --train-size new images every epoch, seeded by (seed, epoch) "
                   "[default: fresh for digitclutter and digitdebris], or on one fixed set.")
@click.option("--augment/--no-augment", default=None,
              help="Random translation (pad and crop) and horizontal flip of training images "
                   "[default: on for fashion_mnist, cifar10, cifar100; refused for the others].")
@click.option("--block-init", type=click.Choice(BLOCK_INITS), default="tied", show_default=True,
              help="Blocks of a stage start identical (tied) or from their own initialisation "
                   "(independent: a conventional ResNet).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation and data order.")
@data_dir_option()
@click.option("--data-file", type=click.Path(dir_okay=False), default=None,
              help="digitclutter or digitdebris: a set written by `iterconv data` to use instead of generating "
                   "(first 20 % test, next 10 % validation, the rest training, or --test-size/--validation-size/"
                   "--train-size); `iterconv eval RUN` then tests on the same images.")
@click.option("--xla/--no-xla", "jit_compile", default=False, show_default=True,
              help="Compile the train step with XLA.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True,
              help="Where to train: auto (mirrored if more than one GPU is visible, else one-device), one-device, "
                   "mirrored (this machine's devices) or multi-worker (the machines in TF_CONFIG). --batch-size is "
                   "the global batch, split evenly over the replicas.")
@click.option("--devices", type=int, default=None,
              help="With --strategy mirrored: mirror over N devices, the first N GPUs or, without GPUs, N logical "
                   "devices split off the CPU (for testing: they share its cores) [default: every GPU, or the CPU].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="Keras dtype policy: 16-bit computation with float32 weights for accelerators "
                   "(mixed_float16 scales the loss); see docs/scaling.md.")
@click.option("--out", type=click.Path(), default=None,
              help="Run directory (default: runs/<time>-<dataset>-<variant>-...).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last complete epoch.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON summary on stdout.")
@click.pass_context
@report_errors
def train(ctx, resume, json_output, **settings):
    """Train an iterative ResNet and write a run directory.

    The run directory holds config.json (written first), history.json, resumable
    checkpoints, model.keras and metrics.json.
    """
    _check_constraint_options(ctx, settings)
    config = TrainConfig(**settings).validate()
    if resume:
        _check_resume_options(ctx, config)
    else:
        # `--clutter-digits 3 --dataset mnist` too: the default value, but typed, so expected to matter.
        config.check_given_settings_apply(given_options(ctx))
    from iterconv_keras import training

    with progress_to_stderr(json_output):
        summary = training.train(config, resume=resume)
    if json_output:
        emit_json(summary)
    else:
        click.echo(model_line(summary))


def model_line(summary):
    """Where the model of a finished run is, as the text output says it.

    A multi-worker task other than the chief writes no run directory (its copy went
    to a temporary directory, removed), so it names the chief's file, not its own.
    """
    if summary["run_dir"] is not None:
        return f"model: {summary['run_dir']}/model.keras"
    return (f"model: written by the chief to {summary['config']['out']}/model.keras "
            f"(this process, {summary['distribution']['task']}, writes no run directory)")


def _check_constraint_options(ctx, settings):
    """Refuse an explicit --no-spectral-norm beside an option that needs the constraint."""
    from iterconv_keras.errors import UsageError

    if ctx.get_parameter_source("spectral_norm") != click.core.ParameterSource.COMMANDLINE or settings["spectral_norm"]:
        return
    if settings["lipschitz"] is not None:
        raise UsageError(f"--lipschitz {settings['lipschitz']} needs the constraint; drop --no-spectral-norm")
    if settings["residual_form"] == "contractive":
        raise UsageError("--residual-form contractive needs the constraint (Lip(g) <= c < 1); drop --no-spectral-norm")
    from iterconv_keras.models import variants

    bound = variants.variant_kwargs(settings["variant"]).get("lipschitz")
    if bound is not None:
        raise UsageError(f"--variant {settings['variant']} carries the constraint (lipschitz {bound}); "
                         "drop --no-spectral-norm")


def _check_resume_options(ctx, config):
    """Refuse options given on the command line that contradict the stored run config."""
    from iterconv_keras import runs
    from iterconv_keras.errors import UsageError

    if config.out is None:
        raise UsageError("--resume needs --out RUN_DIR")
    runs.check_resume(config, runs.load_run_config(config.out), given_options(ctx),
                      spell={p.name: p.opts[0] for p in ctx.command.params})


COMMAND = train
