"""The settings of a training run: `TrainConfig` and the option tables it checks against.

`TrainConfig` is what a run directory's ``config.json`` stores (`iterconv_keras.runs`
owns the file) and what `iterconv_keras.training.train` runs. The option tables
(`OPTIMIZERS`, `LR_SCHEDULES`, `BLOCK_INITS`) are the single source the command
line builds its choices from.

This module imports only the standard library at module level (the dataset and
variant tables are imported when a config is validated), so the command line can
read the tables without TensorFlow.
"""

import dataclasses
import math
import os

from iterconv_keras.errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
DEFAULT_LIPSCHITZ = 0.9
DEFAULT_CONTRACTIVE_LIPSCHITZ = 0.5
LR_SCHEDULES = ("constant", "cosine")
# AdamW's customary decoupled weight decay in iterconv (since 0.1), the
# default when none is given; an explicit 0 switches decay off (review U4).
ADAMW_WEIGHT_DECAY = 1e-4
BLOCK_INITS = ("tied", "independent")  # IterativeResNet's block_init
# Where a run trains (iterconv_keras.distribution); "auto" is what configs written before it mean.
STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
# Keras dtype policies a run may train under (IterativeResNet's dtype); a config.json
# written before the setting existed means float32, the dataclass default.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Settings added after 0.1, with the value that reproduces what a config.json written
# before them meant (fixed data, no augmentation, tied blocks).
_PRE_0_2_VALUES = {"fresh_data": False, "augment": False, "block_init": "tied"}
# Settings renamed since, old name -> new: configs and zoo card recipes written before
# carry the old key (the learning-rate ``schedule`` collided with block schedules, issue 12).
RENAMED_SETTINGS = {"schedule": "lr_schedule"}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (saved as ``config.json``).

    Args:
        dataset: dataset name (see `iterconv_keras.data.sources.DATASET_NAMES`).
        variant: architecture name (see `iterconv_keras.models.variants`).
        coupling: soft gradient coupling strength lambda in [0, 1].
        spectral_norm: constrain the residual functions to Lip(f) <= lipschitz. Also
            switched on by `validate` whenever a bound is given or needed (``lipschitz``
            set, a variant that carries one, the contractive residual form): a bound is
            never recorded without being applied.
        lipschitz: the bound c > 0, or None: `DEFAULT_LIPSCHITZ` (the variant's bound
            if it has one; `DEFAULT_CONTRACTIVE_LIPSCHITZ` for contractive blocks) when
            the constraint is on, None when it is off.
        residual_form: ``"plain"`` or ``"contractive"`` (``x <- (1 - alpha) x + alpha g(x)``
            with Lip(g) <= c < 1), or None: the variant's (plain unless it says otherwise).
        alpha: the contractive form's step in (0, 1], or None: the variant's, else 0.5.
            Refused for the plain form.
        epochs: number of epochs (> 0).
        batch_size: images per step (> 0).
        lr: peak learning rate (> 0).
        optimizer: one of `OPTIMIZERS` (``momentum`` is SGD with momentum 0.9).
        weight_decay: decoupled weight decay (>= 0; 0 means none, for every optimizer),
            or None (default): `ADAMW_WEIGHT_DECAY` for ``adamw``, none for the others.
            Resolved by `validate`, so ``config.json`` records the decay applied.
        lr_schedule: learning-rate schedule, one of `LR_SCHEDULES`: ``cosine``
            (decays to 0 over the run) or ``constant``. Called ``schedule`` before
            0.2 (`from_dict` still reads that key).
        train_size: training images (None: the dataset's default).
        validation_size: validation images (None: the dataset's default).
        test_size: test images for the final evaluation (None: the whole test set,
            or 5,000 generated Digitclutter or debris images).
        clutter_digits: digits per image for Digitclutter (2..5).
        debris_fragments: digit fragments per image for ``digitdebris`` (10, 30 or 50;
            default 10), after Spoerer, McClure & Kriegeskorte (2017).
        fresh_data: generated datasets only: train on ``train_size`` new images every
            epoch, generated from a seed that is a function of (seed, epoch), instead
            of one fixed set. None (default) means on for Digitclutter and debris: a
            generator gives unlimited data at ~5 % of the train step's cost, and a fixed
            20k set is memorised (train 0.76 vs validation 0.655 exact-set accuracy
            after 5 epochs, issue 16). Refused for file datasets.
        augment: random translation (zero padding and cropping, see
            `datasets.AUGMENT_PADS`) and horizontal flip of the training images,
            seeded by (seed, epoch, step). None (default) means on for Fashion-MNIST
            and CIFAR, off otherwise; refused for MNIST and the generated datasets,
            where flips change digits.
        block_init: ``"tied"`` (default, every block of a stage starts as block 0) or
            ``"independent"`` (a conventional ResNet), see `IterativeResNet`.
        seed: seeds initialisation and data order (and fresh data, augmentation).
        data_dir: folder searched first for dataset files.
        data_file: generated datasets only: a set written by ``iterconv data`` to train,
            validate and test on instead of generating (stored as an absolute path; see
            `iterconv_keras.data.datasets.load` for how it is split). Implies fixed data.
        jit_compile: compile the train step with XLA.
        strategy: where to train, one of `STRATEGIES` (`iterconv_keras.distribution`):
            ``auto`` (default: ``mirrored`` when more than one GPU is visible, else
            ``one-device``), ``one-device``, ``mirrored`` (the devices of this machine)
            or ``multi-worker`` (the machines listed by ``TF_CONFIG``). ``batch_size``
            is the global batch, split evenly over the replicas.
        devices: ``mirrored`` only: mirror over this many devices, the first GPUs or,
            on a machine without GPUs, logical devices split off the CPU (for testing;
            they share its cores). None (default): every GPU, or the CPU.
        precision: one of `PRECISIONS`, the Keras dtype policy of the model:
            ``float32`` (default), or 16-bit computation with float32 variables
            (``mixed_float16`` also scales the loss, through Keras'
            `LossScaleOptimizer`). See docs/scaling.md, "Precision".
        out: the run directory.
    """

    dataset: str = "digitclutter"
    variant: str = "small"
    coupling: float = 0.0
    spectral_norm: bool = False
    lipschitz: float | None = None
    residual_form: str | None = None
    alpha: float | None = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.002
    optimizer: str = "adam"
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    train_size: int | None = None
    validation_size: int | None = None
    test_size: int | None = None
    clutter_digits: int = 3
    debris_fragments: int = 10
    fresh_data: bool | None = None
    augment: bool | None = None
    block_init: str = "tied"
    seed: int = 0
    data_dir: str | None = None
    data_file: str | None = None
    jit_compile: bool = False
    strategy: str = "auto"
    devices: int | None = None
    precision: str = "float32"
    out: str | None = None

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting; return self.

        Settings left None (``fresh_data``, ``augment``) are resolved to the
        dataset's default here, so the stored config says what the run did.
        """
        from iterconv_keras.data import datasets, debris, sources
        from iterconv_keras.models import coupling as coupling_lib
        from iterconv_keras.models import variants

        if self.dataset not in sources.DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(sources.DATASET_NAMES)}")
        row = variants.variant_kwargs(self.variant)
        self.coupling = coupling_lib.validate_strength(self.coupling)
        self._resolve_block_settings(row)
        _require(_is_int(self.epochs) and self.epochs > 0, f"epochs must be an integer > 0, got {self.epochs!r}")
        _require(_is_int(self.batch_size) and self.batch_size > 0,
                 f"batch_size must be an integer > 0, got {self.batch_size!r}")
        _require(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
                 f"lr must be a number > 0, got {self.lr!r}")
        _require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay is None:
            self.weight_decay = ADAMW_WEIGHT_DECAY if self.optimizer == "adamw" else 0.0
        _require(isinstance(self.weight_decay, (int, float)) and not isinstance(self.weight_decay, bool)
                 and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _require(self.train_size is None or (_is_int(self.train_size) and self.train_size > 0),
                 f"train_size must be an integer > 0, got {self.train_size!r}")
        _require(self.validation_size is None or (_is_int(self.validation_size) and self.validation_size >= 0),
                 f"validation_size must be an integer >= 0, got {self.validation_size!r}")
        _require(self.test_size is None or (_is_int(self.test_size) and self.test_size > 0),
                 f"test_size must be an integer > 0, got {self.test_size!r}")
        _require(_is_int(self.clutter_digits) and 2 <= self.clutter_digits <= 5,
                 f"clutter_digits must be 2..5, got {self.clutter_digits!r}")
        debris.validate_fragments(self.debris_fragments, "debris_fragments")
        _require(self.block_init in BLOCK_INITS, f"block_init must be one of {BLOCK_INITS}, got {self.block_init!r}")
        _require(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self._resolve_data_options(datasets)
        _require(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _require(self.devices is None or (_is_int(self.devices) and self.devices > 0),
                 f"devices must be an integer > 0, got {self.devices!r}")
        _require(self.devices is None or self.strategy == "mirrored",
                 f"devices applies to strategy 'mirrored' only, got devices={self.devices!r} with strategy "
                 f"{self.strategy!r}")
        return self

    def check_given_settings_apply(self, given):
        """Refuse a setting in ``given`` that this config's dataset does not read.

        A setting that only some datasets read (`dataset_settings`) would otherwise be
        recorded in ``config.json`` with no effect: ``clutter_digits`` on Fashion-MNIST,
        ``data_dir`` with a generated set. Values nobody chose (the defaults) are fine.

        Args:
            given: names of the settings the caller chose explicitly (the CLI: the
                options on its command line; the Python API: `runs.explicit_settings`).

        Raises:
            ValueError: naming the first such setting, its value and the dataset.
        """
        for name, readers in dataset_settings().items():
            if name in given and self.dataset not in readers:
                names = [repr(r) for r in readers]
                names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
                raise ValueError(f"{name} applies to dataset {names} only, got {name}={getattr(self, name)!r} "
                                 f"with dataset={self.dataset!r}")

    def _resolve_data_options(self, datasets):
        from iterconv_keras.data import sources

        generated = self.dataset in sources.GENERATED_NAMES
        augmentable = self.dataset in datasets.AUGMENT_PADS
        if self.data_file is not None:
            _require(isinstance(self.data_file, str) and generated,
                     f"data_file holds a generated set ({', '.join(sources.GENERATED_NAMES)}); "
                     f"got data_file {self.data_file!r} for dataset {self.dataset!r}")
            _require(not self.fresh_data, "fresh_data draws new images every epoch; a data_file is one fixed set")
            self.data_file = os.path.abspath(self.data_file)
            self.fresh_data = False
        if self.fresh_data is None:
            self.fresh_data = generated
        if self.augment is None:
            self.augment = augmentable
        _require(isinstance(self.fresh_data, bool), f"fresh_data must be true or false, got {self.fresh_data!r}")
        _require(isinstance(self.augment, bool), f"augment must be true or false, got {self.augment!r}")
        _require(not self.fresh_data or generated,
                 f"fresh_data needs a generated dataset ({', '.join(sources.GENERATED_NAMES)}); "
                 f"dataset {self.dataset!r} is a fixed set of files")
        _require(not self.augment or augmentable,
                 f"augment (translation and horizontal flip) is not available for dataset {self.dataset!r}: "
                 f"flips change digits; it is for {', '.join(datasets.AUGMENT_PADS)}")

    def _resolve_block_settings(self, row):
        """Fill the constraint and residual-form settings from the variant row; refuse contradictions."""
        from iterconv_keras.models import blocks

        if self.residual_form is None:
            self.residual_form = row.get("residual_form", "plain")
        _require(self.residual_form in blocks.RESIDUAL_FORMS,
                 f"residual_form must be one of {blocks.RESIDUAL_FORMS}, got {self.residual_form!r}")
        contractive = self.residual_form == "contractive"
        if self.lipschitz is not None or row.get("lipschitz") is not None or contractive:
            self.spectral_norm = True
        if not self.spectral_norm:
            _require(self.alpha is None, f"alpha applies to residual_form 'contractive' only, got alpha={self.alpha!r}")
            return
        if self.lipschitz is None:
            self.lipschitz = row.get("lipschitz", DEFAULT_CONTRACTIVE_LIPSCHITZ if contractive else DEFAULT_LIPSCHITZ)
        _require(isinstance(self.lipschitz, (int, float)) and not isinstance(self.lipschitz, bool)
                 and math.isfinite(self.lipschitz) and self.lipschitz > 0,
                 f"lipschitz must be a number > 0, got {self.lipschitz!r}")
        if contractive and self.alpha is None:
            self.alpha = row.get("alpha", blocks.DEFAULT_ALPHA)
        self.residual_form, self.alpha = blocks.validate_residual_form(self.residual_form, self.alpha, self.lipschitz)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls):
        """The setting names, in declaration order (the keys of ``config.json``)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values):
        """The config stored as ``values`` (a ``config.json`` document), old keys included.

        Keys renamed since (`RENAMED_SETTINGS`) are read under their new name, and
        settings added since take the value that reproduces what an old config meant.

        Raises:
            UsageError: an unknown key, or a setting given under both its old and new name.
        """
        values = dict(values)
        if "schedule" in values and values.get("optimizer") == "adamw" and not values.get("weight_decay"):
            # Before lr_schedule was named (0.2), weight_decay 0 with AdamW meant 1e-4.
            values["weight_decay"] = ADAMW_WEIGHT_DECAY
        for old, new in RENAMED_SETTINGS.items():
            if old in values:
                if new in values:
                    raise UsageError(f"config has both {old!r} and its new name {new!r}; keep {new!r}")
                values[new] = values.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"config has unknown settings {unknown}")
        values = {**_PRE_0_2_VALUES, **values}
        if "residual_form" not in values and not values.get("spectral_norm"):
            # Configs written before 0.2 record a lipschitz value (the default 0.9, or an
            # ignored --lipschitz) for unconstrained runs; it was never applied.
            values["lipschitz"] = None
        return cls(**values)


def dataset_settings():
    """``{setting: the datasets that read it}`` for the settings only some datasets read.

    The others (sizes, seed, the model and optimiser) apply to every dataset;
    ``data_file``, ``fresh_data`` and ``augment`` are checked by `TrainConfig.validate`.
    """
    from iterconv_keras.data import sources

    return {"clutter_digits": ("digitclutter",), "debris_fragments": ("digitdebris",),
            "data_dir": tuple(sources.FILE_DATASETS)}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition, message):
    if not condition:
        raise ValueError(message)
