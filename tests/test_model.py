"""The iterative ResNet: schedules, intermediates, serialisation, variants."""

import json

import keras
import numpy as np
import pytest
from conftest import random_images

from iterconv_keras.models import variants
from iterconv_keras.models.blocks import ResidualBlock
from iterconv_keras.models.resnet import IterativeResNet

SHAPE = (12, 12, 1)


@pytest.fixture
def model(seed):
    m = IterativeResNet(SHAPE, 5, stage_widths=(4, 8), blocks_per_stage=(3, 2), input_mean=0.4, input_std=0.3)
    # Make the blocks differ so that a wrong block order changes the output.
    for blocks in m.stages:
        for t, block in enumerate(blocks):
            for v in block.trainable_variables:
                v.assign(np.asarray(v) * (1.0 + 0.3 * t))
    return m


def _by_hand(model, x, schedule):
    """Forward pass assembled from the model's layers, without `call`."""
    h = (x - 0.4) / 0.3
    h = keras.ops.relu(model.stem_norm(model.stem_conv(h), training=False))
    for s, order in enumerate(schedule):
        if model.transitions[s] is not None:
            h = model.transitions[s](h, training=False)
        for t in order:
            block = model.stages[s][t]
            h = h + block.residual(h, training=False)
    h = keras.ops.relu(model.head_norm(h, training=False))
    return np.asarray(model.head_dense(keras.ops.mean(h, axis=(1, 2))))


@pytest.mark.parametrize(
    "schedule",
    [
        [[0, 1, 2], [0, 1]],        # trained
        [[0, 2], [1]],              # dropped blocks
        [[0, 1, 1, 2], [0, 0, 1]],  # repeated blocks
        [[0, 1, 2, 2, 2, 2], [0, 1, 1, 1]],  # extra iterations of the last block
        [[], [0, 1]],               # a whole stage skipped
    ],
)
def test_schedule_output_equals_hand_computation(model, schedule):
    x = random_images(3, SHAPE)
    expected = _by_hand(model, x, schedule)
    np.testing.assert_allclose(np.asarray(model(x, schedule=schedule)), expected, rtol=1e-5, atol=1e-6)


def test_default_schedule_is_the_trained_network(model):
    x = random_images(3, SHAPE)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x, schedule=[[0, 1, 2], [0, 1]])))
    # A different schedule really changes the output (blocks differ).
    assert np.abs(np.asarray(model(x)) - np.asarray(model(x, schedule=[[0, 1, 2, 2], [0, 1]]))).max() > 1e-4


def test_forward_intermediates_are_the_block_outputs(model):
    x = random_images(2, SHAPE)
    out = model.forward_intermediates(x, schedule=[[0, 0], [1]])
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(model(x, schedule=[[0, 0], [1]])), rtol=1e-6)
    h0 = out["stage_inputs"][0]
    first = model.stages[0][0](h0, training=False)
    np.testing.assert_allclose(np.asarray(out["block_outputs"][0][0]), np.asarray(first), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["block_outputs"][0][1]), np.asarray(model.stages[0][0](first, training=False)), rtol=1e-6
    )
    assert out["stage_inputs"][1].shape == (2, 6, 6, 8)


def test_forward_intermediates_runs_the_models_own_stage_loop(model, monkeypatch):
    # Review D6: no second copy of call's loop; a change to run_stage reaches both.
    calls = []
    original = model.run_stage

    def recorded(h, stage, order=None, training=None):
        calls.append((stage, list(order)))
        return original(h, stage, order, training=training)

    monkeypatch.setattr(model, "run_stage", recorded)
    model.forward_intermediates(random_images(1, SHAPE), schedule=[[0, 2], [1]])
    assert calls == [(0, [0]), (0, [2]), (1, [1])]


@pytest.mark.parametrize("schedule", [[[0]], [[0, 3], [0]], [[0, "1"], [0]], [[-1], [0]]])
def test_bad_schedule_is_refused(model, schedule):
    with pytest.raises(ValueError, match="schedule"):
        model(random_images(1, SHAPE), schedule=schedule)


def test_config_round_trips_through_json_and_keras_file(model, tmp_path):
    x = random_images(4, SHAPE)
    config = json.loads(json.dumps(model.get_config()))
    clone = IterativeResNet.from_config(config)
    assert clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(model(x)))

    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(
        np.asarray(loaded(x, schedule=[[0, 0], [1, 1]])), np.asarray(model(x, schedule=[[0, 0], [1, 1]]))
    )


def test_block_config_round_trip():
    block = ResidualBlock(6, kernel_size=5, norm="none", activation="gelu", name="b")
    clone = ResidualBlock.from_config(json.loads(json.dumps(block.get_config())))
    assert clone.get_config() == block.get_config()


def test_block_refuses_a_shape_change():
    with pytest.raises(ValueError, match="8 channels"):
        ResidualBlock(8)(np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"stage_widths": ()}, "stage_widths"),
        ({"blocks_per_stage": (2,)}, "blocks_per_stage"),
        ({"stem_stride": 3}, "stem_stride"),
        ({"input_std": 0.0}, "input_std"),
        ({"norm": "layer"}, "norm"),
    ],
)
def test_model_arguments_are_validated(kwargs, message):
    args = {"image_shape": SHAPE, "num_classes": 5, "stage_widths": (4, 8), "blocks_per_stage": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        IterativeResNet(**args)


def test_stage_zero_has_no_transition_when_the_stem_sets_its_width_and_later_stages_always_stride():
    m = IterativeResNet(SHAPE, 3, stage_widths=(4, 4, 8), blocks_per_stage=1)
    assert m.transitions[0] is None
    assert [layer.strides for layer in m.transitions[1].layers if hasattr(layer, "strides")] == [(2, 2)]
    m2 = IterativeResNet(SHAPE, 3, stage_widths=(4, 8), stem_width=6, blocks_per_stage=1)
    assert m2.transitions[0] is not None


def test_variant_registry():
    assert {"tiny", "small", "paper_mnist", "paper_cifar"} <= set(variants.list_variants())
    with pytest.raises(ValueError, match="already registered"):
        variants.register_variant("tiny", "again", stage_widths=(1,))
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        variants.create_model("huge", SHAPE, 3)
    small = variants.create_model("small", (32, 32, 1), 10, coupling=0.5)
    assert small.coupling == 0.5 and small.stem_stride == 2
    assert [len(b) for b in small.stages] == [4, 4, 4]
    assert small(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 10)


# -- the contractive residual form (docs/lipschitz.md, "A block that converges by construction") -----------------


def test_contractive_block_is_the_relaxed_iteration_of_its_branch(seed):
    block = ResidualBlock(4, lipschitz=0.5, residual_form="contractive", alpha=0.3)
    x = random_images(3, (6, 6, 4))
    y = np.asarray(block(x, training=False))
    # Oracle: g assembled from the block's layers by hand, then (1 - alpha) x + alpha g(x).
    g = block.conv2(block.act(block.norm2(block.conv1(block.act(block.norm1(x, training=False))), training=False)))
    np.testing.assert_allclose(y, 0.7 * x + 0.3 * np.asarray(g), rtol=1e-5, atol=1e-6)
    # Still the x + f(x) form the indices use, with f = alpha (g - id).
    np.testing.assert_allclose(np.asarray(block.residual(x, training=False)), y - x, rtol=1e-5, atol=1e-6)
    assert block.contraction_bound == pytest.approx(1 - 0.3 * (1 - 0.5))
    plain = ResidualBlock(4, lipschitz=0.5)
    assert plain.residual_form == "plain" and plain.alpha is None and plain.contraction_bound is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"residual_form": "relaxed"}, "residual_form must be one of .*'relaxed'"),
        ({"alpha": 0.5}, "alpha applies to residual_form='contractive' only, got alpha=0.5"),
        ({"residual_form": "contractive"}, "needs the Lipschitz constraint .* got lipschitz=None"),
        ({"residual_form": "contractive", "lipschitz": 1.0}, "lipschitz=c < 1 .* got lipschitz=1.0"),
        ({"residual_form": "contractive", "lipschitz": 0.5, "alpha": 0.0},
         r"alpha must be a number in \(0, 1\], got 0.0"),
        ({"residual_form": "contractive", "lipschitz": 0.5, "alpha": 1.5}, "got 1.5"),
        ({"residual_form": "contractive", "lipschitz": 0.5, "alpha": True}, "got True"),
        ({"residual_form": "contractive", "lipschitz": 0.5, "alpha": "0.5"}, "got '0.5'"),
    ],
)
def test_residual_form_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualBlock(4, **kwargs)
    with pytest.raises(ValueError, match=message):
        IterativeResNet(SHAPE, 3, stage_widths=(4,), blocks_per_stage=2, **kwargs)


def test_contractive_model_config_round_trips_through_json_and_keras_file(tmp_path):
    keras.utils.set_random_seed(2)
    model = variants.create_model("tiny", SHAPE, 5, residual_form="contractive", lipschitz=0.6)
    assert model.alpha == 0.5  # the default step, resolved and recorded
    config = json.loads(json.dumps(model.get_config()))
    assert (config["residual_form"], config["alpha"], config["lipschitz"]) == ("contractive", 0.5, 0.6)
    clone = IterativeResNet.from_config(config)
    assert clone.get_config() == model.get_config()
    assert all(b.residual_form == "contractive" and b.alpha == 0.5 for bs in clone.stages for b in bs)
    block_config = json.loads(json.dumps(model.stages[1][0].get_config()))
    assert ResidualBlock.from_config(block_config).get_config() == block_config
    x = random_images(4, SHAPE)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(np.asarray(loaded(x, schedule=[[0, 1, 1], [0, 1]])),
                                  np.asarray(model(x, schedule=[[0, 1, 1], [0, 1]])))


def test_plain_configs_without_the_new_keys_still_load():
    # Files saved before the residual forms existed carry no residual_form/alpha keys.
    config = IterativeResNet(SHAPE, 3, stage_widths=(4,), blocks_per_stage=2).get_config()
    del config["residual_form"], config["alpha"]
    assert IterativeResNet.from_config(config).residual_form == "plain"


def test_small_contractive_variant():
    model = variants.create_model("small_contractive", (32, 32, 1), 10)
    assert (model.residual_form, model.alpha, model.lipschitz) == ("contractive", 0.5, 0.5)
    assert {b.contraction_bound for bs in model.stages for b in bs} == {0.75}
