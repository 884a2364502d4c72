"""What the Digitclutter and debris builders share: split sizes, config naming, citation.

A config's name says everything that changes its images: the digit or fragment count
and, when they differ from iterconv's defaults, the split sizes. So a small set built
for a test can never be read back under the name of the full set.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from iterconv_keras.data import generated

SPLITS = ("train", "validation", "test")
IMAGE_SIZE = 32
CITATION = """\
@article{spoerer2017recurrent,
  title   = {Recurrent Convolutional Neural Networks: A Better Model of Biological Object Recognition},
  author  = {Spoerer, Courtney J. and McClure, Patrick and Kriegeskorte, Nikolaus},
  journal = {Frontiers in Psychology},
  volume  = {8},
  pages   = {1551},
  year    = {2017},
  doi     = {10.3389/fpsyg.2017.01551}
}"""
# Shared by both builders: the images are a pure function of iterconv's generator
# code and the font file, so a change to either that alters bytes must bump this.
VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {
    "1.0.0": "First release: the images of iterconv's generator at its fixed dataset seeds.",
}


def check_count(label, value):
    """Raise ``ValueError`` echoing ``value`` unless it is a positive integer.

    Zero is refused too: tensorflow-datasets cannot write an empty split, and a
    builder that quietly dropped it would not have the splits its name promises.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(eq=False)
class SizedConfig(tfds.core.BuilderConfig):
    """A `tfds.core.BuilderConfig` with the three split sizes; its name is derived from them.

    Subclasses define `stem` (the part of the name from the digit or fragment count,
    e.g. ``"3digits"``), `what` (a phrase for the description) and validate their
    own fields in `_check`.

    Args:
        name: leave empty to derive it; if given it must equal the derived name
            (``"<stem>"`` at the default sizes, otherwise
            ``"<stem>_train<N>_validation<N>_test<N>"``), so that a name never
            describes other data than its config.
        train_size, validation_size, test_size: images per split, positive;
            default iterconv's 20,000 / 2,000 / 5,000 (`generated.CLUTTER_SIZES`).
    """

    name: str = ""
    train_size: int = generated.CLUTTER_SIZES["train"]
    validation_size: int = generated.CLUTTER_SIZES["validation"]
    test_size: int = generated.CLUTTER_SIZES["test"]

    def __post_init__(self):
        self._check()
        for split in SPLITS:
            setattr(self, f"{split}_size", check_count(f"{split}_size", getattr(self, f"{split}_size")))
        derived = self.derived_name()
        if not self.name:
            self.name = derived
        elif self.name != derived:
            raise ValueError(
                f"config name {self.name!r} does not describe its data: with these fields it must be "
                f"{derived!r} (or leave the name empty)"
            )
        if not self.description:
            counts = " / ".join(f"{self.sizes[split]:,}" for split in SPLITS)
            self.description = f"{self.what}; {counts} train / validation / test images."

    @property
    def sizes(self):
        """``{split: images}`` for train, validation and test."""
        return {split: getattr(self, f"{split}_size") for split in SPLITS}

    @property
    def default_sizes(self):
        """True when the split sizes are iterconv's (the sets `iterconv train` uses)."""
        return self.sizes == generated.CLUTTER_SIZES

    def derived_name(self):
        """The config name implied by the fields (see the class docstring)."""
        if self.default_sizes:
            return self.stem
        return f"{self.stem}_train{self.train_size}_validation{self.validation_size}_test{self.test_size}"

    def _check(self):
        raise NotImplementedError


def provenance(info, seed_of, sizes):
    """The metadata recorded beside a prepared set: generator recipe, seeds and sizes.

    Args:
        info: the generator's ``recipe_info`` for one split (its ``seed`` is dropped).
        seed_of: callable, split name -> the fixed dataset seed.
        sizes: ``{split: images}``.
    """
    recipe = {key: value for key, value in info.items() if key != "seed"}
    return {"recipe": recipe, "seeds": {split: int(seed_of(split)) for split in SPLITS}, "sizes": dict(sizes)}
