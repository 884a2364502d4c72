"""The model a run trains, compiled: variant, optimizer with its learning-rate schedule, loss, accuracy.

`build_and_compile` turns a validated `TrainConfig` into the compiled model that
`iterconv_keras.training` fits; `make_optimizer`, `make_loss` and
`make_accuracy` are its parts (evaluation on one device and the benchmarks
compile with the same ones). Called inside a strategy's scope it builds the
model for that strategy: batch normalisation synchronised over the replicas, and
coupled gradients checked to be supported (see `iterconv_keras.distribution`).
"""

import keras

from iterconv_keras.config import ADAMW_WEIGHT_DECAY
from iterconv_keras.errors import UsageError


def build_and_compile(config, splits, steps_per_epoch):
    """Build the variant for ``splits`` and compile it as ``config`` says."""
    from iterconv_keras.models import variants

    keras.utils.set_random_seed(config.seed)
    overrides = {
        "norm": _synchronised(variants.variant_kwargs(config.variant).get("norm", "batch")),
        "coupling": config.coupling,
        "multi_label": splits.multi_label,
        "input_mean": splits.mean,
        "input_std": splits.std,
        "block_init": config.block_init,
        "dtype": config.precision,
    }
    if config.spectral_norm:
        overrides["lipschitz"] = config.lipschitz
    if config.residual_form is not None:
        overrides.update(residual_form=config.residual_form, alpha=config.alpha)
    model = variants.create_model(config.variant, splits.input_shape, splits.num_classes, **overrides)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=make_loss(splits.multi_label),
        metrics=[make_accuracy(splits.multi_label)],
        jit_compile=config.jit_compile,
    )
    if config.coupling > 0 and model.distribute_strategy.num_replicas_in_sync > 1:
        from iterconv_keras.models import cross_replica

        try:  # before the first step, not inside a traced one
            cross_replica.check_supported(model.optimizer)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    return model


def _synchronised(norm):
    # Batch statistics over the whole global batch whenever it is split over
    # replicas, so a multi-replica step is the one-device step.
    import tensorflow as tf

    return "sync_batch" if norm == "batch" and tf.distribute.get_strategy().num_replicas_in_sync > 1 else norm


def make_optimizer(config, steps_per_epoch):
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * steps_per_epoch)
    # The config is validated: weight_decay is a number, 0 meaning none (Keras: None).
    wd = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, weight_decay=wd)
    if config.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=0.9, weight_decay=wd)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=wd)
    # Keras' AdamW needs a float; 0.0 decays by nothing. None (an unvalidated config, as the
    # benchmarks build) is what validate would resolve it to.
    decay = ADAMW_WEIGHT_DECAY if config.weight_decay is None else config.weight_decay
    return keras.optimizers.AdamW(lr, weight_decay=float(decay))


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
