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
# Each case is a fresh interpreter importing TensorFlow (about 10 s), so the default suite
# keeps one per kind (package first, Keras first); the TensorFlow-in-between variants run
# with --runslow.
IMPORT_ORDERS = [
    "import iterconv_keras, keras",
    "import keras, iterconv_keras",
    # Package first, as the default "import iterconv_keras, keras" case covers.
    pytest.param("import iterconv_keras; import tensorflow; import keras", marks=pytest.mark.slow),
    # TensorFlow (and so its Keras) loaded before the package, as "import keras, iterconv_keras" covers.
    pytest.param("import tensorflow; import iterconv_keras; import keras", marks=pytest.mark.slow),
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


def test_front_door_verbs_work():
    assert iterconv_keras.list_variants()[:2] == ["tiny", "small"]
    model = iterconv_keras.create_model("tiny", (8, 8, 1), 3)
    assert isinstance(model, iterconv_keras.IterativeResNet) and model.num_classes == 3


# What a user may touch first in a fresh process; each makes some iterconv module import
# Keras part-way through its own import (the registration must wait for it to finish).
# Each case is a fresh interpreter importing TensorFlow (about 10 s): the default suite keeps
# one per kind of first use; the other variants of a kind run with --runslow.
FIRST_USES = [
    "iterconv_keras.IterativeResNet",  # kind: a lazy front-door class
    pytest.param("iterconv_keras.ResidualBlock", marks=pytest.mark.slow),  # covered by IterativeResNet
    pytest.param("iterconv_keras.evaluate", marks=pytest.mark.slow),  # covered by IterativeResNet
    "iterconv_keras.create_model('tiny', (8, 8, 1), 3)",  # kind: a front-door call
    pytest.param("iterconv_keras.TrainConfig().validate()", marks=pytest.mark.slow),  # covered by create_model
    "importlib.import_module('iterconv_keras.models.lipschitz')",  # kind: a submodule imported directly
    # These three are covered by the lipschitz case above.
    pytest.param("importlib.import_module('iterconv_keras.models.normalization')", marks=pytest.mark.slow),
    pytest.param("importlib.import_module('iterconv_keras.analysis.certify')", marks=pytest.mark.slow),
    pytest.param("importlib.import_module('iterconv_keras.data.pipeline')", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("first_use", FIRST_USES)
def test_classes_are_registered_whatever_is_used_first(first_use):
    out = _run(
        "import importlib, iterconv_keras\n"
        f"{first_use}\n"
        "import keras\n"
        "names = keras.saving.get_custom_objects()\n"
        "print('iterconv>IterativeResNet' in names, 'iterconv>ExactSetAccuracy' in names)\n"
    )
    assert out.splitlines()[-1] == "True True"


def test_front_door_names_point_at_the_documented_objects():
    # Independent of the _EXPORTS table: where each public name is documented to live.
    expected = {
        "create_model": "iterconv_keras.models.variants", "list_variants": "iterconv_keras.models.variants",
        "IterativeResNet": "iterconv_keras.models.resnet", "ResidualBlock": "iterconv_keras.models.blocks",
        "list_pretrained": "iterconv_keras.zoo.manifest", "load_model": "iterconv_keras.loading",
        "TrainConfig": "iterconv_keras.config", "train": "iterconv_keras.training",
        "evaluate": "iterconv_keras.analysis.evaluation",
    }
    assert set(iterconv_keras.__all__) == {"__version__", *expected}
    for name, module in expected.items():
        obj = getattr(iterconv_keras, name)
        assert (obj.__module__, obj.__name__) == (module, name), name
