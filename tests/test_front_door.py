"""The package's front door: cheap to import, lazy names, Keras-native loading."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import exact_set_accuracy

import iterconv_keras
from iterconv_keras.models.metrics import ExactSetAccuracy
from iterconv_keras.models.variants import create_model


def _run(code, *args):
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_import_loads_no_tensorflow():
    out = _run(
        "import sys, iterconv_keras\n"
        "print([m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules])\n"
        "print(iterconv_keras.__version__)\n"
    )
    heavy, version = out.splitlines()
    assert heavy == "[]"
    assert version == iterconv_keras.__version__


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert version("iterconv") == iterconv_keras.__version__


def test_public_names_are_listed_and_unknown_names_raise():
    assert set(iterconv_keras.__all__) <= set(dir(iterconv_keras))
    with pytest.raises(AttributeError, match="no_such_name"):
        iterconv_keras.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def compiled_run_model(tmp_path_factory):
    """A compiled multi-label model as `iterconv train` saves it (exact-set metric included)."""
    keras.utils.set_random_seed(3)
    model = create_model("tiny", (8, 8, 1), 10, multi_label=True)
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[ExactSetAccuracy(name="accuracy")])
    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    y = np.zeros((16, 10), np.float32)
    for row in y:
        row[rng.choice(10, 3, replace=False)] = 1.0
    path = tmp_path_factory.mktemp("front") / "model.keras"
    model.save(path)
    np.savez(path.with_suffix(".npz"), x=x, y=y)
    logits = np.asarray(model(x))
    return path, logits, exact_set_accuracy(logits, y)


# Every order in which a user may import the two packages; Keras' default compile=True.
IMPORT_ORDERS = [
    "import iterconv_keras, keras",
    "import keras, iterconv_keras",
    "import iterconv_keras; import tensorflow; import keras",
    "import tensorflow; import iterconv_keras; import keras",
]


@pytest.mark.parametrize("imports", IMPORT_ORDERS)
def test_keras_load_model_works_after_importing_the_package(compiled_run_model, imports):
    path, logits, accuracy = compiled_run_model
    out = _run(
        imports + "\n"
        "import sys, json, numpy as np\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "data = np.load(sys.argv[1][:-len('.keras')] + '.npz')\n"
        "scores = model.evaluate(data['x'], data['y'], verbose=0, return_dict=True)\n"
        "print(json.dumps({'accuracy': float(scores['accuracy']), 'logits': np.asarray(model(data['x'])).tolist()}))\n",
        str(path),
    )
    document = json.loads(out.splitlines()[-1])
    np.testing.assert_allclose(document["logits"], logits, rtol=1e-5, atol=1e-6)
    # The restored compiled metric agrees with an independent exact-set computation.
    assert document["accuracy"] == pytest.approx(accuracy)


def test_every_front_door_name_is_the_library_object_it_names():
    import importlib

    for name, (module, attribute) in iterconv_keras._EXPORTS.items():
        assert getattr(iterconv_keras, name) is getattr(importlib.import_module(module), attribute), name
    assert iterconv_keras.list_variants()[:2] == ["tiny", "small"]
    model = iterconv_keras.create_model("tiny", (8, 8, 1), 3)
    assert isinstance(model, iterconv_keras.IterativeResNet) and model.num_classes == 3
