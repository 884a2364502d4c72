"""Soft gradient coupling (docs/method.md, "Soft gradient coupling"): invariants and equivalences."""

import keras
import numpy as np
import pytest

from iterconv_keras.models import coupling
from iterconv_keras.models.resnet import IterativeResNet
from iterconv_keras.models.variants import create_model

SHAPE = (12, 12, 1)
N_CLASSES = 4
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05),
}


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *SHAPE), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, size=n)
    return x, y


def _model(coupling_strength, seed=7, cls=IterativeResNet, optimizer="sgd", norm="batch", **compile_kwargs):
    keras.utils.set_random_seed(seed)
    model = cls(SHAPE, N_CLASSES, stage_widths=(4, 8), blocks_per_stage=3, coupling=coupling_strength, norm=norm)
    model.compile(
        optimizer=OPTIMIZERS[optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def _fit(model, steps=20, batch=8, seed=0):
    x, y = _data(steps * batch, seed)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


def _trainable_of_stage(model, s):
    return [[np.asarray(v) for v in block.trainable_variables] for block in model.stages[s]]


def test_blocks_start_identical_for_every_lambda():
    for strength in (0.0, 0.5, 1.0):
        model = _model(strength)
        for blocks in model.stages:
            for block in blocks[1:]:
                for a, b in zip(block.weights, blocks[0].weights, strict=True):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_lambda_one_keeps_blocks_bitwise_identical(optimizer):
    model = _fit(_model(1.0, optimizer=optimizer))
    for s in range(model.num_stages):
        weights = _trainable_of_stage(model, s)
        for t in range(1, len(weights)):
            for a, b in zip(weights[t], weights[0], strict=True):
                np.testing.assert_array_equal(a, b)
    # The step did train: block weights moved away from their initial values.
    fresh = _model(1.0, optimizer=optimizer)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(model.trainable_variables, fresh.trainable_variables, strict=True)]
    assert max(moved) > 1e-4


class KerasBuiltinStepResNet(IterativeResNet):
    """The same model trained by Keras' own TensorFlow train_step."""

    train_step = keras.Model.train_step


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lambda_zero_is_bitwise_keras_training(optimizer):
    ours = _fit(_model(0.0, optimizer=optimizer))
    reference = _fit(_model(0.0, optimizer=optimizer, cls=KerasBuiltinStepResNet))
    for a, b in zip(ours.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    # And lambda = 0 actually lets blocks drift apart.
    assert coupling.between_block_distance(ours.stages) > 0


def test_between_block_distance_decreases_monotonically_with_lambda():
    distances = [
        coupling.between_block_distance(_fit(_model(lam, optimizer="momentum")).stages)
        for lam in (0.0, 0.5, 0.9, 0.99)
    ]
    # strict=False: consecutive pairs, distances[1:] is one shorter by design.
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] > 0


def test_sgd_coupling_scales_between_block_step_by_one_minus_lambda():
    # Oracle (docs/method.md, "Soft gradient coupling"): for plain SGD, coupling leaves the stage-mean
    # update unchanged and multiplies each block's deviation from the mean update
    # by (1 - lambda). Compare one step at lambda against the uncoupled step.
    lam = 0.7
    x, y = _data(8)
    deltas = {}
    for strength in (0.0, lam):
        model = _model(strength)
        before = _trainable_of_stage(model, 1)
        model.train_on_batch(x, y)
        after = _trainable_of_stage(model, 1)
        deltas[strength] = [[a - b for a, b in zip(wa, wb, strict=True)] for wa, wb in zip(after, before, strict=True)]
    for p in range(len(deltas[0.0][0])):
        plain = np.stack([d[p] for d in deltas[0.0]])
        coupled = np.stack([d[p] for d in deltas[lam]])
        np.testing.assert_allclose(coupled.mean(0), plain.mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            coupled - coupled.mean(0), (1 - lam) * (plain - plain.mean(0)), rtol=1e-3, atol=1e-6
        )


def test_coupled_step_compiles_with_xla():
    eager_like = _fit(_model(0.9), steps=4)
    xla = _model(0.9, jit_compile=True)
    assert xla.jit_compile
    _fit(xla, steps=4)
    for a, b in zip(xla.trainable_variables, eager_like.trainable_variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_mirrored_strategy_matches_one_device(mirrored_strategy):
    # Synchronised batch norm makes the two-replica step the one-device step up to
    # the order of floating-point reductions (all-reduce of gradients and moments).
    one = _fit(_model(0.9, norm="sync_batch"), steps=6)
    strategy = mirrored_strategy
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = _model(0.9, norm="sync_batch")
    _fit(mirrored, steps=6)
    for a, b in zip(mirrored.weights, one.weights, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=a.path)


def test_mirrored_strategy_lambda_one_stays_identical(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        model = _model(1.0, optimizer="adam")
    _fit(model, steps=6)
    for s in range(model.num_stages):
        weights = _trainable_of_stage(model, s)
        for t in range(1, len(weights)):
            for a, b in zip(weights[t], weights[0], strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", None])
def test_coupling_strength_is_validated(bad):
    with pytest.raises(ValueError, match="coupling"):
        create_model("tiny", SHAPE, N_CLASSES, coupling=bad)
