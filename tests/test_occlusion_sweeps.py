"""Occlusion sweeps at p > 0 on a trained model, nested masks, and the area under uneven levels.

Oracles: the model's own forward pass on images occluded in the test, an
exact-set accuracy written independently (conftest), and hand-computed areas.
"""

import keras
import numpy as np
import pytest
from conftest import exact_set_accuracy

from iterconv_keras.analysis import occlusion

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@pytest.mark.parametrize("shape,patch", [((32, 32), 4), ((28, 28), 4), ((12, 16), 3)])
def test_masks_are_nested_across_levels(shape, patch):
    masks = [occlusion.patch_masks(100, *shape, level, patch_size=patch, seed=9) for level in LEVELS[1:]]
    for lower, higher in zip(masks, masks[1:], strict=False):
        # Every pixel covered at a level is covered at every level above it.
        assert not (lower & ~higher).any()
        assert (higher.sum(axis=(1, 2)) > lower.sum(axis=(1, 2))).all()


def test_area_under_curve_on_even_levels_is_the_mean_over_clean():
    assert occlusion.area_under_curve([0.8, 0.8, 0.4], [0.0, 0.25, 0.5]) == pytest.approx((2.0 / 3) / 0.8)


def test_area_under_curve_weights_uneven_levels_by_the_interval_they_stand_for():
    # Cells: [0, 0.05] extended to width 0.1 for level 0, [0.05, 0.3] for 0.1, [0.3, 0.7] for 0.5:
    # widths 0.1, 0.25, 0.4. Area = 0.1*1 + 0.25*0.8 + 0.4*0.4 = 0.46 over a width of 0.75.
    assert occlusion.area_under_curve([1.0, 0.8, 0.4], [0.0, 0.1, 0.5]) == pytest.approx(0.46 / 0.75)
    assert occlusion.area_under_curve([0.5, 0.5, 0.5], [0.0, 0.1, 0.5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="increasing"):
        occlusion.area_under_curve([1.0, 0.5], [0.3, 0.1])


@pytest.fixture(scope="module")
def clutter_model_and_data():
    from iterconv_keras.data import generated
    from iterconv_keras.loading import load_model

    model = load_model("digitclutter-small")
    images, labels, _ = generated.clutter_test_set(3, 96)
    return model, images, labels


def _oracle(model, images, labels, schedule=None):
    logits = np.asarray(model(images, schedule=schedule, training=False))
    loss = float(keras.losses.BinaryCrossentropy(from_logits=True)(labels, logits))
    return exact_set_accuracy(logits, labels), loss


def test_occlusion_sweep_scores_the_occluded_images(clutter_model_and_data):
    model, images, labels = clutter_model_and_data
    fill = (0.47,)
    sweep = occlusion.occlusion_sweep(model, images, labels, fill, levels=LEVELS, seed=4, batch_size=32)
    clean_accuracy, clean_loss = _oracle(model, images.astype(np.float32) / 255, labels)
    for level, accuracy, loss in zip(LEVELS, sweep["accuracy"], sweep["loss"], strict=True):
        occluded = occlusion.occlude(images, level, fill, seed=4)
        expected_accuracy, expected_loss = _oracle(model, occluded, labels)
        assert accuracy == pytest.approx(expected_accuracy)
        assert loss == pytest.approx(expected_loss, rel=1e-4)
        if level > 0:  # the occluded images really differ for the model
            assert expected_loss != pytest.approx(clean_loss, rel=1e-3)
    assert sweep["accuracy"][-1] < clean_accuracy


def test_iteration_sweep_scores_occluded_images_under_extra_iterations(clutter_model_and_data):
    model, images, labels = clutter_model_and_data
    fill = (0.47,)
    result = occlusion.iteration_sweep(model, images, labels, fill, iterations=(0, 2), level=0.3, seed=4,
                                       batch_size=32)
    occluded = occlusion.occlude(images, 0.3, fill, seed=4)
    for i, k in enumerate((0, 2)):
        schedule = [list(range(len(b))) + [len(b) - 1] * k for b in model.stages]
        assert result["clean"][i] == pytest.approx(_oracle(model, images.astype(np.float32) / 255, labels, schedule)[0])
        assert result["occluded"][i] == pytest.approx(_oracle(model, occluded, labels, schedule)[0])


def test_accuracy_and_loss_masks_the_padded_last_batch(clutter_model_and_data):
    from iterconv_keras.analysis.programs import StagePrograms

    model, images, labels = clutter_model_and_data
    images, labels = images[:50], labels[:50]  # batches of 32 and 18 (padded to 32)
    steps = []
    accuracy, loss = StagePrograms(model).accuracy_and_loss(images, labels, 32, progress=steps.append)
    expected_accuracy, expected_loss = _oracle(model, images.astype(np.float32) / 255, labels)
    assert accuracy == pytest.approx(expected_accuracy)
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert steps == [1, 1]
