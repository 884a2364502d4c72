"""tensorflow-datasets builders: the prepared splits are iterconv's generated sets, bit for bit.

Oracle: iterconv's generators called directly (`digitclutter.generate`,
`debris.generate`) and `datasets.load`, the sets `iterconv train` uses. Small
configs (a few images per split) keep the builds to seconds; the full-size
comparison is marked slow.

Reference: Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from iterconv_keras.data import datasets, debris, digitclutter, generated
from iterconv_keras.data.tfds_builders import Digitclutter, DigitclutterConfig, Digitdebris, DigitdebrisConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "test")
TINY_CLUTTER = {"n_digits": 3, "train_size": 8, "validation_size": 4, "test_size": 16}
TINY_DEBRIS = {"n_fragments": 30, "train_size": 6, "validation_size": 3, "test_size": 12}


def _read(name, split, data_dir, keys):
    """Every example of a prepared split, in stored order, as numpy arrays per key."""
    dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
    batches = list(tfds.as_numpy(dataset.batch(4096)))
    return {key: np.concatenate([batch[key] for batch in batches]) for key in keys}


def _digest(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def clutter_dir(tmp_path_factory):
    """A tiny ``digitclutter`` config prepared through the builder (nothing downloaded)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digitclutter", config=DigitclutterConfig(**TINY_CLUTTER), data_dir=data_dir).download_and_prepare()
    return data_dir


def test_configs_cover_the_counts_with_iterconvs_default_sizes():
    assert [c.name for c in Digitclutter.BUILDER_CONFIGS] == ["2digits", "3digits", "4digits", "5digits"]
    assert [c.name for c in Digitdebris.BUILDER_CONFIGS] == ["10fragments", "30fragments", "50fragments"]
    for config in Digitclutter.BUILDER_CONFIGS + Digitdebris.BUILDER_CONFIGS:
        assert config.sizes == {"train": 20_000, "validation": 2_000, "test": 5_000} == generated.CLUTTER_SIZES
    assert DigitclutterConfig(**TINY_CLUTTER).name == "3digits_train8_validation4_test16"
    assert Digitclutter.DEFAULT_CONFIG_NAME == "3digits" and Digitdebris.DEFAULT_CONFIG_NAME == "10fragments"


@pytest.mark.parametrize(
    "make, kwargs, echoed",
    [(DigitclutterConfig, {"n_digits": bad}, f"n_digits.*2..5.*got {bad!r}") for bad in (1, 6, 3.0, True, "3")]
    + [(DigitdebrisConfig, {"n_fragments": bad}, f"10, 30, 50.*got {bad!r}") for bad in (20, 0, 10.0)]
    + [
        (DigitclutterConfig, {"test_size": bad}, f"test_size must be a positive integer, got {bad!r}")
        for bad in (0, -1, 2.5)
    ]
    + [(DigitdebrisConfig, {"train_size": 0}, "train_size must be a positive integer, got 0")]
    # A name that does not describe the data is refused, not silently kept or replaced.
    + [(DigitclutterConfig, {"name": "3digits", "test_size": 16}, "'3digits' does not describe.*3digits_train20000")]
    + [(DigitclutterConfig, {"name": "4digits", "n_digits": 3}, "'4digits' does not describe.*must be '3digits'")],
)
def test_bad_configs_raise_echoing_the_value(make, kwargs, echoed):
    with pytest.raises(ValueError, match=echoed):
        make(**kwargs)


def test_unknown_config_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="6digits not found"):
        tfds.builder("digitclutter/6digits", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="20fragments not found"):
        tfds.builder("digitdebris/20fragments", data_dir=str(tmp_path))


def test_load_yields_iterconvs_clutter_sets_bitwise(clutter_dir):
    config = DigitclutterConfig(**TINY_CLUTTER)
    name = f"digitclutter/{config.name}"
    keys = ("image", "labels", "order")
    got = {split: _read(name, split, clutter_dir, keys) for split in SPLITS}
    # Oracle 1: the generator, called directly, at the test seed.
    direct = digitclutter.generate(3, 16, generated.clutter_seed("test", 3))
    assert got["test"]["image"].dtype == np.uint8 and got["test"]["image"].shape == (16, 32, 32, 1)
    assert got["test"]["image"].tobytes() == direct.images.tobytes()
    assert got["test"]["labels"].dtype == np.float32
    assert got["test"]["labels"].tobytes() == direct.labels.tobytes()
    np.testing.assert_array_equal(got["test"]["order"], direct.order)
    # Oracle 2: the arrays `iterconv train --dataset digitclutter` trains and evaluates on.
    ref = datasets.load("digitclutter", clutter_digits=3, train_size=8, validation_size=4, test_size=16)
    for split, x, y in (
        ("train", ref.x_train, ref.y_train), ("validation", ref.x_val, ref.y_val), ("test", ref.x_test, ref.y_test)
    ):
        assert got[split]["image"].tobytes() == x.tobytes(), split
        assert got[split]["labels"].tobytes() == y.tobytes(), split


def test_prepared_info_carries_citation_version_and_provenance(clutter_dir):
    config = DigitclutterConfig(**TINY_CLUTTER)
    builder = tfds.builder(f"digitclutter/{config.name}", data_dir=clutter_dir)
    info = builder.info
    assert str(info.version) == "1.0.0"
    assert "Spoerer" in info.citation and "1551" in info.citation and "Kriegeskorte" in info.citation
    # No homepage is stored (tfds then reports its own catalog URL as a fallback).
    assert list(info.as_proto.location.urls) == []
    assert {split: info.splits[split].num_examples for split in SPLITS} == config.sizes
    assert info.supervised_keys == ("image", "labels")
    with open(os.path.join(builder.data_dir, "metadata.json")) as handle:
        metadata = json.load(handle)
    assert metadata["seeds"] == {split: generated.clutter_seed(split, 3) for split in SPLITS}
    assert metadata["sizes"] == config.sizes
    assert metadata["recipe"]["font_sha256"] == digitclutter.font_sha256()
    image, labels = next(
        iter(tfds.load(f"digitclutter/{config.name}", split="test", data_dir=clutter_dir, as_supervised=True))
    )
    assert image.shape == (32, 32, 1) and labels.shape == (10,)


def test_array_record_data_source_gives_random_access_to_the_same_images(tmp_path):
    """``--file_format array_record`` + ``tfds.data_source``: the random-access path for PyTorch / JAX loaders."""
    config = DigitclutterConfig(n_digits=4, train_size=5, validation_size=2, test_size=7)
    data_dir = str(tmp_path)
    tfds.builder("digitclutter", config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
    source = tfds.data_source(f"digitclutter/{config.name}", split="test", data_dir=data_dir)
    want = digitclutter.generate(4, 7, generated.clutter_seed("test", 4))
    assert len(source) == 7
    for i in (6, 0, 3):  # out of order: random access, not a stream
        assert source[i]["image"].tobytes() == want.images[i].tobytes()
        assert source[i]["labels"].tobytes() == want.labels[i].tobytes()
        np.testing.assert_array_equal(source[i]["order"], want.order[i])


def test_debris_built_by_tfds_build_command_equals_the_generator(clutter_dir, tmp_path):
    """One fresh process, without iterconv at first, checks what a user of tfds alone sees.

    1. The prepared clutter set reads back with tensorflow-datasets alone.
    2. ``import iterconv_keras`` registers no builder (and loads no builder module).
    3. The ``tfds build`` command's own code (``tensorflow_datasets.scripts.cli.build``,
       parsed as the ``tfds`` executable parses it) with ``--imports`` and a JSON
       ``--config`` builds a tiny debris set; the ``tfds`` executable itself also
       needs apache-beam and mlcroissant installed (see docs/scaling.md).
    """
    clutter = DigitclutterConfig(**TINY_CLUTTER)
    config = DigitdebrisConfig(**TINY_DEBRIS)
    build_dir = str(tmp_path / "built")
    script = f"""
import json, sys, hashlib
import numpy as np
import tensorflow_datasets as tfds
out = {{}}
ds = tfds.load("digitclutter/{clutter.name}", split="test", data_dir={clutter_dir!r}, download=False)
batch = next(iter(tfds.as_numpy(ds.batch(1000))))
out["sha"] = hashlib.sha256(batch["image"].tobytes() + batch["labels"].tobytes()).hexdigest()
out["iterconv_before"] = any(m.startswith("iterconv_keras") for m in sys.modules)
import iterconv_keras, iterconv_keras.data.datasets
mine = {{"digitclutter", "digitdebris"}}
out["registered_by_iterconv"] = sorted(mine & set(tfds.list_builders(with_community_datasets=False)))
out["builders_loaded_by_iterconv"] = "iterconv_keras.data.tfds_builders" in sys.modules
from tensorflow_datasets.scripts.cli import build, cli_utils
argv = ["tfds build", "--imports", "iterconv_keras.data.tfds_builders", "digitdebris",
        "--config", json.dumps({TINY_DEBRIS!r}), "--data_dir", {build_dir!r}]
cli_utils.make_flags_parser(build.Args, "tfds build")(argv).execute()
out["registered_after"] = sorted(mine & set(tfds.list_builders(with_community_datasets=False)))
print("RESULT " + json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    direct = digitclutter.generate(3, 16, generated.clutter_seed("test", 3))
    assert out["sha"] == hashlib.sha256(direct.images.tobytes() + direct.labels.tobytes()).hexdigest()
    assert out["iterconv_before"] is False
    assert out["registered_by_iterconv"] == [] and out["builders_loaded_by_iterconv"] is False
    assert out["registered_after"] == ["digitclutter", "digitdebris"]
    for split in SPLITS:
        got = _read(f"digitdebris/{config.name}", split, build_dir, ("image", "label"))
        seed = generated.debris_seed(split, 30)
        want = debris.generate(30, config.sizes[split], seed)
        assert got["image"].tobytes() == want.images.tobytes(), split
        np.testing.assert_array_equal(got["label"], want.labels)


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset, kwargs", [
    ("digitclutter/3digits", "digitclutter", {"clutter_digits": 3}),
    ("digitdebris/50fragments", "digitdebris", {"debris_fragments": 50}),
])
def test_full_size_configs_are_the_sets_iterconv_train_uses(tmp_path, name, dataset, kwargs):
    data_dir = str(tmp_path)
    tfds.builder(name, data_dir=data_dir).download_and_prepare()
    ref = datasets.load(dataset, **kwargs)
    label = "labels" if dataset == "digitclutter" else "label"
    for split, x, y in (
        ("train", ref.x_train, ref.y_train), ("validation", ref.x_val, ref.y_val), ("test", ref.x_test, ref.y_test)
    ):
        got = _read(name, split, data_dir, ("image", label))
        assert _digest(got["image"], got[label].astype(y.dtype)) == _digest(x, y), split
