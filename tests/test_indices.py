"""Indices of iterative convergence (docs/indices.md) on networks with known answers.

The known-answer networks are built by hand: four-channel 8x8 images whose
class c lights channel c; stem, head and blocks get identity-like weights so
every representation is the image itself (up to BatchNorm's sqrt(1 + eps)),
and a block's residual function f(x) = conv2(relu(conv1(relu(x)))) is set
exactly. With conv1 = identity and no biases, relu(conv1(relu(x))) = x for the
non-negative representations these networks carry, so conv2 = m * identity
gives f(x) = m x exactly: m = -a contracts, m = +b expands.
"""

import functools
import math

import keras
import numpy as np
import pytest

from iterconv_keras.analysis import formulas, indices
from iterconv_keras.analysis.programs import StagePrograms, padded_batches
from iterconv_keras.models import coupling
from iterconv_keras.models.resnet import IterativeResNet

CLASSES = 4
SIZE = 8
EXTRA = (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------- hand-built networks


def _class_images(per_class=16, seed=0, noise=0.1):
    """Class c: channel c is 1 everywhere, the other channels hold noise in [0, noise)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class)
    x = rng.random((y.size, SIZE, SIZE, CLASSES)).astype(np.float32) * noise
    x[np.arange(y.size), :, :, y] = 1.0
    return x, y


def _identity_kernel(scale=1.0, channels=CLASSES):
    kernel = np.zeros((3, 3, channels, channels), np.float32)
    kernel[1, 1] = np.eye(channels) * scale
    return kernel


def _identity_norm(layer):
    # gamma 1, beta 0, moving mean 0, moving variance 1: y = x / sqrt(1 + eps).
    c = layer.gamma.shape[0]
    layer.set_weights([np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)])


def _hand_model(blocks=2, stage_widths=(CLASSES,), **kwargs):
    # Seeded: the transition's random initialisation must not depend on which tests ran before.
    keras.utils.set_random_seed(0)
    model = IterativeResNet((SIZE, SIZE, CLASSES), CLASSES, stage_widths=stage_widths,
                            blocks_per_stage=blocks, norm="none", **kwargs)
    model.stem_conv.set_weights([_identity_kernel()])
    _identity_norm(model.stem_norm)
    _identity_norm(model.head_norm)
    width = stage_widths[-1]
    dense = np.zeros((width, CLASSES), np.float32)
    dense[:CLASSES, :CLASSES] = np.eye(CLASSES)
    model.head_dense.set_weights([dense, np.zeros(CLASSES, np.float32)])
    return model


def _set_linear_block(block, m, push=None, scale=1.0):
    """g(x) = m * x (+ push, a per-channel constant) on non-negative x, split as conv1 = scale I, conv2 = m/scale I.

    For the plain form f = g; for the contractive form f = alpha (g - id).
    """
    c = block.filters
    block.conv1.set_weights([_identity_kernel(scale, c), np.zeros(c, np.float32)])
    bias = np.zeros(c, np.float32) if push is None else np.asarray(push, np.float32)
    block.conv2.set_weights([_identity_kernel(m / scale, c), bias])


def _set_random_block(block, seed, scale=0.4):
    rng = np.random.default_rng(seed)
    for conv in block.convolutions:
        kernel, bias = conv.get_weights()
        conv.set_weights([rng.normal(0, scale, kernel.shape).astype(np.float32),
                          rng.normal(0, 0.1, bias.shape).astype(np.float32)])


def _zero_block(block):
    kernel, bias = block.conv2.get_weights()
    block.conv2.set_weights([np.zeros_like(kernel), np.zeros_like(bias)])


def _indices(model, x, y, full=False, **kwargs):
    result = indices.compute_indices(model, x, y, batch_size=32, **kwargs)
    return result if full else result["indices"]


# --------------------------------------------------------------------------- known answers


def test_identical_blocks_give_recurrence_one_and_different_blocks_do_not():
    x, y = _class_images()
    model = _hand_model(blocks=3, stage_widths=(CLASSES, CLASSES))
    for blocks in model.stages:
        for block in blocks:
            _set_random_block(block, seed=1)  # the same weights in every block of a stage
    result = _indices(model, x, y)
    for row in result["per_stage"]:
        assert row["recurrence_skipped"] == 0  # every denominator was meaningful
        np.testing.assert_allclose(row["recurrence_per_block"], 1.0, atol=1e-4)
    assert result["recurrence"] == pytest.approx(1.0, abs=1e-4)
    assert result["recurrence_median"] == pytest.approx(1.0, abs=1e-4)

    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            _set_random_block(block, seed=10 * s + t + 2)  # independent blocks
    independent = _indices(model, x, y)
    assert abs(independent["recurrence"] - 1.0) > 0.1


def test_zero_block_is_skipped_not_divided_by():
    x, y = _class_images()
    model = _hand_model(blocks=3)
    blocks = model.stages[0]
    _set_random_block(blocks[0], seed=1)
    _set_random_block(blocks[2], seed=1)
    _zero_block(blocks[1])
    # Scores of different compiled batch shapes differ in the last bits, so even a
    # tiny tolerance is needed to call a change "none".
    for tolerance in (1e-6, 1e-3):
        row = _indices(model, x, y, tolerance=tolerance)["per_stage"][0]
        # t = 2 (block 1, f = 0): dropping it changes nothing, so there is no denominator.
        assert row["recurrence_per_block"][0] is None
        assert row["recurrence_skipped"] == 1
        # t = 3: "repeating" the zero block is the same as dropping block 2, so RI_3 = 0.
        assert row["recurrence_per_block"][1] == pytest.approx(0.0, abs=1e-6)
        assert row["recurrence"] == pytest.approx(0.0, abs=1e-6)


def test_contraction_converges():
    a = 0.5
    x, y = _class_images()
    model = _hand_model(blocks=2)
    for block in model.stages[0]:
        _set_linear_block(block, -a)  # f(x) = -a x
    result = _indices(model, x, y, extra_iterations=EXTRA)
    row = result["per_stage"][0]
    # u_k = a (1 - a)^(k-1) ||x_1||, so CI = 1 - (1 - a)^K_max exactly.
    assert row["convergence"] == pytest.approx(1 - (1 - a) ** EXTRA[-1], abs=1e-6)
    assert row["convergence"] > 0.99
    updates = np.asarray(row["curves"]["update_norm"])
    np.testing.assert_allclose(updates[1:] / updates[:-1], 1 - a, rtol=1e-4)
    # The relative update stays at a: it alone would miss the convergence (method.md).
    np.testing.assert_allclose(row["curves"]["relative_update"], a, rtol=1e-4)
    # Shrinking x keeps every argmax: nothing is lost with extra iterations.
    assert row["divergence"] == pytest.approx(0.0, abs=1e-9)
    # The rate is the factor per iteration, 1 - a; a plain block has no guaranteed bound.
    assert row["convergence_rate"] == pytest.approx(1 - a, rel=1e-5)
    assert row["contraction_bound"] is None


def test_expansion_that_destroys_class_information_diverges():
    b, push = 0.5, 1.0
    x, y = _class_images(noise=0.1)
    model = _hand_model(blocks=2)
    _zero_block(model.stages[0][0])
    # f(x) = b x + push * e_0: every channel grows by (1 + b) per step, and the
    # constant push makes channel 0 (class 0) win after one extra iteration.
    _set_linear_block(model.stages[0][1], b, push=[push, 0, 0, 0])
    result = _indices(model, x, y, full=True, extra_iterations=EXTRA)
    assert result["accuracy"] == 1.0
    row = result["indices"]["per_stage"][0]
    np.testing.assert_allclose(row["curves"]["accuracy"], 1.0 / CLASSES)  # balanced classes: chance
    assert row["divergence"] == pytest.approx(1.0, abs=1e-9)
    assert row["divergence_loss"] > 1.0  # confidently wrong: worse than the chance-level loss
    assert row["convergence"] < 0
    # Updates grow by (1 + b) per extra iteration (the push is negligible by then).
    updates = np.asarray(row["curves"]["update_norm"])
    assert updates[-1] / updates[-2] == pytest.approx(1 + b, rel=0.05)
    assert row["convergence_rate"] == pytest.approx(1 + b, rel=1e-4)


@pytest.mark.parametrize("m", [0.5, -0.5, 0.2])
def test_contractive_block_with_known_constant_converges_at_most_at_its_rate(m):
    # x <- (1 - alpha) x + alpha g(x) with g(x) = m x, |m| <= c: the block map is
    # x -> (1 - alpha + alpha m) x, so the rate is |1 - alpha + alpha m| exactly and it is
    # at most L = 1 - alpha (1 - c); m = c attains L.
    alpha, c = 0.5, 0.5
    bound = 1 - alpha * (1 - c)
    x, y = _class_images()
    model = _hand_model(blocks=2, lipschitz=c, residual_form="contractive", alpha=alpha)
    for block in model.stages[0]:
        _set_linear_block(block, m, scale=np.sqrt(c))  # each conv at the per-conv bound sqrt(c)
    row = _indices(model, x, y, extra_iterations=EXTRA)["per_stage"][0]
    factor = abs(1 - alpha + alpha * m)
    assert row["convergence_rate"] == pytest.approx(factor, rel=1e-5)
    # Certified from the weights: Lip(g) = |m| exactly (single-tap kernels), within the nominal L.
    assert row["contraction_bound"] == pytest.approx(1 - alpha * (1 - abs(m)), abs=1e-6)
    assert row["contraction_bound"] <= bound + 1e-6
    assert row["convergence_rate"] <= row["contraction_bound"] + 1e-6
    assert row["convergence"] >= 1 - row["contraction_bound"] ** EXTRA[-1] - 1e-6
    assert row["convergence"] == pytest.approx(1 - factor ** EXTRA[-1], abs=1e-6)


def test_top_level_update_curve_is_the_stage_mean_of_relative_decay():
    # Review S2: stages of different widths have update norms on different scales; the
    # top-level curve averages each stage's u_(T+K) / u_T. Stage 0 (4 channels) contracts by
    # 1 - a, stage 1 (8 channels, 4 of them carrying the image) by 1 - a2.
    a, a2 = 0.5, 0.25
    x, y = _class_images()
    model = _hand_model(blocks=2, stage_widths=(CLASSES, 2 * CLASSES))
    transition = model.transitions[1]
    _identity_norm(transition.layers[0])
    embed = np.zeros((3, 3, CLASSES, 2 * CLASSES), np.float32)
    embed[1, 1, :, :CLASSES] = np.eye(CLASSES)
    transition.layers[2].set_weights([embed])
    for block in model.stages[0]:
        _set_linear_block(block, -a)
    for block in model.stages[1]:
        _set_linear_block(block, -a2)
    result = _indices(model, x, y, extra_iterations=(1, 4))
    stage_norms = [np.asarray(row["curves"]["update_norm"]) for row in result["per_stage"]]
    assert stage_norms[1][1] < 0.6 * stage_norms[0][1]  # the scales really differ
    expected = [np.mean([(1 - a) ** k, (1 - a2) ** k]) for k in (1, 4)]
    np.testing.assert_allclose(result["curves"]["update_norm"], expected, rtol=1e-4)


def test_between_block_distance_is_rho_of_whole_blocks():
    # Review D6: one spread statistic. Blocks theta and 2 theta: mean 1.5 theta, spread
    # 0.5 ||theta||^2, scale 5 ||theta||^2, rho = T/(T-1) * 0.1 = 0.2.
    model = _hand_model(blocks=2)
    first, second = model.stages[0]
    for source, target in zip(first.trainable_variables, second.trainable_variables, strict=True):
        target.assign(2.0 * np.asarray(source))
    assert coupling.between_block_distance(model.stages) == pytest.approx(0.2)
    assert indices.group_rho is coupling.group_rho


def _near_chance_labels(y, keep):
    """Labels that agree with the image's class for ``keep`` examples (none of class 0), else never 0."""
    labels = np.where(y == 0, 1, y % 3 + 1)  # a wrong class, never 0
    agree = np.flatnonzero(y != 0)[:keep]
    labels[agree] = y[agree]
    return labels


@pytest.mark.parametrize("keep, skipped", [(33, True), (31, True), (40, False)])
def test_divergence_is_null_within_tolerance_of_chance(keep, skipped):
    # Review M4: a network a hair above chance (33/128 = 0.258 against 0.25) used to report
    # DI = (0.258 - 0) / 0.008 = 33 when the extra iterations push everything into class 0,
    # which no label here is; one below chance flipped the sign. 40/128 = 0.31 is well above.
    x, true = _class_images(per_class=32)
    y = _near_chance_labels(true, keep)
    model = _hand_model(blocks=2)
    _zero_block(model.stages[0][0])
    _set_linear_block(model.stages[0][1], 0.5, push=[1.0, 0, 0, 0])
    result = _indices(model, x, y, full=True, extra_iterations=EXTRA)
    assert result["accuracy"] == pytest.approx(keep / 128)
    ind = result["indices"]
    assert ind["divergence_skipped"] is skipped
    assert ind["settings"]["divergence_tolerance"]["accuracy"] == indices.DEFAULT_ACCURACY_TOLERANCE
    row = ind["per_stage"][0]
    if skipped:
        assert math.isnan(row["divergence"]) and math.isnan(ind["divergence"])
    else:
        assert row["divergence"] == pytest.approx((keep / 128) / (keep / 128 - 0.25))


def test_divergence_terms_guard():
    assert formulas.divergence_terms(0.9, [0.5], 0.1, 0.01) == [pytest.approx(0.5)]
    assert all(math.isnan(v) for v in formulas.divergence_terms(0.105, [0.0], 0.1, 0.01))
    assert all(math.isnan(v) for v in formulas.divergence_terms(0.05, [0.0], 0.1, 0.01))  # below chance


# --------------------------------------------------------------------------- formulas


def test_recurrence_terms_skip_and_sign():
    terms = formulas.recurrence_terms(1.0, [2.0, 1.0, 1.5], [1.0, 0.7, 2.0], tolerance=1e-3)
    assert terms == [1.0, None, -1.0]
    assert formulas.mean_or_nan(terms) == 0.0
    assert math.isnan(formulas.mean_or_nan([None, None]))


def test_recurrence_median_is_the_median_of_every_stages_terms():
    # One term far below the others carries the mean of the terms (-1.825) but not their median.
    per_stage = [{"recurrence_per_block": [1.0, 0.9, -10.0]}, {"recurrence_per_block": [None, 0.8]}]
    assert formulas.mean_or_nan([1.0, 0.9, -10.0, 0.8]) == pytest.approx(-1.825)
    assert formulas.recurrence_median(per_stage) == pytest.approx(0.85)  # of 1.0, 0.9, 0.8, -10.0
    assert math.isnan(formulas.recurrence_median([{"recurrence_per_block": [None]}]))
    assert formulas.median_or_nan([float("nan"), 2.0, None]) == 2.0


def test_recurrence_terms_are_recomputed_from_the_recorded_losses():
    x, y = _class_images()
    model = _hand_model(blocks=3, stage_widths=(CLASSES, CLASSES))
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            _set_random_block(block, seed=10 * s + t + 2)
    result = _indices(model, x, y, full=True)
    for row in result["indices"]["per_stage"]:
        parts = row["recurrence_losses"]
        assert parts["full"] == pytest.approx(result["loss"], rel=1e-5)
        drop, rep = np.array(parts["drop"]), np.array(parts["rep"])
        np.testing.assert_allclose(row["recurrence_per_block"], (drop - rep) / (drop - parts["full"]), rtol=1e-6)
    terms = [t for row in result["indices"]["per_stage"] for t in row["recurrence_per_block"]]
    assert result["indices"]["recurrence_median"] == pytest.approx(float(np.median(terms)))


def test_chance_levels():
    assert formulas.chance_accuracy(np.arange(8), 10, False) == 0.1
    three_digits = np.zeros((4, 10))
    three_digits[:, :3] = 1
    assert formulas.chance_accuracy(three_digits, 10, True) == pytest.approx(1 / 120)
    assert formulas.chance_loss(np.arange(8), 10, False) == pytest.approx(math.log(10))


def test_group_rho_oracles():
    rng = np.random.default_rng(0)
    theta = rng.normal(size=1000)
    assert indices.group_rho([theta] * 4) == 0.0
    assert indices.group_rho([np.zeros(5)] * 3) == 0.0
    independent = [rng.normal(size=20000) for _ in range(4)]
    assert indices.group_rho(independent) == pytest.approx(1.0, abs=0.03)
    # Anti-correlated copies spread more than independent ones: clipped to 1.
    assert indices.group_rho([theta, -theta]) == 1.0


def test_effective_parameters_one_block_per_stage_when_identical():
    model = _hand_model(blocks=3, stage_widths=(CLASSES, CLASSES))
    counts = indices.effective_parameters(model)
    per_block = sum(int(np.prod(v.shape)) for v in model.stages[0][0].trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert counts["parameters"] == total
    # Blocks start identical: rho = 0, one block's worth per stage.
    assert counts["effective_parameters"] == pytest.approx(total - 2 * 2 * per_block)
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            _set_random_block(block, seed=100 + 10 * s + t, scale=1.0)
    spread = indices.effective_parameters(model)
    assert spread["effective_parameters"] == pytest.approx(total, rel=0.05)


# --------------------------------------------------------------------------- the schedule engine


def _direct_loss(model, x, y, schedule):
    logits = model(x, schedule=schedule, training=False)
    return float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))


def test_schedule_scores_equal_the_models_own_forward_pass():
    x, y = _class_images(per_class=10)  # 40 examples: batches of 32 with a padded remainder
    model = _hand_model(blocks=3, stage_widths=(CLASSES, 8))
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            _set_random_block(block, seed=20 + 10 * s + t)
    programs = StagePrograms(model)
    totals = indices.measure(programs, x, y, extra_iterations=(1, 3), batch_size=32)
    full = model.default_schedule()
    cases = {("full",): full}
    for s in range(2):
        for t in (1, 2):
            drop, rep = [list(o) for o in full], [list(o) for o in full]
            drop[s].remove(t)
            rep[s][t] = t - 1
            cases[("drop", s, t)] = drop
            cases[("rep", s, t)] = rep
        for k in (1, 3):
            extra = [list(o) for o in full]
            extra[s] += [2] * k
            cases[("extra", s, k)] = extra
    for key, schedule in cases.items():
        assert totals.mean(key + ("loss",)) == pytest.approx(_direct_loss(model, x, y, schedule), rel=1e-4), key


def test_run_schedule_equals_the_models_forward_pass_with_one_program_per_schedule():
    x, y = _class_images(per_class=8)  # 32 examples = 2 batches of 16
    model = _hand_model(blocks=3, stage_widths=(CLASSES, 8))
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            _set_random_block(block, seed=50 + 10 * s + t)
    programs = StagePrograms(model)
    schedules = [None, [[0, 0, 2], [2, 1]]]
    for schedule in schedules:
        losses = [np.asarray(programs.run_schedule(xb, yb, schedule)[0])
                  for xb, yb, _ in padded_batches(x, y, 16)]
        assert np.mean(losses) == pytest.approx(_direct_loss(model, x, y, schedule), rel=1e-5)
    programs.run_schedule(next(padded_batches(x, y, 16))[0], y[:16], [[0, 1, 2], [0, 1, 2]])
    # The trained schedule given explicitly is the same program as None.
    assert programs.num_programs == 2


def test_later_schedules_reuse_cached_stage_inputs():
    x, y = _class_images(per_class=16)  # 64 examples = 2 batches of 32
    model = _hand_model(blocks=3, stage_widths=(CLASSES, 8))
    programs = StagePrograms(model)
    # The pieces build graph ops, so calls while tracing count the block
    # applications in the compiled suite, whatever the number of batches.
    calls = {}

    def counting(original, key):
        def counted(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return original(*args, **kwargs)

        return counted

    programs.embed = counting(programs.embed, ("embed",))
    for s, blocks in enumerate(model.stages):
        for block in blocks:
            block.residual = counting(block.residual, ("residual", s))
    indices.measure(programs, x, y, extra_iterations=(1, 2), batch_size=32)
    # The stem is in the program once: no schedule recomputes what comes before its stage.
    assert calls[("embed",)] == 1
    # Stage 0 runs 3 blocks in the trained pass, then from cached inputs: drop_2
    # [2], rep_2 [0, 2], drop_3 [], rep_3 [1], and 2 extra iterations: 9 in all.
    # Without the cache every variant would rerun its prefix (16).
    assert calls[("residual", 0)] == 9
    # Stage 1 runs 3 in the trained pass, 3 for all of stage 0's variants side by side, and its own 4 + 2.
    assert calls[("residual", 1)] == 12
    # One program, traced once for the one padded batch shape, ran both batches.
    assert programs.num_programs == 1
    assert next(iter(programs._programs.values())).experimental_get_tracing_count() == 1


def test_padded_batches_mask_the_remainder():
    x = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    batches = list(padded_batches(x, np.arange(5), 4))
    assert [b[0].shape[0] for b in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1][2], [1, 0, 0, 0])
    assert batches[0][0].dtype == np.float32 and batches[0][0].max() == pytest.approx(3 / 255)


def test_bad_extra_iterations_are_rejected_with_the_value():
    model = _hand_model()
    x, y = _class_images(per_class=2)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        indices.compute_indices(model, x, y, extra_iterations=(4, 2))


# --------------------------------------------------------------------------- trained tiny models


@functools.lru_cache(maxsize=None)
def _trained(coupling, seed=3, norm="none", **kwargs):
    """A tiny one-stage network trained briefly (cached: the lambda = 0 model serves two tests)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    # Four classes: a bright 4x4 square in one quadrant of a noisy 12x12 image.
    y = rng.integers(0, 4, 512)
    x = rng.random((512, 12, 12, 1)).astype(np.float32) * 0.5
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 6 * r + 1 : 6 * r + 5, 6 * q + 1 : 6 * q + 5] += 0.5
    model = IterativeResNet((12, 12, 1), 4, stage_widths=(8,), blocks_per_stage=3, coupling=coupling,
                            norm=norm, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:384], y[:384], batch_size=32, epochs=3, verbose=0)
    return model, x[384:], y[384:]


def test_coupling_one_is_more_recurrent_than_coupling_zero():
    recurrent, x, y = _trained(1.0)
    ordinary, _, _ = _trained(0.0)
    ri_recurrent = _indices(recurrent, x, y)["recurrence"]
    ri_ordinary = _indices(ordinary, x, y)["recurrence"]
    print(f"RI lambda=1: {ri_recurrent:.3f}, lambda=0: {ri_ordinary:.3f}")
    assert ri_recurrent == pytest.approx(1.0, abs=1e-3)  # identical blocks, no BN statistics
    assert ri_recurrent > ri_ordinary + 0.2


def test_lipschitz_constraint_lowers_divergence():
    constrained, x, y = _trained(0.0, lipschitz=0.9)
    free, _, _ = _trained(0.0)
    di_constrained = _indices(constrained, x, y)["divergence_loss"]
    di_free = _indices(free, x, y)["divergence_loss"]
    print(f"DI(loss) constrained: {di_constrained:.3f}, unconstrained: {di_free:.3f}")
    assert di_constrained < di_free


def test_coupling_one_with_batch_norm_is_recurrent_up_to_its_per_block_statistics():
    # Review T6: at lambda = 1 with batch norm the trainable weights stay identical but the
    # moving statistics are per block (docs/method.md, "Soft gradient coupling"), so RI is not 1 (0.84 on the
    # zoo's recurrent model, 1.16 here). Oracle: give every block block 0's statistics and
    # RI is 1, so the statistics are the whole difference.
    recurrent, x, y = _trained(1.0, norm="batch")
    blocks = recurrent.stages[0]
    for block in blocks[1:]:
        for a, b in zip(block.trainable_variables, blocks[0].trainable_variables, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ri = _indices(recurrent, x, y)["recurrence"]
    saved = [[np.asarray(v) for v in block.non_trainable_variables] for block in blocks]
    try:
        for block in blocks[1:]:
            for target, source in zip(block.non_trainable_variables, blocks[0].non_trainable_variables, strict=True):
                target.assign(source)
        ri_shared = _indices(recurrent, x, y)["recurrence"]
    finally:
        for block, values in zip(blocks, saved, strict=True):
            for target, value in zip(block.non_trainable_variables, values, strict=True):
                target.assign(value)
    print(f"RI lambda=1 with batch norm: {ri:.3f}; with shared statistics: {ri_shared:.4f}")
    assert ri_shared == pytest.approx(1.0, abs=1e-3)
    assert abs(ri - 1.0) > 1e-2


@pytest.mark.parametrize("coupling", [0.0, 1.0])
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_trained_contractive_network_converges_at_most_at_its_guaranteed_rate(coupling, norm):
    # Method.md 4b: after training (and fit's certified projection) every stage's measured
    # rate is at most its certified contraction bound L, so CI >= 1 - L^16.
    model, x, y = _trained(coupling, norm=norm, lipschitz=0.5, residual_form="contractive", alpha=0.5)
    result = _indices(model, x, y, extra_iterations=EXTRA)
    for row in result["per_stage"]:
        bound = row["contraction_bound"]
        print(f"lambda {coupling}, norm {norm}: rate {row['convergence_rate']:.4f}, L {bound:.4f}, "
              f"CI {row['convergence']:.4f}")
        assert bound <= 0.75 + 1e-6  # the nominal L of alpha = c = 0.5
        assert row["convergence_rate"] <= bound
        assert row["convergence"] >= 1 - bound ** EXTRA[-1]
    assert result["lipschitz"]["residual_form"] == "contractive" and result["lipschitz"]["alpha"] == 0.5
    assert max(max(stage) for stage in result["lipschitz"]["certified"]) <= 0.5
