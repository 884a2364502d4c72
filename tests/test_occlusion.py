"""Occlusion robustness (docs/indices.md, "Occlusion robustness"): masks, sweeps and the model/dataset check."""

import numpy as np
import pytest
from conftest import exact_set_accuracy

from iterconv_keras.analysis import evaluation, occlusion
from iterconv_keras.models.variants import create_model


@pytest.mark.parametrize("level", [0.1, 0.2, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("shape,patch", [((32, 32), 4), ((28, 28), 4), ((12, 16), 3)])
def test_coverage_equals_the_level_within_one_patch(level, shape, patch):
    masks = occlusion.patch_masks(200, *shape, level, patch_size=patch, seed=5)
    coverage = masks.mean(axis=(1, 2))
    one_patch = patch * patch / (shape[0] * shape[1])
    # At least the requested area (up to rounding to whole pixels), at most one patch more.
    assert coverage.min() >= level - 0.5 / (shape[0] * shape[1])
    assert coverage.max() < level + one_patch


def test_level_zero_leaves_the_input_unchanged():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 10, 10, 3), dtype=np.uint8)
    out = occlusion.occlude(images, 0.0, fill=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(out, images / 255.0, rtol=1e-6)  # only scaled to [0, 1]
    floats = images / np.float32(255.0)
    np.testing.assert_array_equal(occlusion.occlude(floats, 0.0, fill=(0.5, 0.5, 0.5)), floats)
    assert not occlusion.patch_masks(6, 10, 10, 0.0, patch_size=2).any()


def test_same_seed_same_masks_and_masks_do_not_depend_on_the_subset():
    a = occlusion.patch_masks(50, 32, 32, 0.3, patch_size=4, seed=11)
    b = occlusion.patch_masks(50, 32, 32, 0.3, patch_size=4, seed=11)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, occlusion.patch_masks(50, 32, 32, 0.3, patch_size=4, seed=12))
    # Images 10..19 masked on their own get the masks they get within the whole set (--limit).
    np.testing.assert_array_equal(a[10:20], occlusion.patch_masks(10, 32, 32, 0.3, patch_size=4, seed=11, start=10))
    # Different images get different masks.
    assert not np.array_equal(a[0], a[1])


def test_occluded_pixels_hold_the_fill_and_the_rest_is_untouched():
    images = np.full((4, 16, 16, 2), 200, np.uint8)
    fill = (0.25, 0.75)
    out = occlusion.occlude(images, 0.3, fill, patch_size=2, seed=3)
    masks = occlusion.patch_masks(4, 16, 16, 0.3, patch_size=2, seed=3)
    np.testing.assert_allclose(out[masks], np.broadcast_to(fill, (masks.sum(), 2)))
    np.testing.assert_allclose(out[~masks], 200 / 255.0, rtol=1e-6)


def test_bad_levels_and_patch_sizes_echo_the_value():
    with pytest.raises(ValueError, match="1.5"):
        occlusion.patch_masks(1, 8, 8, 1.5, patch_size=2)
    with pytest.raises(ValueError, match="9"):
        occlusion.patch_masks(1, 8, 8, 0.1, patch_size=9)


def test_auc_is_mean_accuracy_over_clean_accuracy():
    assert occlusion.area_under_curve([0.8, 0.8, 0.4]) == pytest.approx((2.0 / 3) / 0.8)
    assert np.isnan(occlusion.area_under_curve([0.0, 0.0]))


def test_sweeps_on_a_constant_model():
    # A model whose logits ignore the input (zero head kernel, bias on class 2):
    # every level, every iteration count and every digit count score the same.
    model = create_model("tiny", (12, 12, 1), 4)
    kernel, bias = model.head_dense.get_weights()
    model.head_dense.set_weights([np.zeros_like(kernel), np.eye(4)[2].astype(np.float32)])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 12, 12, 1), dtype=np.uint8)
    y = np.arange(40) % 4
    sweep = occlusion.occlusion_sweep(model, x, y, fill=(0.5,), batch_size=16)
    assert sweep["levels"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    np.testing.assert_allclose(sweep["accuracy"], 0.25)
    assert sweep["auc"] == pytest.approx(1.0)
    iterations = occlusion.iteration_sweep(model, x, y, (0.5,), iterations=(0, 2), batch_size=16)
    np.testing.assert_allclose(iterations["clean"] + iterations["occluded"], 0.25)


def test_clutter_sweep_scores_every_digit_count():
    # The repository's trained Digitclutter model (trained on 3 digits): perfect or near it on
    # 2 digits, well away from 0 and 1 on 4 and 5, so the comparison can tell the sets apart.
    from iterconv_keras.data import generated
    from iterconv_keras.loading import load_model
    model = load_model("digitclutter-small")
    result = occlusion.clutter_sweep(model, 64, batch_size=32)
    assert sorted(result) == ["2", "3", "4", "5"]
    for n, accuracy in result.items():
        images, labels, _ = generated.clutter_test_set(int(n), 64)
        # Oracle: the model's plain forward pass; right when its top n are the n digits present.
        expected = exact_set_accuracy(model(images.astype(np.float32) / 255, training=False), labels)
        assert expected > 0 and (n in ("2", "3") or expected < 1), (n, expected)
        assert accuracy == pytest.approx(expected)
    assert result["2"] > result["4"] > result["5"]


def test_mismatched_model_and_dataset_is_a_clear_error():
    model = create_model("tiny", (32, 32, 1), 10, multi_label=True)
    x = np.zeros((4, 28, 28, 1), np.uint8)
    with pytest.raises(ValueError) as info:
        evaluation.evaluate(model, (x, np.arange(4)), indices=False, occlusion=False)
    message = str(info.value)
    assert "(32, 32, 1)" in message and "(28, 28, 1)" in message
    assert "multi-label" in message and "single-label" in message
    with pytest.raises(ValueError, match="10 outputs but the dataset has 4 classes"):
        evaluation.evaluate(model, (np.zeros((4, 32, 32, 1), np.uint8), np.eye(4)), indices=False, occlusion=False)
