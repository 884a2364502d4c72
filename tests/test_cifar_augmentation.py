"""The CIFAR recipe: random crops of the 4-pixel zero-padded image and horizontal flips.

Files: tiny CIFAR-10 / CIFAR-100 python-pickle batches in the published format
(`test_datasets.write_cifar`). Oracle: every training image a run sees is found by
brute force among all 81 shifts (-4..4 in each direction) x 2 flips of the
zero-padded originals, with its own label; and the draws cover the whole range.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_datasets import write_cifar

from iterconv_cli.main import cli
from iterconv_keras import training
from iterconv_keras.config import TrainConfig
from iterconv_keras.data import datasets, pipeline

PAD = 4  # He et al. (2016), CIFAR: 4-pixel padding, random 32x32 crop, horizontal flip


def _variants(image):
    """{bytes of every shifted (zero-padded) and flipped 32x32 copy: (dy, dx, flipped)}."""
    h, w, _ = image.shape
    padded = np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))
    found = {}
    for dy in range(-PAD, PAD + 1):
        for dx in range(-PAD, PAD + 1):
            crop = padded[PAD + dy:PAD + dy + h, PAD + dx:PAD + dx + w]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                found.setdefault(candidate.tobytes(), []).append((dy, dx, flipped))
    return found


def test_train_cifar_records_the_augmentation_it_applies(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=8)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--variant", "tiny", "--epochs", "1",
        "--batch-size", "8", "--validation-size", "8", "--test-size", "8", "--augment", "--out", str(run), "--json"])
    assert result.exit_code == 0, result.stderr
    assert "augmented: translation by up to 4 px and horizontal flips" in result.stderr
    with open(run / "config.json") as f:
        recorded = json.load(f)
    assert recorded["augment"] is True and recorded["dataset"] == "cifar10"
    # The recorded config reproduces the augmented batches (two epochs here, to see more draws).
    _check_augmented_batches(TrainConfig.from_dict({**recorded, "epochs": 2}).validate())


@pytest.mark.parametrize("dataset, folder, hundred", [
    ("cifar10", "cifar-10-batches-py", False),
    ("cifar100", "cifar-100-python", True),
])
def test_augmented_cifar_batches_are_shifted_flipped_crops_of_the_padded_originals(tmp_path, dataset, folder,
                                                                                  hundred):
    write_cifar(tmp_path / folder, hundred=hundred, per_batch=8 if not hundred else 40)
    config = TrainConfig(dataset=dataset, data_dir=str(tmp_path), batch_size=8, epochs=2, validation_size=8)
    assert config.validate().augment is True  # the default for CIFAR (validate resolves None)
    assert datasets.AUGMENT_PADS[dataset] == PAD
    _check_augmented_batches(config)


def _check_augmented_batches(config):
    """Every image of every batch ``config`` trains on is a padded, shifted, maybe flipped original."""
    splits = datasets.load(config.dataset, data_dir=config.data_dir, validation_size=config.validation_size,
                           test_size=config.test_size, seed=config.seed)
    steps = pipeline.steps_per_epoch(len(splits.x_train), config.batch_size)
    batches = list(training.training_dataset(config, splits, steps, initial_epoch=0))
    assert len(batches) == config.epochs * steps
    lookup = {}
    for index, image in enumerate(splits.x_train):
        for key, draws in _variants(image).items():
            lookup.setdefault(key, []).extend((index, *d) for d in draws)
    seen = []
    for images, labels in batches:
        pixels = np.rint(images.numpy() * 255).astype(np.uint8)
        assert np.abs(images.numpy() * 255 - pixels).max() < 1e-3  # uint8 images scaled to [0, 1]
        for image, label in zip(pixels, labels.numpy(), strict=True):
            matches = lookup.get(image.tobytes())
            assert matches, "an augmented image is no shifted/flipped crop of any padded original"
            assert len(matches) == 1  # random pixels: the source, shift and flip are unambiguous
            index, dy, dx, flipped = matches[0]
            assert splits.y_train[index] == label
            seen.append((index, dy, dx, flipped))
    # Each epoch visits every training image once; the draws span the whole range.
    indices = [s[0] for s in seen]
    assert sorted(indices[: steps * config.batch_size]) == list(range(steps * config.batch_size))
    shifts = np.array([(s[1], s[2]) for s in seen])
    assert shifts.min() == -PAD and shifts.max() == PAD
    assert 0.3 < np.mean([s[3] for s in seen]) < 0.7


def test_no_augment_trains_on_the_originals(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=8)
    config = TrainConfig(dataset="cifar10", data_dir=str(tmp_path), augment=False, batch_size=8, epochs=1,
                         validation_size=8).validate()
    splits = datasets.load("cifar10", data_dir=config.data_dir, validation_size=8, seed=0)
    steps = pipeline.steps_per_epoch(len(splits.x_train), 8)
    originals = {image.tobytes() for image in splits.x_train}
    for images, _ in training.training_dataset(config, splits, steps, initial_epoch=0):
        pixels = np.rint(images.numpy() * 255).astype(np.uint8)
        assert all(image.tobytes() in originals for image in pixels)
